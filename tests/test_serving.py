"""Ray Serve endpoints against a locally started app, with the real `openai` client: the
models of two domains trained on the committed sample, `auto` routing by content, scores
equal to the project's own evaluation, and a dozen malformed requests answered 4xx."""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import pytest

from tests.local_cluster import serving_app

pytestmark = [pytest.mark.ray, pytest.mark.server]  # these start Ray Serve

DOMAINS = ("legal", "religion")


@pytest.fixture(scope="module")
def served(tiny_root, tmp_path_factory):
    """(cfg, base url, model folders): `slm` trained on two domains, a broken third model
    folder, the clustering for `auto`, and the app running on loopback."""
    import ray

    from slmfactory.pipeline import run_trial
    from slmfactory.data.clustering.pipeline import run_clustering
    from slmfactory.platform.config import load_config
    from slmfactory.platform.runtime import init_ray

    work = tmp_path_factory.mktemp("serving") / "work"
    shutil.copytree(tiny_root, work)
    tiny = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
    overrides = {"workdir": str(work), "serving.replica_cpus": 0.5, "serving.price_per_device_hour": 0.09}
    cfg = load_config(tiny, overrides)
    folders = {}
    for d in DOMAINS:
        folders[d] = Path(run_trial(cfg.replace(**{"data.domain": d}), log=None).model_path)
    broken = work / "models" / "broken-vintage"
    broken.mkdir(parents=True)
    (broken / "slmfactory.json").write_text(json.dumps({"domain": "vintage", "strategy": "slm", "params": 1,
                                                        "test_ppl": 1.0}))
    init_ray(num_cpus=2)
    try:
        run_clustering(cfg, progress=False)
        with serving_app(tiny, overrides, work / "models") as url:
            yield cfg, url, folders
    finally:
        ray.shutdown()


class Reply:
    """A raw HTTP answer (stdlib only): status, headers (lower-case names) and parsed JSON body."""

    def __init__(self, status: int, raw: bytes, headers=None):
        self.status_code, self.text = status, raw.decode("utf-8", "replace")
        self.headers = {k.lower(): v for k, v in (headers or {}).items()}

    def json(self):
        return json.loads(self.text)


