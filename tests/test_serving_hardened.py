"""The serving app as a hostile client meets it: API keys (401, 403 for a non-admin key on
/v1/domains), per-key rate limits (429 + Retry-After), values that pass a naive check and
then raise (400 naming the field), streams whose generation raises (an error event and
[DONE], not a hang), one failing request in a batch (its neighbours answered), path-like
model names (400, no file touched), a chunked 64 MiB body (413 before it is sent), a
model load that never returns (408 at the deadline), metrics scraped, prompts and score
inputs given as token ids.

One app for the module, started once, with keys. Its models are built, not trained: the
weights decide each outcome by construction (a NaN model makes sampling raise)."""

from __future__ import annotations

import errno
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

# The tests that start Ray Serve (through the ``app`` fixture) are marked ``ray`` and ``server``;
# its pure unit tests are not (``make test-fast`` runs them).

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

    from slmfactory.models.train.phases import export_hf, load_lm

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
                 # Long enough that requests sent together are batched together, and
                 # waited for by every request (the adaptive wait skips it for one alone).
                 "serving.batch_wait_s": 0.5, "serving.adaptive_batch_wait": False}
    cfg = load_config(TINY, overrides)
    models = work / "models"
    _export(cfg, models / "legal", "legal")
    _export(cfg, models / "nan", "poisoned", poison="nan")
    for d in COLD_DOMAINS:
        _export(cfg, models / d, d)
    APP_ARGS.update(config=str(TINY), set=[f"{k}={v}" for k, v in overrides.items()], models=str(models))
    fifos: list[Path] = []
    from slmfactory.serving.app import serve_env

    env_before = dict(os.environ)
    os.environ.update(serve_env(cfg.serving))  # the proxy's settings (its body limit) are read as Ray starts
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
        os.environ.clear()  # serve_env's and build_app's settings end with this module's Serve
        os.environ.update(env_before)


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
            raw, status, hdrs = r.read(), r.status, r.headers
    except urllib.error.HTTPError as e:
        raw, status, hdrs = e.read(), e.code, e.headers
    hdrs = {k.lower(): v for k, v in hdrs.items()}  # header names are case-insensitive
    try:
        parsed = json.loads(raw)
    except ValueError:
        parsed = raw.decode("utf-8", "replace")
    return status, hdrs, parsed


def _error_names(status: int, body, param) -> None:
    assert isinstance(body, dict) and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["param"] == param, body


OK = {"model": "legal", "prompt": "The licence", "max_tokens": 2}


@pytest.mark.ray
@pytest.mark.server
def test_keys_admin_and_rate_limits(app):
    cfg, url, _ = app
    for key in (None, "wrong-key-0123456789abcdef"):
        status, hdrs, body = http("POST", f"{url}/v1/completions", OK, key=key)
        assert status == 401, (status, body)
        assert body["error"]["code"] == "invalid_api_key", body
        assert hdrs.get("www-authenticate") == "Bearer", hdrs
        assert http("GET", f"{url}/v1/models", key=key)[0] == 401
    assert http("POST", f"{url}/v1/completions", OK)[0] == 200
    # A plain key may not create or delete domains; the admin key may (404: no such domain).
    status, _, body = http("POST", f"{url}/v1/domains", {"name": "x", "documents": ["a b c"]})
    assert status == 403 and body["error"]["code"] == "admin_key_required", body
    assert http("DELETE", f"{url}/v1/domains/nothing")[0] == 403
    assert http("DELETE", f"{url}/v1/domains/nothing", key=ADMIN_KEY)[0] == 404
    # RPM requests per minute per key: the burst key's bucket empties, the others' do not.
    # A full bucket grants the first RPM requests whatever their pace; then requests are
    # sent until one is refused (the bucket refills one every 60/RPM = 3 s: only requests
    # slower than that could keep it from emptying; the exact accounting, on a stepped
    # clock, is test_rate_limit_buckets_refill_at_their_rate).
    got = []
    while len(got) < 20 * RPM and (not got or got[-1][0] != 429):
        got.append(http("GET", f"{url}/v1/models", key=BURST_KEY))
    statuses = [g[0] for g in got]
    assert statuses[:RPM] == [200] * RPM and statuses[-1] == 429, statuses
    limited = got[-1]
    assert int(limited[1]["retry-after"]) >= 1
    assert limited[2]["error"]["type"] == "rate_limit_error"
    assert http("GET", f"{url}/v1/models")[0] == 200  # another key is not limited
    # TPM tokens per minute per key (prompt + requested completion tokens; scored tokens):
    # four scores of ~480 tokens fit in the full bucket of 2000 whatever their pace; then
    # scores are sent until one is refused (the bucket refills 33 tokens a second: only
    # scores slower than 14 s each could keep it from emptying).
    from slmfactory.data.corpus.store import iter_texts
    from slmfactory.data.tokens.tokenizer import ensure_tokenizer, load_tokenizer

    tok = load_tokenizer(ensure_tokenizer(cfg))
    long = " ".join(itertools.islice(iter_texts(cfg.corpus_dir, "legal", "train"), 20))
    text = tok.decode(tok(long, add_special_tokens=False)["input_ids"][:480])
    got = []
    while len(got) < 40 and (not got or got[-1][0] != 429):
        got.append(http("POST", f"{url}/v1/score", {"model": "legal", "input": text}, key=TOKENS_KEY))
    assert [g[0] for g in got[:4]] == [200] * 4 and got[-1][0] == 429, [(g[0], str(g[2])[:200]) for g in got]
    assert got[0][2]["data"][0]["num_scored"] >= 400 and "tokens per minute" in got[-1][2]["error"]["message"]


