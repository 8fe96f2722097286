"""Instant specialisation: a new domain's plain SLM from a handful of documents with no
gradient step (histogram-mixed projected network / hard mixture, or the most frequent
expert), served at once by the real Ray Serve app, fine-tuned on Ray Train and swapped in
without a failed request; bad requests answered 4xx while the other domains keep serving."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.local_cluster import serving_app

pytestmark = [pytest.mark.ray, pytest.mark.server]  # these start Ray Serve

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


def _tiny_llama(seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
                                        tie_word_embeddings=True))


def _mlp(model) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if ".mlp." in k}


# -- the instantiation rules ---------------------------------------------------------------

def test_histogram_mixed_projection_is_the_expert_when_one_hot_and_linear_otherwise():
    from slmfactory.models.arch.projected import ProjectedLlama

    pn = ProjectedLlama(_tiny_llama(0).config, n_experts=4, expert_dim=3, capacity=5, seed=1)
    for c in range(4):
        one_hot = torch.zeros(4)
        one_hot[c] = 1.0
        mixed, expert = _mlp(pn.instantiate(one_hot)), _mlp(pn.instantiate(c))
        assert all(torch.equal(mixed[k], expert[k]) for k in expert), c  # bitwise
        assert torch.equal(pn.expert_vector(one_hot), pn.expert_vectors[c])
    # E_domain = h @ E, and W is linear in the expert vector: W(h) = Σ_c h_c W(c).
    h = torch.tensor([0.5, 0.25, 0.0, 0.25])
    assert torch.allclose(pn.expert_vector(h), h @ pn.expert_vectors)
    mixed = _mlp(pn.instantiate(h))
    experts = [_mlp(pn.instantiate(c)) for c in range(4)]
    for k in mixed:
        assert torch.allclose(mixed[k], sum(float(h[c]) * experts[c][k] for c in range(4)), atol=1e-6)
    with pytest.raises(ValueError, match="mixing vector"):
        pn.instantiate(torch.ones(3) / 3)


def test_histogram_weighted_average_is_the_expert_when_one_hot():
    from slmfactory.models.instant import mixed_state

    states = [_tiny_llama(s).state_dict() for s in range(3)]
    got = mixed_state(states, [0.0, 1.0, 0.0])
    assert all(torch.equal(got[k], states[1][k]) for k in states[1])  # bitwise
    avg = mixed_state(states, [0.5, 0.25, 0.25])
    for k in states[0]:
        assert torch.allclose(avg[k], 0.5 * states[0][k] + 0.25 * states[1][k] + 0.25 * states[2][k], atol=1e-6)


def test_documents_are_split_into_training_and_held_out_slices(tiny_cfg):
    from slmfactory.models.instant import histogram_windows, split_documents
    from slmfactory.data.corpus.store import iter_texts
    from slmfactory.platform.errors import DataError
    from slmfactory.data.tokens.tokenizer import ensure_tokenizer, load_tokenizer

    tok = load_tokenizer(ensure_tokenizer(tiny_cfg))
    texts = list(iter_texts(tiny_cfg.corpus_dir, "legal", "train"))[:10]
    docs = split_documents(tiny_cfg, texts, tok)
    assert docs.train_texts == tuple(t for i, t in enumerate(texts) if i not in (4, 9))  # every fifth held out
    assert len(docs.heldout) == sum(len(tok(texts[i])["input_ids"]) + 1 for i in (4, 9))
    assert split_documents(tiny_cfg, texts, tok).digest == docs.digest
    one = split_documents(tiny_cfg, texts[:1], tok)  # a single document: its tail fifth
    assert len(one.train) > len(one.heldout) >= 2
    windows = histogram_windows(tiny_cfg, docs.train_texts, tok)
    assert 0 < len(windows) <= 2 * len(docs.train_texts)
    with pytest.raises(DataError, match="documents"):
        split_documents(tiny_cfg, [], tok)
    with pytest.raises(DataError, match="documents"):
        split_documents(tiny_cfg, ["a b"], tok)


# -- the served app ----------------------------------------------------------------------

def http(method: str, url: str, body: bytes | None = None, json_body=None):
    import urllib.error
    import urllib.request

    data = json.dumps(json_body).encode() if json_body is not None else body
    req = urllib.request.Request(url, data=data, method=method, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


# The demo's shape: its SLM preset (tied embeddings, as every preset) and its slm-pn / slm-mix
# settings (tiny.yaml's are the demo's), on the sample corpus with a few steps.
OVERRIDES = {"slm.preset": "mini-slm", "serving.replica_cpus": 0.5, "serving.max_domains": 8, "serving.max_request_bytes": 256 << 10, "pretrain.max_tokens": 16 * 8 * 64, "pretrain.eval_every": 8,
             "pretrain.checkpoint_every": 8, "finetune.max_tokens": 8 * 8 * 64, "finetune.eval_every": 4}


@pytest.fixture(scope="module")
def app(tiny_root, tmp_path_factory):
    """(cfg, url, overrides): the generic phases of slm-pn and slm-mix trained on the sample,
    one start-up domain (`legal`, plain `slm`), and the app on loopback."""
    import ray

    from slmfactory.models.instant import generic_families
    from slmfactory.pipeline import run_trial
    from slmfactory.platform.config import load_config
    from slmfactory.platform.runtime import init_ray

    work = tmp_path_factory.mktemp("instant") / "work"
    shutil.copytree(tiny_root, work)
    overrides = {"workdir": str(work), **OVERRIDES}
    cfg = load_config(TINY, overrides)
    run_trial(cfg.replace(**{"data.domain": "legal"}), log=None)
    init_ray(num_cpus=2)
    try:
        generic_families(cfg, train=True)  # clustering (Ray Data) + the two generic phases
        with serving_app(TINY, overrides, work / "models") as url:
            yield cfg, url, overrides
    finally:
        ray.shutdown()


def _docs(cfg, domain: str, n: int) -> list[str]:
    from slmfactory.data.corpus.store import iter_texts

    return [t[:3000] for t in list(iter_texts(cfg.corpus_dir, domain, "train"))[:n]]


def _complete(url: str, model: str):
    return http("POST", f"{url}/v1/completions", json_body={"model": model, "prompt": "The", "max_tokens": 4,
                                                            "temperature": 0})


@pytest.mark.timeout(900)
def test_a_new_domain_is_served_at_once_from_its_documents(app):
    from openai import OpenAI

    cfg, url, _ = app
    status, body = http("POST", f"{url}/v1/domains", json_body={"name": "psalms", "documents": _docs(cfg, "religion", 12)})
    assert status == 201, body
    cands = body["candidates"]
    assert set(cands) == {"pn-histogram", "pn-most-frequent", "mix-histogram", "mix-most-frequent"}
    assert body["chosen"] == min(cands, key=lambda r: cands[r]["heldout_ppl"])
    assert body["heldout_ppl"] == cands[body["chosen"]]["heldout_ppl"] and body["version"] == 1
    for fam in ("pn", "mix"):
        assert len(body["histogram"][fam]) == 4 and abs(sum(body["histogram"][fam]) - 1) < 1e-9
    client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
    r = client.completions.create(model="psalms", prompt="And the Lord said", max_tokens=6, temperature=0)
    again = client.completions.create(model="psalms", prompt="And the Lord said", max_tokens=6, temperature=0)
    assert again.choices[0].text == r.choices[0].text
    assert {"psalms", "legal"} <= {m.id for m in client.models.list().data}
    # The served folder is the chosen candidate: the app generates and scores as the model
    # does in-process. (Whether a 2-layer model's first greedy token is eos depends on the
    # machine's numerics, so the answer is compared with the model's own, not with "> 0".)
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from slmfactory.models.instant import MAX_HELDOUT_TOKENS, split_documents, tokens_nll
    from slmfactory.serving.domains.store import DomainStore

    entry = DomainStore(cfg.root).get("psalms")
    model = AutoModelForCausalLM.from_pretrained(entry["path"]).eval()
    tok = PreTrainedTokenizerFast.from_pretrained(entry["path"])
    prompt = torch.tensor([tok("And the Lord said", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        new = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6,
                             do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id
                             )[0, prompt.shape[1]:].tolist()
    new = new[:new.index(tok.eos_token_id)] if tok.eos_token_id in new else new
    assert r.model == "psalms" and r.usage.completion_tokens == len(new) and r.choices[0].text == tok.decode(new)
    docs = split_documents(cfg, _docs(cfg, "religion", 12))
    s, n = tokens_nll(model, docs.heldout[:MAX_HELDOUT_TOKENS], cfg.data.seq_len)
    assert np.exp(s / n) == pytest.approx(body["heldout_ppl"], rel=1e-4)


@pytest.mark.timeout(600)
def test_a_new_domain_reports_the_served_domains_perplexity_on_its_held_out_text(app):
    """Documents of a served domain (`legal`) made a new domain: the 201 and /v1/models
    give, beside the new domain's held-out perplexity, the served `legal` model's on the
    same held-out split (as the project's evaluation computes it), and name it in
    ``better_served_by`` exactly when it is lower. With ``serving.register_when_outscored``
    off, such a domain is refused and not registered."""
    import math

    from transformers import AutoModelForCausalLM

    from slmfactory.models.instant import MAX_HELDOUT_TOKENS, generic_families, split_documents, tokens_nll
    from slmfactory.serving.catalog import from_folder
    from slmfactory.serving.domains.runtime import Outscored, compare_served, create_domain
    from slmfactory.serving.domains.store import DomainStore
    from slmfactory.serving.engine import load

    cfg, url, _ = app
    docs = _docs(cfg, "legal", 12)
    status, body = http("POST", f"{url}/v1/domains", json_body={"name": "contracts", "documents": docs})
    assert status == 201, body
    served = body["served_domains"]
    assert set(served) == {"legal"}, served
    legal_path = from_folder(cfg.root / "models")["legal"].path
    legal = AutoModelForCausalLM.from_pretrained(legal_path).eval()
    held = split_documents(cfg, docs).heldout[:MAX_HELDOUT_TOKENS]
    s, n = tokens_nll(legal, held, cfg.data.seq_len, cfg.finetune.batch_size)
    assert served["legal"]["heldout_ppl"] == pytest.approx(math.exp(s / n), rel=1e-4)
    outscored = served["legal"]["heldout_ppl"] < body["heldout_ppl"]
    assert body["better_served_by"] == ("legal" if outscored else None)
    listed = {m["id"]: m for m in http("GET", f"{url}/v1/models")[1]["data"]}
    assert listed["contracts"]["served_domains"] == served
    assert listed["contracts"]["better_served_by"] == body["better_served_by"]
    assert http("DELETE", f"{url}/v1/domains/contracts")[0] == 200
    # The setting, in-process on the same documents and comparison.
    strict = cfg.replace(**{"serving.register_when_outscored": False})
    families = generic_families(strict, train=False)
    tok = load(legal_path).tokenizer
    compare = lambda built: compare_served(built, {"legal": load(legal_path)}, tok,  # noqa: E731
                                           cfg.data.seq_len, cfg.finetune.batch_size)
    if outscored:
        with pytest.raises(Outscored, match="legal"):
            create_domain(strict, "contracts2", docs, families, compare=compare)
        assert DomainStore(cfg.root).get("contracts2") is None
    else:
        entry, _ = create_domain(strict, "contracts2", docs, families, compare=compare)
        assert entry["compared"]["better_served_by"] is None
        assert http("DELETE", f"{url}/v1/domains/contracts2")[0] == 200


@pytest.mark.timeout(600)
def test_bad_domain_requests_get_4xx_and_the_other_domains_keep_serving(app):
    cfg, url, _ = app
    docs = _docs(cfg, "legal", 6)
    ok = {"name": "fresh", "documents": docs}
    cases = [
        ({"name": "fresh"}, 400, "documents", "missing_field"),
        ({**ok, "documents": []}, 400, "documents", "empty_input"),
        ({**ok, "documents": "one text"}, 400, "documents", "invalid_type"),
        ({**ok, "documents": ["  "]}, 400, "documents", "empty_input"),
        ({**ok, "documents": [docs[0], "caf\ufffd cr\ufffdme"]}, 400, "documents", "invalid_encoding"),
        ({**ok, "documents": ["a b"]}, 400, "documents", "invalid_value"),      # two tokens of text
        ({**ok, "name": "no spaces please"}, 400, "name", "invalid_value"),
        ({**ok, "name": "auto"}, 400, "name", "invalid_value"),
        ({**ok, "name": "legal"}, 409, "name", "name_exists"),                # a start-up domain
        ({**ok, "finetune_budget": 3}, 400, "finetune_budget", "invalid_value"),
    ]
    for body, status, param, code in cases:
        got, err = http("POST", f"{url}/v1/domains", json_body=body)
        assert got == status, (body.get("name"), got, err)
        assert err["error"]["param"] == param and err["error"]["code"] == code, err
        assert _complete(url, "legal")[0] == 200
    # Bytes that are not UTF-8 (a latin-1 file pasted as is).
    raw = b'{"name": "fresh", "documents": ["caf\xe9 cr\xe8me br\xfbl\xe9e and more text to read"]}'
    got, err = http("POST", f"{url}/v1/domains", raw)
    assert got == 400 and err["error"]["code"] == "invalid_encoding"
    # Over the size bound: 413 before anything is parsed.
    big = json.dumps({"name": "huge", "documents": ["word " * 52429] * 5}).encode()  # 1.25 MB > 4 x 256 KB
    got, err = http("POST", f"{url}/v1/domains", big)
    assert got == 413 and err["error"]["code"] == "request_too_large"
    # A run-time name is taken once created.
    assert http("POST", f"{url}/v1/domains", json_body=ok)[0] == 201
    got, err = http("POST", f"{url}/v1/domains", json_body=ok)
    assert got == 409 and err["error"]["param"] == "name"
    assert _complete(url, "legal")[0] == 200 and _complete(url, "fresh")[0] == 200
    assert http("GET", f"{url}/v1/domains/atlantis")[0] == 404


@pytest.mark.timeout(900)
def test_finetuning_replaces_the_served_model_without_a_failed_request(app):
    """The outcome is controlled, not left to how a few steps happen to go: every document
    is the same text, so the held-out slice is text the fine-tune trains on and its
    perplexity goes down. The app swaps in version 2 while requests keep coming (none
    fails), and a request shows version 2 answering: its score of that text is the
    fine-tuned model's."""
    cfg, url, _ = app
    budget = 4 * cfg.finetune.batch_size * cfg.data.seq_len
    text = _docs(cfg, "biomedical", 1)[0]
    status, body = http("POST", f"{url}/v1/domains", json_body={"name": "hpo", "documents": [text] * 15,
                                                                "finetune_budget": budget})
    assert status == 201 and body["finetune"]["status"] == "queued", body

    def perplexity() -> float:
        code, r = http("POST", f"{url}/v1/score", json_body={"model": "hpo", "input": text[:1500]})
        assert code == 200, r
        return r["data"][0]["perplexity"]

    failures, answered, stop = [], [], threading.Event()

    def hammer():
        while not stop.is_set():
            code, r = _complete(url, "hpo")
            (answered if code == 200 else failures).append((code, r))

    before = perplexity()  # version 1 (the instant model) answers until the swap
    t = threading.Thread(target=hammer)
    t.start()
    try:
        deadline = time.time() + 600
        while True:
            view = http("GET", f"{url}/v1/domains/hpo")[1]
            if view["finetune"]["status"] not in ("queued", "running"):
                break
            assert time.time() < deadline, view["finetune"]
            time.sleep(2)
        n_at_swap = len(answered)
        while len(answered) < n_at_swap + 2 and not failures:  # requests on the swapped model
            assert time.time() < deadline + 120, "no request answered after the swap"
            time.sleep(0.2)
    finally:
        stop.set()
        t.join(timeout=120)
    assert not failures, failures[:3]
    ft = view["finetune"]
    assert ft["status"] == "done", ft
    assert 1 <= ft["steps"] <= 4 and ft["flops"] > 0
    assert ft["heldout_ppl"] < ft["before_ppl"] and view["heldout_ppl"] == ft["heldout_ppl"]
    assert view["version"] == 2 and view["strategy"].endswith("+finetune")
    after = perplexity()
    assert after < before, (before, after)  # version 2 answered


@pytest.mark.timeout(600)
def test_cli_specialize_registers_in_mlflow_and_the_running_app_serves_it(app, capsys):
    from slmfactory.cli import main
    from slmfactory.data.corpus.store import iter_texts
    from slmfactory.platform.tracking import client_for

    cfg, url, overrides = app
    docs = cfg.root / "new-docs"
    docs.mkdir()
    for i, t in enumerate(list(iter_texts(cfg.corpus_dir, "code", "train"))[:6]):
        (docs / f"{i}.txt").write_text(t[:3000])
    args = ["specialize", "-c", str(TINY), "--docs", str(docs), "--name", "numpydoc",
            *[a for k, v in overrides.items() for a in ("--set", f"{k}={v}")], "--set", "tracking.enabled=true"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "<- served" in out and "registered in MLflow" in out
    assert main(args) == 2  # the name exists now
    assert "already exists" in capsys.readouterr().err
    client = client_for(cfg.replace(**{"tracking.enabled": True}).tracking_uri)
    versions = client.search_model_versions("name='slmfactory-instant-numpydoc'")
    assert len(versions) == 1
    code, r = _complete(url, "numpydoc")  # the app found it in the workdir's registry
    assert code == 200 and r["model"] == "numpydoc"
    bad = cfg.root / "latin1"
    bad.mkdir()
    (bad / "a.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    assert main(["specialize", "-c", str(TINY), "--docs", str(bad), "--name", "latin",
                 "--set", f"workdir={cfg.root}"]) == 2
    assert "not UTF-8" in capsys.readouterr().err


@pytest.mark.timeout(300)
def test_a_projected_network_built_while_another_thread_loads_is_tied(app):
    """``from_pretrained`` turns weight tying off process-wide while it loads; a replica
    builds new domains' models while it loads others (POST /v1/domains answered 500 on the
    demo's workdir: "Missing key(s) in state_dict: base.model.embed_tokens.weight"). Here a
    thread sits inside transformers' own ``no_tie_weights`` (what ``from_pretrained`` does),
    holding the construction lock as a replica's load does, until the build is done or 5 s
    pass: without the lock the projected network is built inside it, untied, and its tied
    weights do not load."""
    from transformers.initialization import no_tie_weights

    from slmfactory.models.instant import generic_families, pn_model
    from slmfactory.models.arch.lm import CONSTRUCTION_LOCK

    cfg, _, _ = app
    fam = generic_families(cfg)["pn"]
    inside, built = threading.Event(), threading.Event()

    def loading():
        with CONSTRUCTION_LOCK, no_tie_weights():
            inside.set()
            built.wait(5)

    t = threading.Thread(target=loading)
    t.start()
    assert inside.wait(30)
    try:
        pn = pn_model(cfg, fam)
    finally:
        built.set()
        t.join()
    assert pn.base.lm_head.weight.data_ptr() == pn.base.model.embed_tokens.weight.data_ptr()


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        got = predicate()
        if got:
            return got
        time.sleep(0.5)
    raise AssertionError(f"{what}: not within {timeout}s")


@pytest.mark.timeout(600)
def test_a_sigkilled_build_leaves_the_name_usable_and_delete_and_max_domains_work(app):
    import os
    import signal
    import subprocess
    import sys

    from slmfactory.serving.domains.store import DomainStore

    cfg, url, _ = app
    registry = DomainStore(cfg.root)
    docs = _docs(cfg, "literature", 6)
    # A process holding the build lease of "ghost", as a replica does while it builds, is
    # SIGKILLed mid-build: the kernel drops its lock and the name is free (a claim file
    # stayed forever).
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from slmfactory.serving.domains.store import DomainStore; "
        f"lease = DomainStore({str(cfg.root)!r}).lease('ghost'); lease.__enter__(); "
        "print('held', flush=True); time.sleep(600)")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        got, err = http("POST", f"{url}/v1/domains", json_body={"name": "ghost", "documents": docs})
        assert got == 409 and err["error"]["param"] == "name", err
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    got, body = http("POST", f"{url}/v1/domains", json_body={"name": "ghost", "documents": docs})
    assert got == 201, body
    served = Path(registry.get("ghost")["path"])
    assert served.is_dir() and _complete(url, "ghost")[0] == 200
    # Delete: the name is no longer served, its own folders are gone, the name is free.
    got, body = http("DELETE", f"{url}/v1/domains/ghost")
    assert got == 200 and body["deleted"] is True, body
    assert http("GET", f"{url}/v1/domains/ghost")[0] == 404 and _complete(url, "ghost")[0] == 404
    assert not served.exists()
    assert http("DELETE", f"{url}/v1/domains/ghost")[0] == 404
    assert http("DELETE", f"{url}/v1/domains/legal")[0] == 409  # a start-up domain stays
    # serving.max_domains (8 here): the same documents under new names (their candidates are
    # reused, so each build is quick) until the registry is full.
    made = []
    for i in range(9):
        got, body = http("POST", f"{url}/v1/domains", json_body={"name": f"lim{i}", "documents": docs})
        if got != 201:
            break
        made.append(f"lim{i}")
    assert got == 409 and body["error"]["code"] == "max_domains", body
    assert len(registry.names()) == 8 and made
    assert http("DELETE", f"{url}/v1/domains/{made[0]}")[0] == 200
    assert http("POST", f"{url}/v1/domains", json_body={"name": "again", "documents": docs})[0] == 201
    for name in made[1:] + ["again"]:  # leave room for the module's other tests
        assert http("DELETE", f"{url}/v1/domains/{name}")[0] == 200


@pytest.mark.timeout(600)
def test_a_killed_finetune_ends_failed(app):
    import os
    import signal

    cfg, url, _ = app
    budget = 4 * cfg.finetune.batch_size * cfg.data.seq_len
    got, body = http("POST", f"{url}/v1/domains", json_body={"name": "doomed", "documents": _docs(cfg, "math", 12),
                                                             "finetune_budget": budget})
    assert got == 201 and body["finetune"]["status"] == "queued", body

    def running():
        ft = http("GET", f"{url}/v1/domains/doomed")[1]["finetune"]
        return ft if ft["status"] != "queued" else None

    ft = _wait_for(running, 300, "the fine-tune to start")
    assert ft["status"] == "running", ft
    os.kill(ft["pid"], signal.SIGKILL)  # the Ray worker running the fine-tune
    ft = _wait_for(lambda: (lambda f: f if f["status"] != "running" else None)(
        http("GET", f"{url}/v1/domains/doomed")[1]["finetune"]), 120, "the status to leave 'running'")
    assert ft["status"] == "failed", ft
    assert _complete(url, "doomed")[0] == 200  # the instant model keeps serving
    assert http("DELETE", f"{url}/v1/domains/doomed")[0] == 200