def http(method: str, url: str, body: bytes | None = None, json_body=None) -> Reply:
    import urllib.error
    import urllib.request

    data = json.dumps(json_body).encode() if json_body is not None else body
    req = urllib.request.Request(url, data=data, method=method, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return Reply(r.status, r.read(), r.headers)
    except urllib.error.HTTPError as e:
        return Reply(e.code, e.read(), e.headers)


def client(url):
    from openai import OpenAI

    return OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


def test_models_and_completions_for_two_domains(served):
    from slmfactory.serving.domains.store import DomainStore

    cfg, url, _ = served
    c = client(url)
    ids = {m.id for m in c.models.list().data}
    # The start-up domains (the broken vintage folder's too: listed, refused when asked), auto,
    # and the run-time domains another test of this module may have added by now.
    assert ids == {"legal", "religion", "vintage", "auto", *DomainStore(cfg.root).names()}
    no_eos = {"0": -100}  # the tokenizer's eos: every completion has its 6 tokens, never an empty text
    for d in DOMAINS:
        r = c.completions.create(model=d, prompt="The licence grants", max_tokens=6, temperature=0,
                                 logit_bias=no_eos)
        assert r.model == d and len(r.choices) == 1 and r.choices[0].text != ""
        assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 6
        assert r.usage.prompt_tokens > 0
        again = c.completions.create(model=d, prompt="The licence grants", max_tokens=6, temperature=0,
                                     logit_bias=no_eos)
        assert again.choices[0].text == r.choices[0].text  # greedy is deterministic
    seeded = [c.completions.create(model="legal", prompt="The", max_tokens=6, temperature=1.0, seed=7, n=2)
              for _ in range(2)]
    assert [ch.text for ch in seeded[0].choices] == [ch.text for ch in seeded[1].choices]
    assert len(seeded[0].choices) == 2


def test_models_lists_each_models_measured_serving_cost(served):
    """`/v1/models`: each trained domain's tokens/s for generation and scoring, measured when
    its folder was exported, as device-hours and (``serving.price_per_device_hour`` 0.09) a
    price per million tokens, with the machine; a folder that never measured it says null."""
    cfg, url, folders = served
    listed = {m["id"]: m for m in http("GET", f"{url}/v1/models").json()["data"]}
    assert listed["vintage"]["serving_cost"] is None and "serving_cost" not in listed["auto"]
    for d in DOMAINS:
        cost = listed[d]["serving_cost"]
        stored = json.loads((folders[d] / "slmfactory.json").read_text())["serving_rates"]
        assert cost["price_per_device_hour"] == 0.09 and cost["threads"] == 1
        assert "cores" in cost["measured_on"] and cost["measured_at"] == stored["machine"]["measured"]
        for task in ("generate", "score"):
            rate = stored[f"{task}_tokens_per_s"]
            assert rate > 0 and cost[task]["tokens_per_s"] == pytest.approx(rate, abs=1e-3)
            hours = 1e6 / rate / 3600
            assert cost[task]["device_hours_per_million_tokens"] == pytest.approx(hours)
            assert cost[task]["price_per_million_tokens"] == pytest.approx(hours * 0.09)


def test_streaming_matches_the_whole_completion(served):
    _, url, _ = served
    c = client(url)
    whole = c.completions.create(model="religion", prompt="And the Lord said", max_tokens=8, temperature=0)
    chunks = list(c.completions.create(model="religion", prompt="And the Lord said", max_tokens=8, temperature=0,
                                       stream=True))
    assert "".join(ch.choices[0].text for ch in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_seeded_and_stopped_completions_inside_a_busy_mixed_batch(served):
    """Through the Serve app with the openai client: a seeded completion sent while other
    requests (other lengths, settings, domains, some streamed) are generating shares
    their batch (its Server-Timing ``batch`` counts the rows) and gives the text it gives
    alone; a completion with a stop string ends at the stop while a greedy twin without
    it, in the same batch, goes on to its own end."""
    from concurrent.futures import ThreadPoolExecutor

    _, url, _ = served
    c = client(url)
    no_eos = {"0": -100}  # the tokenizer's eos: completions run to max_tokens
    seeded = dict(model="legal", prompt="The licence grants", max_tokens=12, temperature=1.0, top_p=0.9, seed=11)
    want = c.completions.create(**seeded).choices[0].text
    # Seeded too (a trained tiny model's greedy text repeats one token): varied, reproducible.
    greedy = dict(model="legal", prompt="And the", max_tokens=16, temperature=1.0, seed=3, logit_bias=no_eos)
    full = c.completions.create(**greedy).choices[0].text
    stop = next(full[i:i + 2] for i in range(len(full) // 3, len(full) - 1)
                if full[i:i + 2].strip() and full.index(full[i:i + 2]) == i)

    def busy(i: int):
        body = dict(model=("legal", "religion")[i % 2], prompt="Whereas " * (1 + i), max_tokens=30 + i,
                    temperature=(0, 0.7, 1.3)[i % 3], logit_bias=no_eos)
        if i % 4 == 0:
            return "".join(ch.choices[0].text for ch in c.completions.create(**body, stream=True))
        return c.completions.create(**body).choices[0].text

    for _ in range(5):  # until the seeded request shared its steps with others (a loaded machine may not)
        with ThreadPoolExecutor(9) as pool:
            others = [pool.submit(busy, i) for i in range(6)]
            time.sleep(0.5)
            got = pool.submit(lambda: c.completions.with_raw_response.create(**seeded))
            cut = pool.submit(lambda: c.completions.create(**greedy, stop=[stop]))
            twin = pool.submit(lambda: c.completions.create(**greedy))
            raw = got.result()
            assert all(isinstance(o.result(), str) for o in others)
        rows = int(raw.headers["server-timing"].rpartition('batch;desc="')[2].rstrip('"'))
        assert raw.parse().choices[0].text == want
        assert cut.result().choices[0].text == full[:full.index(stop)]
        assert cut.result().choices[0].finish_reason == "stop"
        assert twin.result().choices[0].text == full and twin.result().choices[0].finish_reason == "length"
        if rows > 2:
            break
    assert rows > 2


def test_echo_with_logprobs(served):
    _, url, _ = served
    r = client(url).completions.create(model="legal", prompt="Permission is hereby granted", max_tokens=3,
                                       temperature=0, echo=True, logprobs=2)
    ch = r.choices[0]
    assert ch.text.startswith("Permission is hereby granted")
    lp = ch.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == r.usage.prompt_tokens + r.usage.completion_tokens
    assert lp.token_logprobs[0] is None and all(v <= 0 for v in lp.token_logprobs[1:])
    assert all(len(t) == 2 for t in lp.top_logprobs[1:])
    assert "".join(lp.tokens) == ch.text


def test_score_equals_the_projects_own_evaluation(served):
    import numpy as np
    from transformers import AutoModelForCausalLM

    from slmfactory.data.tokens.streams import split_tokens
    from slmfactory.models.train.evaluation import evaluate_nll
    from slmfactory.data.tokens.tokenizer import ensure_tokenizer, load_tokenizer

    cfg, url, folders = served
    tok = load_tokenizer(ensure_tokenizer(cfg))
    seq = cfg.data.seq_len
    stream = split_tokens(cfg, "legal", "test")
    # Two full context windows of real test text that survive decode -> encode unchanged.
    for start in range(0, len(stream) - 2 * seq, 7):
        ids = [int(t) for t in stream[start:start + 2 * seq]]
        text = tok.decode(ids)
        if tok(text, add_special_tokens=False)["input_ids"] == ids and tok.eos_token_id not in ids:
            break
    r = http("POST", f"{url}/v1/score", json_body={"model": "legal", "input": text}).json()
    model = AutoModelForCausalLM.from_pretrained(folders["legal"]).eval()
    s, n = evaluate_nll(model, np.asarray(ids, dtype=np.int32), seq)
    got = r["data"][0]
    assert got["token_ids"] == ids and got["num_scored"] == n
    # Same windows, same tokens: equal up to float32 summation order (the replica runs one
    # thread, this process several), i.e. a relative 1e-5, not a fixed number of decimals.
    assert got["perplexity"] == pytest.approx(math.exp(s / n), rel=1e-5)
    assert got["token_logprobs"][0] is None and got["token_logprobs"][seq] is None


def test_auto_routes_test_prompts_to_their_own_domain(served):
    from slmfactory.data.corpus.store import iter_texts

    from slmfactory.data.tokens.tokenizer import ensure_tokenizer, load_tokenizer

    cfg, url, _ = served
    tok = load_tokenizer(ensure_tokenizer(cfg))
    c = client(url)
    hits = total = 0
    for d in DOMAINS:
        for text in list(iter_texts(cfg.corpus_dir, d, "test"))[:6]:
            prompt = tok.decode(tok(text, add_special_tokens=False)["input_ids"][:48])  # fits the 64-token context
            r = c.completions.create(model="auto", prompt=prompt, max_tokens=1, temperature=0)
            total += 1
            hits += r.model == d
            assert r.model_extra["slmfactory"]["routed_to"] == r.model
    assert hits / total >= 0.8, (hits, total)


def test_auto_routes_each_prompt_to_the_domain_whose_own_model_scores_it_best(served):
    """Decided by what the test controls, not by how good the tiny models are: for every
    prompt (each served domain's held-out test documents, and generic text no domain was
    built for), the domain the app answers with is the argmin of the mean NLLs per token
    that ``engine.route_nlls`` computes in this process with the same model folders, and
    the answer reports the choice and every candidate's NLL. The broken `vintage` folder is
    no candidate; long texts are routed by their two ends (``engine.route_ids``)."""
    from slmfactory.data.corpus.store import iter_texts
    from slmfactory.serving import engine

    cfg, url, folders = served
    models = {d: engine.load(str(f)) for d, f in folders.items()}
    k = cfg.serving.route_tokens
    # Pieces of 600 characters of the held-out documents (the tiny corpus holds one or two per
    # domain) and of generic text, and one long generic text (over 2 (k + 2) x the longest
    # token's bytes: tokenised at its two ends only).
    parts = [(d, "test") for d in DOMAINS] + [("generic", "valid")]
    texts = [t[i:i + 600] for part, split in parts for t in iter_texts(cfg.corpus_dir, part, split)
             for i in range(0, len(t) - 200, 600)]
    texts.append("\n\n".join(iter_texts(cfg.corpus_dir, "generic", "train"))[:3 * (k + 2) * 16])
    assert len(texts[-1]) > 2 * (k + 2) * models["legal"].max_token_bytes and len(texts) >= 10
    picked = set()
    for text in texts:
        want = engine.route_nlls(models, text, k)
        best = min(want, key=lambda d: want[d]["nll"])
        r = http("POST", f"{url}/v1/score", json_body={"model": "auto", "input": text})
        assert r.status_code == 200, r.text[:300]
        body = r.json()
        info = body["slmfactory"]
        assert body["model"] == info["routed_to"] and info["by"] == "nll" and info["unit"] == "token"
        assert set(info["nll"]) == set(DOMAINS)  # vintage does not load: no candidate
        for d in DOMAINS:  # the replica's numbers are this process's (float32 summation order aside)
            assert info["nll"][d] == pytest.approx(want[d]["nll"], rel=1e-4, abs=1e-5)
        assert info["scored_tokens"] == want[body["model"]]["tokens"] <= k
        # The argmin, up to summation order where two domains tie within it.
        assert want[body["model"]]["nll"] <= want[best]["nll"] + 1e-4, (text[:80], info, best)
        picked.add(body["model"])
    assert picked == set(DOMAINS)  # both candidates won somewhere: not a constant answer
    # A completion and a chat completion report the routing the same way.
    tok = tokenizer_of(cfg)
    prompt = tok.decode(tok(texts[0], add_special_tokens=False)["input_ids"][:40])
    want = engine.route_nlls(models, prompt, k)
    best = min(want, key=lambda d: want[d]["nll"])
    c = client(url)
    r = c.completions.create(model="auto", prompt=prompt, max_tokens=1, temperature=0)
    assert r.model == r.model_extra["slmfactory"]["routed_to"] == best
    chat = c.chat.completions.create(model="auto", messages=[{"role": "user", "content": prompt}], max_tokens=1)
    assert chat.model == chat.model_extra["slmfactory"]["routed_to"] == best  # routed by the messages' text


def test_bad_requests_get_4xx_with_an_error_body_and_the_server_keeps_serving(served):
    _, url, _ = served
    ok = {"model": "legal", "prompt": "The licence", "max_tokens": 2}
    cases = [
        (b"{not json", 400, None),
        (b"[1, 2]", 400, None),
        (json.dumps({"prompt": "x"}).encode(), 400, "model"),
        (json.dumps({**ok, "model": "atlantis"}).encode(), 404, "model"),
        (json.dumps({**ok, "prompt": 42}).encode(), 400, "prompt"),
        (json.dumps({**ok, "prompt": ""}).encode(), 400, "prompt"),
        (json.dumps({**ok, "prompt": []}).encode(), 400, "prompt"),
        (json.dumps({**ok, "max_tokens": 0}).encode(), 400, "max_tokens"),
        (json.dumps({**ok, "max_tokens": "many"}).encode(), 400, "max_tokens"),
        (json.dumps({**ok, "max_tokens": 10 ** 9}).encode(), 400, "max_tokens"),
        (b'{"model": "legal", "prompt": "x", "temperature": NaN}', 400, "temperature"),
        ("{\"model\": \"legal\", \"prompt\": \"caf\xe9\"}".encode("latin-1"), 400, None),
        (json.dumps({**ok, "n": 1000}).encode(), 400, "n"),
        (json.dumps({**ok, "top_p": 0}).encode(), 400, "top_p"),
        (json.dumps({**ok, "stop": ["a", "b", "c", "d", "e"]}).encode(), 400, "stop"),
        (json.dumps({**ok, "logprobs": 9}).encode(), 400, "logprobs"),
        (json.dumps({**ok, "echo": "yes"}).encode(), 400, "echo"),
        (json.dumps({**ok, "prompt": "word " * 200}).encode(), 400, "max_tokens"),
        (json.dumps({**ok, "prompt": "x" * (2 << 20)}).encode(), 413, None),
        (json.dumps({**ok, "stream": True, "n": 2}).encode(), 400, "stream"),
    ]
    for body, status, param in cases:
        r = http("POST", f"{url}/v1/completions", body)
        assert r.status_code == status, (body[:80], r.status_code, r.text[:300])
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"], err
        assert err["param"] == param, (body[:80], err)
    unknown = http("POST", f"{url}/v1/completions", json_body={**ok, "model": "atlantis"}).json()
    assert "legal" in unknown["error"]["message"] and "religion" in unknown["error"]["message"]
    for body, status in ((json.dumps({"model": "legal", "input": "a"}), 400), (json.dumps({"model": "legal"}), 400)):
        r = http("POST", f"{url}/v1/score", body.encode())
        assert r.status_code == status and "error" in r.json()
    # A model folder that cannot load: 503 naming its domain, and the others keep serving.
    broken = http("POST", f"{url}/v1/completions", json_body={**ok, "model": "vintage"})
    assert broken.status_code == 503 and "'vintage'" in broken.json()["error"]["message"]
    assert http("POST", f"{url}/v1/completions", json_body=ok).status_code == 200
    health = http("GET", f"{url}/healthz").json()
    assert health["status"] == "ok" and "vintage" in health["failed"]


@pytest.fixture(scope="module")
def silent(served):
    """A run-time domain "silent": the legal model with a zero final norm, so that every
    logit is exactly 0 whatever the input. Greedy decoding takes id 0, the tokenizer's
    eos; a request's ``logit_bias`` alone sets the logits, so what each penalty does to
    them decides the output by construction."""
    from safetensors.torch import load_file, save_file
    from transformers import PreTrainedTokenizerFast

    from slmfactory.serving.domains.store import DomainStore

    cfg, _, folders = served
    folder = cfg.root / "silent-model"
    shutil.copytree(folders["legal"], folder)
    weights = load_file(folder / "model.safetensors")
    weights["model.norm.weight"].zero_()
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    assert PreTrainedTokenizerFast.from_pretrained(folder).eos_token_id == 0
    DomainStore(cfg.root).publish("silent", {"path": str(folder), "strategy": "slm", "params": 1, "test_ppl": 1.0})
    return "silent"


def test_an_empty_completion_is_answered_not_a_500(served, silent):
    """A model whose first greedy token is eos answers an empty text, whole or streamed
    (Ray's token counter rejects an increment of 0: it turned such an answer into a 500)."""
    _, url, _ = served
    c = client(url)
    r = c.completions.create(model=silent, prompt="The licence grants", max_tokens=6, temperature=0)
    assert r.choices[0].text == "" and r.usage.completion_tokens == 0 and r.choices[0].finish_reason == "stop"
    chunks = list(c.completions.create(model=silent, prompt="The licence grants", max_tokens=6, temperature=0,
                                       stream=True))
    assert "".join(ch.choices[0].text for ch in chunks) == "" and chunks[-1].choices[0].finish_reason == "stop"


# -- chat, streams, sampling parameters, refusals -------------------------------------------

MESSAGES = [{"role": "system", "content": "Answer as a contract would."},
            {"role": "user", "content": "The licence grants"}]
CHAT_PROMPT = "system: Answer as a contract would.\nuser: The licence grants\nassistant:"
"""``MESSAGES`` through the default ``serving.chat_template`` (docs/serving-api.md#chat)."""


def tokenizer_of(cfg):
    from slmfactory.data.tokens.tokenizer import ensure_tokenizer, load_tokenizer

    return load_tokenizer(ensure_tokenizer(cfg))


def test_chat_completions_whole_and_streamed_with_usage_and_logprobs(served):
    """The chat route on a base model: the messages become ``role: content`` lines and
    ``assistant:``, which the model completes as /v1/completions completes that prompt;
    usage counts that prompt; each token comes with its log-prob, bytes and alternatives;
    the stream sends the same text and log-probs, and the usage last when asked."""
    cfg, url, _ = served
    c = client(url)
    args = dict(model="legal", messages=MESSAGES, max_tokens=6, temperature=0, logprobs=True, top_logprobs=2)
    r = c.chat.completions.create(**args)
    ch = r.choices[0]
    assert r.object == "chat.completion" and ch.message.role == "assistant" and ch.finish_reason in ("stop", "length")
    same = c.completions.create(model="legal", prompt=CHAT_PROMPT, max_tokens=6, temperature=0)
    assert ch.message.content == same.choices[0].text
    assert r.usage.prompt_tokens == len(tokenizer_of(cfg)(CHAT_PROMPT, add_special_tokens=False)["input_ids"])
    assert r.usage.completion_tokens == same.usage.completion_tokens
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    content = ch.logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert b"".join(bytes(t.bytes) for t in content).decode() == ch.message.content
    for t in content:  # greedy: each token is its step's most likely one
        assert t.logprob <= 0 and len(t.top_logprobs) == 2 and t.top_logprobs[0].token == t.token
        assert t.top_logprobs[0].logprob == pytest.approx(t.logprob, abs=1e-5)
    chunks = list(c.chat.completions.create(**args, stream=True, stream_options={"include_usage": True}))
    body, last = chunks[:-1], chunks[-1]
    assert body[0].choices[0].delta.role == "assistant" and body[0].object == "chat.completion.chunk"
    assert last.choices == [] and last.usage == r.usage and all(k.usage is None for k in body)
    assert "".join(k.choices[0].delta.content or "" for k in body) == ch.message.content
    assert body[-1].choices[0].finish_reason == ch.finish_reason
    streamed = [t for k in body if k.choices[0].logprobs for t in k.choices[0].logprobs.content]
    assert [t.token for t in streamed] == [t.token for t in content]
    assert [t.logprob for t in streamed] == pytest.approx([t.logprob for t in content], abs=1e-5)
    plain = list(c.chat.completions.create(model="legal", messages=MESSAGES, max_tokens=6, temperature=0,
                                           stream=True))
    assert all(k.usage is None and k.choices for k in plain)  # no usage chunk unless asked for
    assert "".join(k.choices[0].delta.content or "" for k in plain) == ch.message.content
    two = [c.chat.completions.create(model="legal", messages=MESSAGES, max_tokens=6, n=2, seed=3) for _ in range(2)]
    assert [k.index for k in two[0].choices] == [0, 1]
    assert [k.message.content for k in two[0].choices] == [k.message.content for k in two[1].choices]


def test_completion_streams_carry_logprobs_and_the_usage_last(served):
    _, url, _ = served
    c = client(url)
    args = dict(model="religion", prompt="And the Lord said", max_tokens=8, temperature=0, logprobs=2)
    whole = c.completions.create(**args)
    chunks = list(c.completions.create(**args, stream=True, stream_options={"include_usage": True}))
    body, last = chunks[:-1], chunks[-1]
    assert last.choices == [] and last.usage == whole.usage and all(k.usage is None for k in body)
    assert "".join(k.choices[0].text for k in body) == whole.choices[0].text
    got = [k.choices[0].logprobs for k in body if k.choices[0].logprobs]
    assert [t for lp in got for t in lp.tokens] == whole.choices[0].logprobs.tokens
    assert [v for lp in got for v in lp.token_logprobs] == pytest.approx(whole.choices[0].logprobs.token_logprobs,
                                                                         abs=1e-5)
    assert [t for lp in got for t in lp.top_logprobs] == [
        pytest.approx(t, abs=1e-5) for t in whole.choices[0].logprobs.top_logprobs]


def test_each_sampling_parameter_changes_the_output_where_it_should(served, silent):
    """On the silent model (every logit 0) the request's ``logit_bias`` sets the logits,
    so each penalty's effect on a greedy completion is known exactly: unpenalised, the
    most biased token A repeats; repetition_penalty 100 removes every repeat;
    presence_penalty 0.8 and frequency_penalty 0.4 give each its own sequence, and a
    prompt token counts for repetition_penalty only. On the trained model: top_k=1
    samples the greedy completion, and logit_bias +100 forces its token."""
    cfg, url, _ = served
    c = client(url)
    tok = tokenizer_of(cfg)
    prompt = tok("The licence grants", add_special_tokens=False)["input_ids"]
    a, b, d, e = [i for i in range(2, len(tok)) if i not in prompt and tok.decode([i]).strip().isalpha()][:4]

    def greedy(bias: dict, prompt=prompt, **kw) -> str:
        r = c.completions.create(model=silent, prompt=prompt, max_tokens=4, temperature=0,
                                 logit_bias={str(t): v for t, v in bias.items()}, **kw)
        return r.choices[0].text

    four = {a: 3, b: 2, d: 1.5, e: 1}
    assert greedy(four) == tok.decode([a, a, a, a])  # a repeated phrase: every n-gram repeats
    assert greedy(four, extra_body={"repetition_penalty": 100}) == tok.decode([a, b, d, e])  # no repeat at all
    two = {a: 1.0, b: 0.5}
    assert greedy(two) == tok.decode([a, a, a, a])
    # presence: A's logit 1 - 0.8 once it occurs; frequency: 1 - 0.4 per occurrence.
    assert greedy(two, presence_penalty=0.8) == tok.decode([a, b, a, a])
    assert greedy(two, frequency_penalty=0.4) == tok.decode([a, a, b, a])
    assert greedy(two, prompt=prompt + [a], presence_penalty=0.8) == tok.decode([a, b, a, a])  # prompt not counted
    assert greedy(two, prompt=prompt + [a], extra_body={"repetition_penalty": 4}) == tok.decode([b, a, a, a])

    text = "The licence grants"
    want = c.completions.create(model="legal", prompt=text, max_tokens=8, temperature=0).choices[0].text
    top1 = c.completions.create(model="legal", prompt=text, max_tokens=8, temperature=1.0, n=2, extra_body={"top_k": 1})
    assert [ch.text for ch in top1.choices] == [want, want]
    chat = dict(model="legal", messages=MESSAGES, max_tokens=5)
    assert (c.chat.completions.create(**chat, temperature=1.0, extra_body={"top_k": 1}).choices[0].message.content
            == c.chat.completions.create(**chat, temperature=0).choices[0].message.content)
    for t in (0, 1.0):
        forced = c.completions.create(model="legal", prompt=text, max_tokens=5, temperature=t, logit_bias={str(e): 100})
        assert forced.choices[0].text == tok.decode([e] * 5)
        forced = c.chat.completions.create(**chat, temperature=t, logit_bias={str(e): 100})
        assert forced.choices[0].message.content == tok.decode([e] * 5)


def test_unsupported_parameters_are_400s_naming_them_and_unknown_fields_a_header(served):
    import openai

    _, url, _ = served
    c = client(url)
    msgs = [{"role": "user", "content": "The licence"}]
    chat = dict(model="legal", messages=msgs, max_tokens=2)
    refused = [
        (lambda: c.completions.create(model="legal", prompt="x", max_tokens=2, best_of=3), "best_of"),
        (lambda: c.completions.create(model="legal", prompt="x", max_tokens=2, suffix="end."), "suffix"),
        (lambda: c.completions.create(model="legal", prompt="x", max_tokens=2, logit_bias={"99999": 5}),
         "logit_bias"),
        (lambda: c.completions.create(model="legal", prompt="x", max_tokens=2,
                                      stream_options={"include_usage": True}), "stream_options"),
        (lambda: c.chat.completions.create(**chat, tools=[{"type": "function", "function": {"name": "f"}}]),
         "tools"),
        (lambda: c.chat.completions.create(**chat, tool_choice="required"), "tool_choice"),
        (lambda: c.chat.completions.create(**chat, response_format={"type": "json_object"}), "response_format"),
        (lambda: c.chat.completions.create(**chat, reasoning_effort="low"), "reasoning_effort"),
        (lambda: c.chat.completions.create(**chat, modalities=["text", "audio"]), "modalities"),
        (lambda: c.chat.completions.create(**chat, store=True), "store"),
        (lambda: c.chat.completions.create(**chat, top_logprobs=2), "top_logprobs"),
        (lambda: c.chat.completions.create(model="legal", max_tokens=2, messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}]),
         "messages"),
        (lambda: c.chat.completions.create(model="legal", max_tokens=2, messages=[
            {"role": "tool", "content": "42", "tool_call_id": "call-1"}]), "messages"),
    ]
    for call, param in refused:
        with pytest.raises(openai.BadRequestError) as e:
            call()
        assert e.value.param == param and param in e.value.message, (param, e.value.message)
    raw = c.chat.completions.with_raw_response.create(**chat, temperature=0, user="u-1", metadata={"k": "v"},
                                                      extra_body={"min_tokens": 1, "guided_json": {}})
    assert raw.headers["x-slmfactory-ignored-fields"] == "guided_json,min_tokens"
    assert raw.parse().choices[0].message.role == "assistant"
    with c.completions.with_streaming_response.create(model="legal", prompt="x", max_tokens=2, stream=True,
                                                      extra_body={"ignore_eos": True}) as streamed:
        assert streamed.headers["x-slmfactory-ignored-fields"] == "ignore_eos"
    plain = c.completions.with_raw_response.create(model="legal", prompt="x", max_tokens=2, temperature=0)
    assert "x-slmfactory-ignored-fields" not in plain.headers