def test_rate_limit_buckets_refill_at_their_rate():
    """The per-key buckets on a clock the test steps: a full bucket grants ``rpm`` at once,
    refuses the next with the seconds until a request is refilled, and grants it then."""
    from slmfactory.serving.auth import RateLimiter

    now = [100.0]
    limiter = RateLimiter(rpm=6, tpm=600, clock=lambda: now[0])
    assert [limiter.charge("k", "requests", 1) for _ in range(6)] == [0.0] * 6
    assert limiter.charge("k", "requests", 1) == 10.0  # one request refills in 60/6 s
    assert limiter.charge("other", "requests", 1) == 0.0  # per key
    now[0] += 9.9
    assert limiter.charge("k", "requests", 1) > 0
    now[0] += 0.2
    assert limiter.charge("k", "requests", 1) == 0.0
    assert limiter.charge("k", "tokens", 500) == 0.0 and limiter.charge("k", "tokens", 200) == 10.0
    assert limiter.charge("k", "tokens", 601) == 60.0  # more than a full bucket: never granted


@pytest.mark.ray
@pytest.mark.server
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


@pytest.mark.ray
@pytest.mark.server
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


@pytest.mark.ray
@pytest.mark.server
def test_one_failing_request_does_not_fail_its_batch(app):
    _, url, _ = app
    # Sent together: the three legal requests run in one batch (the scheduler's, one model
    # per batch), interleaved with the poisoned model's. Each response says how many rows
    # the largest step it was in held (Server-Timing ``batch``); the four are sent again
    # until the three shared one (a loaded machine may spread them out).
    bodies = [{"model": "poisoned" if i == 0 else "legal", "prompt": "The licence", "max_tokens": 3,
               "temperature": 1.0} for i in range(4)]
    for _ in range(5):
        with ThreadPoolExecutor(4) as pool:
            got = list(pool.map(lambda b: http("POST", f"{url}/v1/completions", b), bodies))
        sizes = [g[1].get("server-timing", "").rpartition('batch;desc="')[2].rstrip('"') for g in got[1:]]
        if sizes == ["3"] * 3:
            break
    assert sizes == ["3"] * 3, sizes
    assert [g[0] for g in got[1:]] == [200, 200, 200], got
    assert got[0][0] == 500 and got[0][2]["error"]["type"] == "server_error", got[0]


@pytest.mark.ray
@pytest.mark.server
def test_path_like_model_names_are_refused_without_touching_a_file(app):
    cfg, url, _ = app
    # The file a traversal from the registry folder would reach ("../outside"), made a
    # FIFO: a server that opened it would still hold it open, blocked for a writer, and a
    # non-blocking open for writing then succeeds; with no reader it fails (ENXIO). (Access
    # times cannot tell: a noatime mount never changes them.)
    target = cfg.root / "instant" / "outside.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(target)
    _, _, fifos = app
    fifos.append(target)
    for name in ("../outside", "legal\n", "a/b", "..", "/etc/passwd", "legal/../legal", " legal", "x" * 65):
        status, _, err = http("POST", f"{url}/v1/completions", {**OK, "model": name})
        assert status == 400 and err["error"]["param"] == "model", (name, status, err)
    for name in ("..%2Foutside", "legal%0A", "%2E%2E"):
        status, _, _ = http("GET", f"{url}/v1/domains/{name}")
        assert status in (400, 404), (name, status)
    with pytest.raises(OSError) as no_reader:
        os.close(os.open(target, os.O_WRONLY | os.O_NONBLOCK))
    assert no_reader.value.errno == errno.ENXIO


