"""Ray Serve endpoints against a locally started app, with the real `openai` client: the
models of two domains trained on the committed sample, `auto` routing by content, scores
equal to the project's own evaluation, and a dozen malformed requests answered 4xx."""

from __future__ import annotations

import json
import math
import shutil
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
    from slmfactory.data.cluster_pipeline import run_clustering
    from slmfactory.platform.config import load_config
    from slmfactory.platform.runtime import init_ray

    work = tmp_path_factory.mktemp("serving") / "work"
    shutil.copytree(tiny_root, work)
    tiny = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
    overrides = {"workdir": str(work), "serving.replica_cpus": 0.5}
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
    """A raw HTTP answer (stdlib only): status and parsed JSON body."""

    def __init__(self, status: int, raw: bytes):
        self.status_code, self.text = status, raw.decode("utf-8", "replace")

    def json(self):
        return json.loads(self.text)


def http(method: str, url: str, body: bytes | None = None, json_body=None) -> Reply:
    import urllib.error
    import urllib.request

    data = json.dumps(json_body).encode() if json_body is not None else body
    req = urllib.request.Request(url, data=data, method=method, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return Reply(r.status, r.read())
    except urllib.error.HTTPError as e:
        return Reply(e.code, e.read())


def client(url):
    from openai import OpenAI

    return OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


def test_models_and_completions_for_two_domains(served):
    cfg, url, _ = served
    c = client(url)
    ids = {m.id for m in c.models.list().data}
    assert ids == {"legal", "religion", "vintage", "auto"}
    for d in DOMAINS:
        r = c.completions.create(model=d, prompt="The licence grants", max_tokens=6, temperature=0)
        assert r.model == d and len(r.choices) == 1 and isinstance(r.choices[0].text, str)
        assert r.choices[0].finish_reason in ("stop", "length") and r.usage.prompt_tokens > 0
        again = c.completions.create(model=d, prompt="The licence grants", max_tokens=6, temperature=0)
        assert again.choices[0].text == r.choices[0].text  # greedy is deterministic
    seeded = [c.completions.create(model="legal", prompt="The", max_tokens=6, temperature=1.0, seed=7, n=2)
              for _ in range(2)]
    assert [ch.text for ch in seeded[0].choices] == [ch.text for ch in seeded[1].choices]
    assert len(seeded[0].choices) == 2


def test_streaming_matches_the_whole_completion(served):
    _, url, _ = served
    c = client(url)
    whole = c.completions.create(model="religion", prompt="And the Lord said", max_tokens=8, temperature=0)
    chunks = list(c.completions.create(model="religion", prompt="And the Lord said", max_tokens=8, temperature=0,
                                       stream=True))
    assert "".join(ch.choices[0].text for ch in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


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

    from slmfactory.data.tokens import split_tokens
    from slmfactory.models.trainer import evaluate_nll
    from slmfactory.data.tokenizer import ensure_tokenizer, load_tokenizer

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
    from slmfactory.data.corpus import iter_texts

    from slmfactory.data.tokenizer import ensure_tokenizer, load_tokenizer

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


def test_an_empty_completion_is_answered_not_a_500(served):
    """A model whose first greedy token is eos answers an empty text, whole or streamed
    (Ray's token counter rejects an increment of 0: it turned such an answer into a 500)."""
    from safetensors.torch import load_file, save_file
    from transformers import PreTrainedTokenizerFast

    from slmfactory.serving.domains import DomainStore

    cfg, url, folders = served
    silent = cfg.root / "silent-model"
    shutil.copytree(folders["legal"], silent)
    weights = load_file(silent / "model.safetensors")
    # A zero final norm makes every logit 0: greedy decoding takes id 0, the tokenizer's eos.
    weights["model.norm.weight"].zero_()
    save_file(weights, silent / "model.safetensors", metadata={"format": "pt"})
    assert PreTrainedTokenizerFast.from_pretrained(silent).eos_token_id == 0
    DomainStore(cfg.root).publish("silent", {"path": str(silent), "strategy": "slm", "params": 1,
                                                "test_ppl": 1.0})
    c = client(url)
    r = c.completions.create(model="silent", prompt="The licence grants", max_tokens=6, temperature=0)
    assert r.choices[0].text == "" and r.usage.completion_tokens == 0 and r.choices[0].finish_reason == "stop"
    chunks = list(c.completions.create(model="silent", prompt="The licence grants", max_tokens=6, temperature=0,
                                       stream=True))
    assert "".join(ch.choices[0].text for ch in chunks) == "" and chunks[-1].choices[0].finish_reason == "stop"
