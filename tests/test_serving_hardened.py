"""The serving app as a hostile client meets it: API keys (401, 403 for a non-admin key on
/v1/domains), per-key rate limits (429 + Retry-After), values that pass a naive check and
then raise (400 naming the field), streams whose generation raises (an error event and
[DONE], not a hang), one failing request in a batch (its neighbours answered), path-like
model names (400, no file touched), a chunked 64 MiB body (413 before it is read), a
model load that never returns (408 at the deadline), metrics scraped.

One app for the module, started once, with keys. Its models are built, not trained: the
weights decide each outcome by construction (a NaN model makes sampling raise)."""

from __future__ import annotations

import itertools
import json
import os
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.local_cluster import serving_app

pytestmark = [pytest.mark.ray, pytest.mark.server]  # these start Ray Serve

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
KEYS = [f"user-key-{i:02d}-0123456789abcdef" for i in range(16)]
BURST_KEY = "burst-key-0123456789abcdef"
TOKENS_KEY = "tokens-key-0123456789abcdef"
ADMIN_KEY = "admin-key-0123456789abcdef"
RPM = 20
TPM = 2000
TIMEOUT_S = 20
COLD_DOMAINS = [f"cold{i}" for i in range(6)]
APP_ARGS: dict = {}


def _export(cfg, out: Path, domain: str, poison: str | None = None) -> Path:
    """A tiny Llama of the recipe, exported as the platform exports models; ``poison``:
    "nan" fills the final norm with NaN (every logit NaN: sampling raises)."""
    import torch

    from slmfactory.models.phases import export_hf, load_lm

    torch.manual_seed(0)
    model = load_lm(cfg, "slm", None).eval()
    if poison == "nan":
        with torch.no_grad():
            model.model.norm.weight.fill_(float("nan"))
    export_hf(cfg, model, out, {"domain": domain, "strategy": "slm", "params": 1, "test_ppl": 1.0})
    return out


@pytest.fixture(scope="module")
def app(tiny_root, tmp_path_factory):
    import shutil

    import ray

    from slmfactory.platform.config import load_config
    from slmfactory.platform.runtime import init_ray

    work = tmp_path_factory.mktemp("hardened") / "work"
    shutil.copytree(tiny_root, work)
    keys = work / "keys.txt"
    keys.write_text("# API keys\n" + "\n".join(KEYS + [BURST_KEY, TOKENS_KEY]) + "\n")
    admin = work / "admin.txt"
    admin.write_text(ADMIN_KEY + "\n")
    overrides = {"workdir": str(work), "serving.replica_cpus": 0.5, "serving.api_keys_file": str(keys),
                 "serving.admin_keys_file": str(admin), "serving.rate_limit_rpm": RPM,
                 "serving.rate_limit_tpm": TPM,
                 "serving.request_timeout_s": TIMEOUT_S,
                 # Long enough that requests sent together are batched together.
                 "serving.batch_wait_s": 0.5}
    cfg = load_config(TINY, overrides)
    models = work / "models"
    _export(cfg, models / "legal", "legal")
    _export(cfg, models / "nan", "poisoned", poison="nan")
    for d in COLD_DOMAINS:
        _export(cfg, models / d, d)
    APP_ARGS.update(config=str(TINY), set=[f"{k}={v}" for k, v in overrides.items()], models=str(models))
    fifos: list[Path] = []
    init_ray(num_cpus=2)
    try:
        with serving_app(TINY, overrides, models) as url:
            yield cfg, url, fifos
    finally:
        for f in fifos:  # unblock a loader still waiting on a pipe, so the replica can stop
            try:
                fd = os.open(f, os.O_WRONLY | os.O_NONBLOCK)
                os.close(fd)
            except OSError:
                pass
        ray.shutdown()


_keys = itertools.cycle(KEYS)


def http(method: str, url: str, body=None, key: str | None = "next", timeout: float = 120):
    """(status, headers, parsed body); ``key``: "next" = the next user key (the rate limit
    counts per key: the module's requests are spread over 16 keys), None = none."""
    data = json.dumps(body).encode() if isinstance(body, (dict, list)) else body
    headers = {"content-type": "application/json"}
    key = next(_keys) if key == "next" else key
    if key:
        headers["authorization"] = f"Bearer {key}"
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw, status, hdrs = r.read(), r.status, dict(r.headers)
    except urllib.error.HTTPError as e:
        raw, status, hdrs = e.read(), e.code, dict(e.headers)
    try:
        parsed = json.loads(raw)
    except ValueError:
        parsed = raw.decode("utf-8", "replace")
    return status, hdrs, parsed