@pytest.mark.ray
@pytest.mark.server
def test_a_chunked_64_mib_body_gets_413_before_the_client_has_sent_it(app):
    """A chunked body (no Content-Length) of 64 MiB, sent 64 KiB at a time while watching
    for an answer: the 413 comes, and the connection closes, when at most the limit (1 MiB)
    plus what the sockets' buffers hold has been sent, not the 64 MiB (the proxy stops
    reading at the limit; it used to read the whole body first)."""
    import select

    _, url, _ = app
    host, port = url.removeprefix("http://").split(":")
    total = 64 << 20
    with socket.create_connection((host, int(port)), timeout=60) as s:
        s.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                  f"Authorization: Bearer {KEYS[2]}\r\nTransfer-Encoding: chunked\r\n\r\n".encode())
        piece = b"x" * (64 << 10)
        frame = f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
        sent, reply = 0, b""
        try:
            while sent < total:
                readable, writable, _ = select.select([s], [s], [], 60)
                if readable:
                    break
                assert writable, "neither an answer nor room to send for 60 s"
                s.sendall(frame)
                sent += len(piece)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed already
        s.settimeout(30)
        closed = False
        try:
            while True:
                got = s.recv(65536)
                if not got:
                    closed = True  # by the server, after its answer
                    break
                reply += got
        except ConnectionResetError:
            closed = True  # closed with unread data: a reset after the answer
        except TimeoutError:
            pass  # left open: judged below
    assert reply.startswith(b"HTTP/1.1 413") and b"request_too_large" in reply, reply[:300]
    assert sent < total // 2, f"{sent >> 20} MiB of {total >> 20} sent before the answer"
    assert closed