def _error_names(status: int, body, param) -> None:
    assert isinstance(body, dict) and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["param"] == param, body


OK = {"model": "legal", "prompt": "The licence", "max_tokens": 2}


def test_keys_admin_and_rate_limits(app):
    cfg, url, _ = app
    for key in (None, "wrong-key-0123456789abcdef"):
        status, hdrs, body = http("POST", f"{url}/v1/completions", OK, key=key)
        assert status == 401 and body["error"]["code"] == "invalid_api_key" and hdrs.get("www-authenticate") == \
            "Bearer" or hdrs.get("WWW-Authenticate") == "Bearer", (status, body)
        assert http("GET", f"{url}/v1/models", key=key)[0] == 401
    assert http("POST", f"{url}/v1/completions", OK)[0] == 200
    # A plain key may not create or delete domains; the admin key may (404: no such domain).
    status, _, body = http("POST", f"{url}/v1/domains", {"name": "x", "documents": ["a b c"]})
    assert status == 403 and body["error"]["code"] == "admin_key_required", body
    assert http("DELETE", f"{url}/v1/domains/nothing")[0] == 403
    assert http("DELETE", f"{url}/v1/domains/nothing", key=ADMIN_KEY)[0] == 404
    # RPM requests per minute per key: the burst key's bucket empties, the others' do not.
    # (A bucket refills at RPM/60 per second: 40 requests take far less than the 60 s in
    # which it would refill 20.)
    got = [http("GET", f"{url}/v1/models", key=BURST_KEY) for _ in range(2 * RPM)]
    statuses = [g[0] for g in got]
    assert statuses[:RPM - 1] == [200] * (RPM - 1) and 429 in statuses, statuses
    limited = got[statuses.index(429)]
    assert int(limited[1]["retry-after" if "retry-after" in limited[1] else "Retry-After"]) >= 1
    assert limited[2]["error"]["type"] == "rate_limit_error"
    assert http("GET", f"{url}/v1/models")[0] == 200  # another key is not limited
    # TPM tokens per minute per key (prompt + requested completion tokens; scored tokens):
    # four scores of ~480 tokens fit in 2000, the fifth does not (quick requests: the bucket
    # refills 33 tokens a second, it would take 12 s to refill one).
    from slmfactory.data.corpus import iter_texts
    from slmfactory.data.tokenizer import ensure_tokenizer, load_tokenizer

    tok = load_tokenizer(ensure_tokenizer(cfg))
    long = " ".join(itertools.islice(iter_texts(cfg.corpus_dir, "legal", "train"), 20))
    text = tok.decode(tok(long, add_special_tokens=False)["input_ids"][:480])
    got = [http("POST", f"{url}/v1/score", {"model": "legal", "input": text}, key=TOKENS_KEY) for _ in range(5)]
    assert [g[0] for g in got] == [200, 200, 200, 200, 429], [(g[0], str(g[2])[:200]) for g in got]
    assert got[0][2]["data"][0]["num_scored"] >= 400 and "tokens per minute" in got[4][2]["error"]["message"]