@pytest.mark.ray
@pytest.mark.server
def test_a_request_stuck_on_the_file_system_answers_408_at_the_deadline(app):
    """A run-time domain whose store entry is a FIFO: reading it blocks until a writer
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
        assert http("POST", f"{url}/v1/completions", OK)[0] == 200
        # Served while the other one waits: that one cannot end before its deadline.
        assert not stuck.done() or time.monotonic() - t0 >= TIMEOUT_S - 1
        status, _, err = stuck.result()
    assert status == 408 and err["error"]["code"] == "request_timeout", (status, err)
    # Answered at the deadline, not before it (how long after is the machine's business:
    # the client's own timeout bounds it).
    assert time.monotonic() - t0 >= TIMEOUT_S - 1
    os.close(os.open(entry, os.O_WRONLY | os.O_NONBLOCK))  # the blocked reader gets EOF and returns
    entry.unlink()


@pytest.mark.ray
@pytest.mark.server
def test_health_and_metrics_are_scraped(app):
    """Each counter moves by what this test sends itself (the module's other tests also send
    requests, in whatever order they run): two scores, one request without a key (401),
    one with a bad field (400)."""
    _, url, _ = app
    status, _, health = http("GET", f"{url}/healthz", key=None)
    assert status == 200 and health["status"] == "ok", health

    def scrape() -> tuple[str, dict[str, float]]:
        status, _, text = http("GET", f"{url}/metrics", key=None)
        assert status == 200 and isinstance(text, str)
        samples = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                samples[name] = float(value)
        return text, samples

    def value(samples: dict[str, float], prefix: str, **labels) -> float:
        return sum(v for k, v in samples.items() if k.startswith(prefix + "{")
                   and all(f'{a}="{b}"' in k for a, b in labels.items()))

    _, before = scrape()
    for _ in range(2):
        assert http("POST", f"{url}/v1/score", {"model": "legal", "input": "The licence grants you"})[0] == 200
    assert http("POST", f"{url}/v1/score", {"model": "legal", "input": "x"}, key=None)[0] == 401
    assert http("POST", f"{url}/v1/completions", {**OK, "max_tokens": -1})[0] == 400
    text, after = scrape()

    def grew(prefix: str, **labels) -> float:
        return value(after, prefix, **labels) - value(before, prefix, **labels)

    assert grew("slmfactory_requests_total", domain="legal", route="score", status="200") == 2
    assert grew("slmfactory_requests_total", status="401") == 1
    assert grew("slmfactory_requests_total", status="400") == 1
    assert grew("slmfactory_tokens_total", domain="legal", route="score") >= 2 * 3
    assert grew("slmfactory_latency_seconds_count", domain="legal", route="score") == 2
    assert value(after, "slmfactory_model_load_seconds", domain="legal") > 0
    assert value(after, "slmfactory_model_cache_total", domain="legal", result="hit") >= 1
    assert value(after, "slmfactory_model_cache_total", domain="legal", result="miss") >= 1
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


@pytest.mark.ray
@pytest.mark.server
def test_a_wedged_replica_fails_the_health_check_ray_calls(app):
    """Requests for a domain whose store entry is a FIFO each block a worker thread of
    the replica until a writer comes: 40 of them occupy every thread its event loop hands
    work to. The replica still answers HTTP, but can no longer run a forward pass: its
    health check (a one-token forward pass through the same threads, with a deadline)
    fails, both the one Ray's controller calls on the replica actor (Ray replaces a
    replica that fails it three times: not waited for here) and ``/healthz`` (503).
    Unwedged, it is healthy again."""
    cfg, url, fifos = app
    entry = cfg.root / "instant" / "domains" / "jammed.json"
    entry.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(entry)
    fifos.append(entry)
    pool = ThreadPoolExecutor(40)
    stuck = [pool.submit(http, "POST", f"{url}/v1/completions", {**OK, "model": "jammed"}, "next", TIMEOUT_S + 60)
             for _ in range(40)]
    try:
        # Until the requests occupy the threads (each is sent and read by then): polled.
        deadline = time.monotonic() + 120
        while True:
            status, _, body = http("GET", f"{url}/healthz", key=None, timeout=120)
            if status == 503 or time.monotonic() > deadline:
                break
        assert status == 503 and body["status"] == "unhealthy", (status, body)
        import ray

        replica = next(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                       if a["namespace"] == "serve" and "DomainModels" in a["name"])
        with pytest.raises(Exception, match="forward pass"):
            ray.get(ray.get_actor(replica, namespace="serve").check_health.remote(), timeout=120)
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


@pytest.mark.ray
@pytest.mark.server
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


@pytest.mark.ray
@pytest.mark.server
def test_prompts_and_score_inputs_given_as_token_ids(app):
    """OpenAI's and vLLM's other prompt form: a text's token ids (one list, or a list of
    them). They are answered as the text is; an id outside the model's vocabulary is a 400
    naming the field."""
    import pytest as _pytest

    from slmfactory.data.tokens.tokenizer import ensure_tokenizer, load_tokenizer

    cfg, url, _ = app
    tok = load_tokenizer(ensure_tokenizer(cfg))
    text = "The licence grants you the right"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    greedy = {"model": "legal", "max_tokens": 4, "temperature": 0, "echo": True}
    as_text = http("POST", f"{url}/v1/completions", {**greedy, "prompt": text})
    as_ids = http("POST", f"{url}/v1/completions", {**greedy, "prompt": ids})
    assert as_text[0] == as_ids[0] == 200, (as_text, as_ids)
    assert as_ids[2]["choices"][0]["text"] == as_text[2]["choices"][0]["text"]
    assert as_ids[2]["usage"] == as_text[2]["usage"]
    two = http("POST", f"{url}/v1/completions", {**greedy, "prompt": [ids, ids[:3]]})
    assert two[0] == 200 and len(two[2]["choices"]) == 2, two
    scored_text = http("POST", f"{url}/v1/score", {"model": "legal", "input": text})
    scored_ids = http("POST", f"{url}/v1/score", {"model": "legal", "input": [ids]})
    assert scored_text[0] == scored_ids[0] == 200, (scored_text, scored_ids)
    a, b = scored_text[2]["data"][0], scored_ids[2]["data"][0]
    assert a["token_ids"] == b["token_ids"] == ids and a["tokens"] == b["tokens"]
    assert b["perplexity"] == _pytest.approx(a["perplexity"], rel=1e-4)
    vocab = len(tok)
    for route, body, field in (("completions", {**greedy, "prompt": ids + [vocab + 5]}, "prompt"),
                               ("completions", {**greedy, "prompt": [ids, [vocab]]}, "prompt"),
                               ("completions", {**greedy, "prompt": [-1, 3]}, "prompt"),
                               ("score", {"model": "legal", "input": [[3, 2 ** 40]]}, "input"),
                               ("score", {"model": "legal", "input": [ids[:2], [1, vocab]]}, "input")):
        status, _, err = http("POST", f"{url}/v1/{route}", body)
        assert status == 400, (body, status, err)
        _error_names(status, err, field)
    status, _, err = http("POST", f"{url}/v1/score", {"model": "legal", "input": [ids[:2], [1, vocab]]})
    assert str(vocab) in err["error"]["message"] and "input[1]" in err["error"]["message"], err