def test_values_that_pass_a_naive_check_are_400_naming_the_field(app):
    _, url, _ = app
    deep = lambda n: "[" * n + '"x"' + "]" * n  # noqa: E731
    raw = lambda s: ('{"model": "legal", "prompt": "The", ' + s + "}").encode()  # noqa: E731
    cases = [
        # numbers beyond float or int64 range
        (raw('"temperature": 1e999'), "temperature"),
        (raw('"top_p": -1e400'), "top_p"),
        (raw('"max_tokens": 1e308'), "max_tokens"),
        # integers with thousands of digits
        (raw('"max_tokens": ' + "9" * 5000), "max_tokens"),
        (raw('"n": ' + "1" * 4400), "n"),
        (raw('"seed": ' + "7" * 10000), "seed"),
        # deeply nested JSON
        (('{"model": "legal", "prompt": ' + deep(500) + "}").encode(), "prompt"),
        (raw('"stop": ' + deep(300)), "stop"),
        (('{"model": ' + deep(400) + ', "prompt": "x"}').encode(), "model"),
        # lone surrogates in any string
        (raw('"stop": "\\ud800"').replace(b'"The"', b'"x"'), "stop"),
        (b'{"model": "legal", "prompt": "caf\\udce9"}', "prompt"),
        (b'{"model": "leg\\udfffal", "prompt": "x"}', "model"),
        (b'{"model": "legal", "prompt": ["ok", "\\ud83d"]}', "prompt"),
        # greedy decoding with n > 1
        (raw('"temperature": 0, "n": 2'), "n"),
        (raw('"temperature": 0.0, "n": 8'), "n"),
        (raw('"temperature": 0, "n": 3, "seed": 1'), "n"),
        # temperatures so small the logits overflow
        (raw('"temperature": 1e-30'), "temperature"),
        (raw('"temperature": 5e-324'), "temperature"),
        (raw('"temperature": 0.001'), "temperature"),
        # seeds outside the generator's range
        (raw('"seed": 18446744073709551616'), "seed"),
        (raw('"seed": -1'), "seed"),
        (raw('"seed": 100000000000000000000000000000'), "seed"),
        # stop strings beyond the cap
        (raw('"stop": "' + "a" * 65 + '"'), "stop"),
        (raw('"stop": ["a", "b", "c", "d", "e"]'), "stop"),
        (raw('"stop": [""]'), "stop"),
    ]
    for body, param in cases:
        status, _, err = http("POST", f"{url}/v1/completions", body)
        assert status == 400, (body[:100], status, err)
        _error_names(status, err, param)
    for body, param in ((b'{"model": "legal", "input": "\\udc00 text"}', "input"),
                        (b'{"model": "legal", "input": ' + deep(600).encode() + b"}", "input"),
                        (b'{"model": "legal", "input": ["fine text", ' + b"1" * 5000 + b"]}", "input")):
        status, _, err = http("POST", f"{url}/v1/score", body)
        assert status == 400, (body[:100], status, err)
        _error_names(status, err, param)
    status, _, err = http("POST", f"{url}/v1/domains", b'{"name": "ok", "documents": ["fine", "\\ud800"]}',
                          key=ADMIN_KEY)
    assert status == 400 and err["error"]["param"] == "documents" and err["error"]["code"] == "invalid_encoding", err
    assert http("POST", f"{url}/v1/completions", OK)[0] == 200  # and the replica keeps serving


def _sse(url: str, body: dict, key: str, timeout: float) -> list[str]:
    req = urllib.request.Request(f"{url}/v1/completions", data=json.dumps(body).encode(), method="POST",
                                 headers={"content-type": "application/json", "authorization": f"Bearer {key}"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        assert r.status == 200
        return [ln[len("data: "):] for ln in r.read().decode().splitlines() if ln.startswith("data: ")]


def test_a_stream_whose_generation_raises_ends_with_an_error_event_and_done(app):
    _, url, _ = app
    t0 = time.monotonic()
    # Every logit of the NaN model is NaN: sampling raises inside generate, by construction.
    events = _sse(url, {"model": "poisoned", "prompt": "The", "max_tokens": 8, "temperature": 1.0, "stream": True},
                  KEYS[0], timeout=TIMEOUT_S + 30)
    assert events[-1] == "[DONE]", events
    err = json.loads(events[-2])["error"]
    assert err["code"] == "generation_failed" and err["type"] == "server_error", err
    assert time.monotonic() - t0 < TIMEOUT_S + 10
    # A healthy stream still ends the usual way.
    events = _sse(url, {"model": "legal", "prompt": "The", "max_tokens": 4, "temperature": 0, "stream": True},
                  KEYS[1], timeout=60)
    assert events[-1] == "[DONE]" and json.loads(events[-2])["choices"][0]["finish_reason"] in ("stop", "length")


def test_one_failing_request_does_not_fail_its_batch(app):
    _, url, _ = app
    # Sent together within the app's 0.5 s batch wait: one batch, two domain groups.
    bodies = [{"model": "poisoned" if i == 0 else "legal", "prompt": "The licence", "max_tokens": 3,
               "temperature": 1.0} for i in range(4)]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda b: http("POST", f"{url}/v1/completions", b), bodies))
    assert [g[0] for g in got[1:]] == [200, 200, 200], got
    assert got[0][0] == 500 and got[0][2]["error"]["type"] == "server_error", got[0]


def test_path_like_model_names_are_refused_without_touching_a_file(app):
    cfg, url, _ = app
    # A file a traversal from the registry folder would reach, holding a valid entry: the
    # old rule served it.
    target = cfg.root / "instant" / "outside.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps({"name": "outside", "path": str(cfg.root / "models" / "legal"), "version": 1,
                                  "strategy": "slm", "params": 1, "test_ppl": 1.0}))
    before = target.stat().st_atime_ns
    for name in ("../outside", "legal\n", "a/b", "..", "/etc/passwd", "legal/../legal", " legal", "x" * 65):
        status, _, err = http("POST", f"{url}/v1/completions", {**OK, "model": name})
        assert status == 400 and err["error"]["param"] == "model", (name, status, err)
    for name in ("..%2Foutside", "legal%0A", "%2E%2E"):
        status, _, _ = http("GET", f"{url}/v1/domains/{name}")
        assert status in (400, 404), (name, status)
    assert target.stat().st_atime_ns == before


def test_a_chunked_body_over_the_limit_gets_413_before_it_ends(app):
    """A chunked body (no Content-Length) of what would be 64 MiB: 2 MiB of it are sent
    (twice the 1 MiB limit) and the body is left open. The answer, 413, comes while the
    body has not ended: the limit is enforced while reading (the old code awaited the
    whole body first, and never answered)."""
    _, url, _ = app
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=60) as s:
        s.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                  f"Authorization: Bearer {KEYS[2]}\r\nTransfer-Encoding: chunked\r\n\r\n".encode())
        piece = b"x" * (64 << 10)
        frame = f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
        try:
            for _ in range((2 << 20) // len(piece)):
                s.sendall(frame)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed already
        s.settimeout(30)
        reply = s.recv(65536)
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]


def test_a_request_stuck_on_the_file_system_answers_408_at_the_deadline(app):
    """A run-time domain whose registry entry is a FIFO: reading it blocks until a writer
    comes. The request is answered 408 at ``serving.request_timeout_s``, not left
    hanging, and the replica's other requests go on meanwhile (the read is off the loop)."""
    cfg, url, fifos = app
    entry = cfg.root / "instant" / "domains" / "stuck.json"
    entry.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(entry)
    fifos.append(entry)
    t0 = time.monotonic()
    with ThreadPoolExecutor(1) as pool:
        stuck = pool.submit(http, "POST", f"{url}/v1/completions", {**OK, "model": "stuck"}, "next", TIMEOUT_S + 60)
        time.sleep(1)
        assert http("POST", f"{url}/v1/completions", OK)[0] == 200  # served while the other one waits
        status, _, err = stuck.result()
    assert status == 408 and err["error"]["code"] == "request_timeout", (status, err)
    assert TIMEOUT_S - 1 <= time.monotonic() - t0 < TIMEOUT_S + 15
    os.close(os.open(entry, os.O_WRONLY | os.O_NONBLOCK))  # the blocked reader gets EOF and returns
    entry.unlink()


def test_health_and_metrics_are_scraped(app):
    _, url, _ = app
    status, _, health = http("GET", f"{url}/healthz", key=None)
    assert status == 200 and health["status"] == "ok", health
    for _ in range(2):
        assert http("POST", f"{url}/v1/score", {"model": "legal", "input": "The licence grants you"})[0] == 200
    status, _, text = http("GET", f"{url}/metrics", key=None)
    assert status == 200 and isinstance(text, str)
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)

    def value(prefix: str, **labels) -> float:
        return sum(v for k, v in samples.items() if k.startswith(prefix + "{")
                   and all(f'{a}="{b}"' in k for a, b in labels.items()))

    assert value("slmfactory_requests_total", domain="legal", route="score", status="200") >= 2
    assert value("slmfactory_requests_total", status="401") >= 1
    assert value("slmfactory_requests_total", status="400") >= 1
    assert value("slmfactory_tokens_total", domain="legal", route="score") >= 2 * 3
    assert value("slmfactory_latency_seconds_count", domain="legal", route="score") >= 2
    assert value("slmfactory_model_load_seconds", domain="legal") > 0
    assert value("slmfactory_model_cache_total", domain="legal", result="hit") >= 1
    assert value("slmfactory_model_cache_total", domain="legal", result="miss") >= 1
    assert "slmfactory_queue_depth" in text


SCORE_PROBE = r"""
import resource, sys, torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from tokenizers import Tokenizer, models
sys.path.insert(0, sys.argv[1])
from slmfactory.serving.engine import Loaded, score_ids

torch.set_num_threads(1)
V, T, N = 32000, 1024, 8   # the paper's vocabulary; 8 inputs of a full 1024-token context
model = LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=T,
                                     tie_word_embeddings=True)).eval()
tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0}, unk_token="a")), pad_token="a")
g = torch.Generator().manual_seed(0)
batch = [torch.randint(0, V, (T,), generator=g).tolist() for _ in range(N)]
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out = score_ids(Loaded(model, tok, T), batch)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
assert [len(o) for o in out] == [T - 1] * N
print((after - before) / 1024)
"""


def test_a_maximal_score_request_holds_bounded_memory(tmp_path):
    """8 inputs x 1024 tokens at a 32k vocabulary: the logits alone are 1 GiB, their
    log-softmax copy another (what the replica held before). Chunked scoring with a gathered
    log-softmax keeps the peak RSS growth under 256 MiB."""
    import subprocess
    import sys

    probe = tmp_path / "probe.py"
    probe.write_text(SCORE_PROBE)
    repo = str(Path(__file__).resolve().parents[1])
    done = subprocess.run([sys.executable, str(probe), repo], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    grew_mib = float(done.stdout.split()[-1])
    assert grew_mib < 256, grew_mib


def test_a_wedged_replica_is_reported_unhealthy(app):
    """Requests for a domain whose registry entry is a FIFO each block a worker thread of
    the replica until a writer comes: 40 of them occupy every thread its event loop hands
    work to. The replica still answers HTTP, but can no longer run a forward pass: its
    health check (a one-token forward pass through the same threads, with a deadline) says
    so, 503, and Ray replaces a replica whose check_health fails. Unwedged, it is healthy."""
    cfg, url, fifos = app
    entry = cfg.root / "instant" / "domains" / "jammed.json"
    entry.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(entry)
    fifos.append(entry)
    pool = ThreadPoolExecutor(40)
    stuck = [pool.submit(http, "POST", f"{url}/v1/completions", {**OK, "model": "jammed"}, "next", TIMEOUT_S + 60)
             for _ in range(40)]
    try:
        time.sleep(2)
        status, _, body = http("GET", f"{url}/healthz", key=None, timeout=120)
        assert status == 503 and body["status"] == "unhealthy", (status, body)
    finally:
        os.close(os.open(entry, os.O_WRONLY | os.O_NONBLOCK))  # every blocked reader gets EOF
        entry.unlink()
        for f in stuck:
            f.result()
        pool.shutdown()

    def healthy():
        try:
            return http("GET", f"{url}/healthz", key=None, timeout=60)[0] == 200
        except OSError:
            return False

    deadline = time.monotonic() + 120
    while not healthy():
        assert time.monotonic() < deadline, "the replica did not become healthy again"
        time.sleep(2)


def test_concurrent_first_requests_on_fresh_replicas_all_answer(app):
    """Six domains never loaded, asked at once the moment a fresh replica is up: every one
    answers 200, over three cold starts (the app redeployed: a new replica, nothing
    imported). A replica finishes its imports before it takes a request."""
    from ray import serve

    from slmfactory.serving.app import build_app

    _, url, _ = app
    for start in range(3):
        serve.delete("slmfactory")  # the replica goes; the next one starts from nothing
        serve.run(build_app(dict(APP_ARGS)), name="slmfactory", route_prefix="/")
        bodies = [{"model": d, "prompt": "The", "max_tokens": 2, "temperature": 0} for d in COLD_DOMAINS]
        with ThreadPoolExecutor(len(bodies)) as pool:
            got = list(pool.map(lambda b: http("POST", f"{url}/v1/completions", b), bodies))
        assert [g[0] for g in got] == [200] * len(bodies), (start, got)
