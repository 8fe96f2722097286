"""Serving benchmarks, each a ratio from one side-by-side run on this machine:

1. latency: Serve p50 for scoring 128 tokens / the same model's forward in-process (goal <= 1.3, stretch 1.2);
2. throughput: batched Serve scoring / a plain transformers loop at the same batch size (goal >= 0.8);
3. inference cost: measured per-token time of the SLM vs the LLM / their FLOP ratio (goal within 20%);
4. load: 32 concurrent clients for 30 s on loopback: errors, p50 and p99 latency (goal p99 <= 3 x p50);
   ``--clients 1,16,32`` runs it at each count.

``--generation`` runs the generation figures instead (``--context 512``: the model's
context, so that 256-token prompts take 128 more):

5. mixed generation at 16 and 32 concurrent clients (``--gen-clients``): prompts of 8-256
   tokens, ``max_tokens`` 4-128, temperature / top_p / seeds mixed, a quarter streamed:
   generated tokens/s through Serve / the in-process upper bound (the same requests, one
   batched ``generate`` per distinct setting, no HTTP) (goal >= 0.7); with p99 time to
   first token and p99 inter-token latency of the streamed requests;
6. one client, a 64-token greedy completion: Serve end-to-end p50 / in-process
   ``generate`` p50 (goal <= 1.15);
7. where the time goes per generated token: the replica's scheduler parts (its
   ``Server-Timing``: queue, schedule, prefill, forward, logits, emit), the proxy
   (client latency less the replica's), and the stream path (a chunk's text and JSON).

Uses the models `make demo` exported (``--models runs/demo/models``; the best SLM and LLM
of ``--domain``), or with ``--synthetic TOKENIZER_DIR`` freshly initialised models of the
recipe's SLM and LLM presets with that tokenizer (timing depends on shapes, not weights),
or with ``--tiny`` a freshly initialised SLM of the recipe's preset (the demo's mini-slm)
with a tokenizer of the recipe's vocabulary trained on the committed sample (a minute, no
demo needed; no LLM, so no figure 3). ``--api-key`` sends ``Authorization: Bearer`` (an
app started with keys).

Every figure is followed by the replica's own account of where a request's time went
(its ``Server-Timing`` header: auth, body, parse, model lookup, tokenise, batch wait,
forward, response building; the rest of the client's latency is the proxy, the router and
HTTP). ``--profile DIR`` also samples the proxy and the replica with py-spy during the
latency figure and prints their CPU time per request by part of the path.

    python bench/serve_bench.py --config configs/demo.yaml --domain legal
    python bench/serve_bench.py --synthetic runs/demo/tokenizer/bpe-8575457b9197cd29
    python bench/serve_bench.py --tiny --load-seconds 15 --profile /tmp/serve-profile
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import os

from slmfactory.platform import runtime  # noqa: F401  (env defaults before Ray)

# Ray starts its workers (the Serve proxy and replicas) at nice 15. On a machine other
# processes also load, they then get a fraction of the CPU the in-process baseline (nice 0)
# gets: measured on this shared 2-core machine, the same 128-token forward took 23-30 ms in
# the replica against 9 ms in-process. The ratios compare request paths, not priorities.
os.environ.setdefault("RAY_worker_niceness", "0")


HEADERS = {"content-type": "application/json"}


TIMINGS: list[dict[str, float]] = []
"""The replica's ``Server-Timing`` of each request ``post`` sent with ``timings=True``."""


def server_timing(header: str | None) -> dict[str, float]:
    """``Server-Timing: name;dur=ms, ...`` as {name: ms}."""
    out = {}
    for part in (header or "").split(","):
        name, _, dur = part.strip().partition(";dur=")
        if dur:
            out[name] = float(dur)
    return out


def post(url: str, body: dict, timings: bool = False) -> tuple[int, float]:
    t0 = time.perf_counter()
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers=HEADERS)
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            r.read()
            status = r.status
            header = r.headers.get("server-timing")
    except urllib.error.HTTPError as e:
        status, header = e.code, None
    took = time.perf_counter() - t0
    if timings:
        TIMINGS.append({**server_timing(header), "client": took * 1e3})
    return status, took


def timing_table(rows: list[dict[str, float]]) -> str:
    """Median ms per part of the request path, from the replica's Server-Timing headers;
    ``proxy+router+http`` is the client's latency less the replica's total."""
    if not rows or "total" not in rows[0]:
        return "   (the replica sent no Server-Timing header)"
    parts = [k for k in rows[0] if k not in ("total", "client")]
    med = {k: statistics.median(r.get(k, 0.0) for r in rows) for k in parts + ["total", "client"]}
    med["proxy+router+http"] = statistics.median(r["client"] - r["total"] for r in rows)
    return "   " + ", ".join(f"{k} {med[k]:.2f}" for k in parts + ["total", "proxy+router+http", "client"]) + " (ms, p50)"


def pct(values: list[float], q: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, int(q * len(v)))]


def models_of(models_dir: Path, domain: str) -> dict[str, Path]:
    """The exported model folder of each strategy for ``domain`` (best test ppl)."""
    best: dict[str, tuple[float, Path]] = {}
    for meta in models_dir.glob("*/slmfactory.json"):
        m = json.loads(meta.read_text())
        if m.get("domain") == domain and (m["strategy"] not in best or m["test_ppl"] < best[m["strategy"]][0]):
            best[m["strategy"]] = (m["test_ppl"], meta.parent)
    return {s: p for s, (_, p) in best.items()}


def tiny_tokenizer(cfg) -> Path:
    """A tokenizer of ``cfg``'s vocabulary size trained on the committed real-text sample
    (configs/tiny.yaml's corpus), in a workdir under the system's temp folder (kept: a
    second run reuses it)."""
    import tempfile

    from slmfactory.data.tokens.tokenizer import ensure_tokenizer
    from slmfactory.platform.config import load_config

    root = Path(tempfile.gettempdir()) / f"serve-bench-tiny-{cfg.tokenizer.vocab_size}"
    tiny = load_config(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml",
                       {"workdir": str(root), "tokenizer.vocab_size": cfg.tokenizer.vocab_size})
    if not (tiny.corpus_dir / "generic.jsonl").is_file():
        from slmfactory.data.corpus.build import build_sample_corpus

        build_sample_corpus(tiny)
    return ensure_tokenizer(tiny)


PROFILE_PARTS = (  # (part, substrings of a frame, first match from the leaf up wins)
    ("forward", ("modeling_llama", "torch/nn/", "_logit_chunks", "score_ids")),
    ("tokenise", ("tokenization_utils",)),
    ("response building", ("with_firsts", "decode", "jsonable_encoder", "responses.py", "json/encoder",
                           "json/__init__")),
    ("parse + validate", ("pydantic", "api.py", "read_body")),
    ("auth + rate limit", ("auth.py", "hashlib", "hmac")),
    ("multiplexing lookup", ("multiplex",)),
    ("@serve.batch", ("batching.py",)),
    ("metrics", ("prometheus_client",)),
    ("HTTP server (uvicorn/starlette)", ("uvicorn", "h11", "starlette", "fastapi")),
    # A native event loop (uvloop) or Ray's core worker threads: py-spy sees their Python caller only.
    ("event loops + Ray core (native)", ("_run_user_code_event_loop", "_run_router_event_loop", "Thread.run ",
                                         "Worker.main_loop", "thread (")),
    ("Serve router + replica plumbing", ("ray/serve", "ray/_private", "ray/_raylet", "_raylet")),
    ("asyncio + threads", ("asyncio", "concurrent/futures", "threading.py")),
)


def profile_parts(raw: Path) -> dict[str, int]:
    """py-spy's collapsed stacks (``--format raw``) as samples per part of the path."""
    parts: dict[str, int] = {}
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        frames = stack.split(";")[::-1]  # leaf first
        part = "other"
        for frame in frames:
            hit = next((p for p, keys in PROFILE_PARTS if any(k in frame for k in keys)), None)
            if hit is not None:
                part = hit
                break
        parts[part] = parts.get(part, 0) + int(n)
    return parts


def start_profiles(out: Path, rate: int) -> list:
    """py-spy sampling the Serve proxy and the replica (found by their process titles)."""
    import subprocess
    import sys

    out.mkdir(parents=True, exist_ok=True)
    spy = Path(sys.executable).with_name("py-spy")
    procs = []
    for name, title in (("proxy", "ProxyActor"), ("replica", "ServeReplica")):
        pids = subprocess.run(["pgrep", "-f", f"ray::{title}"], capture_output=True, text=True).stdout.split()
        if not pids:
            print(f"   (no {name} process found to profile)")
            continue
        procs.append((name, out / f"{name}.txt", subprocess.Popen(
            [str(spy), "record", "--pid", pids[0], "--rate", str(rate), "--format", "raw", "--nonblocking",
             "--threads", "--output", str(out / f"{name}.txt")], stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)))
    return procs


def stop_profiles(procs: list, rate: int, n_requests: int) -> None:
    import signal

    for name, path, p in procs:
        p.send_signal(signal.SIGINT)
        p.wait(timeout=60)
        if not path.is_file():
            print(f"   (py-spy wrote no profile of the {name})")
            continue
        parts = profile_parts(path)
        total = sum(parts.values())
        print(f"   {name} CPU per request: {total / rate / n_requests * 1e3:.2f} ms = "
              + ", ".join(f"{k} {v / rate / n_requests * 1e3:.2f}" for k, v in
                          sorted(parts.items(), key=lambda kv: -kv[1])))


def synthetic_models(cfg, tokenizer_dir: Path, domain: str, keys: tuple[str, ...] = ("slm", "llm"),
                     context: int | None = None) -> Path:
    """Freshly initialised SLM and LLM of ``cfg``'s presets, exported as the platform
    exports models (safetensors, config, tokenizer, slmfactory.json)."""
    import shutil
    import tempfile

    from transformers import PreTrainedTokenizerFast

    from slmfactory.models.arch.lm import build_model, count_params

    out = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    vocab = len(PreTrainedTokenizerFast.from_pretrained(tokenizer_dir))
    for key in keys:
        model = build_model(getattr(cfg, key), vocab, context or cfg.data.seq_len)
        folder = out / f"{key}-{domain}"
        model.save_pretrained(folder, safe_serialization=True)
        for f in tokenizer_dir.iterdir():
            if f.is_file() and f.name not in ("slmfactory.json", "stage.json"):
                shutil.copy2(f, folder / f.name)
        (folder / "slmfactory.json").write_text(json.dumps({"domain": domain, "strategy": key,
                                                            "params": count_params(model), "test_ppl": 1.0}))
    return out


# -- generation (figures 5-7) -----------------------------------------------------------------

def gen_workload(rng, vocab: int, eos: int, n: int) -> list[dict]:
    """``n`` mixed completion bodies: token-id prompts of 8-256 tokens, max_tokens 4-128,
    temperature 0 / 0.7 / 1.0, top_p 1 / 0.9, a seed on every fifth sampled one, every
    fourth streamed. End of text is biased away (``logit_bias``), so that every request
    generates its max_tokens on both sides of the ratio: the same work."""
    out = []
    for i in range(n):
        temp = (0.0, 0.7, 1.0)[i % 3]
        body = {"prompt": rng.integers(10, vocab - 1, int(rng.integers(8, 257))).tolist(),
                "max_tokens": int(rng.integers(4, 129)), "temperature": temp,
                "top_p": (1.0, 0.9)[(i // 3) % 2] if temp > 0 else 1.0, "logit_bias": {str(eos): -100},
                "stream": i % 4 == 3}
        if temp > 0 and i % 5 == 0:
            body["seed"] = int(rng.integers(0, 1 << 30))
        out.append(body)
    return out


def gen_sampling(body: dict, max_tokens: int | None = None):
    from slmfactory.serving.generation import Sampling

    (eos, bias), = body["logit_bias"].items()
    return Sampling(max_tokens=max_tokens or body["max_tokens"], temperature=body["temperature"],
                    top_p=body["top_p"], seed=body.get("seed"), logit_bias=((int(eos), float(bias)),))


def inprocess_upper_bound(loaded, bodies: list[dict]) -> tuple[int, float]:
    """The requests in-process, no HTTP: one batched ``generate`` per distinct sampling
    setting (temperature, top_p, seed), run to its longest max_tokens; each request counts
    its own max_tokens. Returns (tokens, seconds)."""
    from slmfactory.serving.generation import generate

    groups: dict[tuple, list[dict]] = {}
    for b in bodies:
        groups.setdefault((b["temperature"], b["top_p"], b.get("seed")), []).append(b)
    tokens, t0 = 0, time.perf_counter()
    for group in groups.values():
        outs = generate(loaded, [b["prompt"] for b in group],
                        gen_sampling(group[0], max(b["max_tokens"] for b in group)))
        tokens += sum(min(len(o[0]["ids"]), b["max_tokens"]) for o, b in zip(outs, group))
    return tokens, time.perf_counter() - t0


def inprocess_scheduler(loaded, bodies: list[dict]) -> tuple[int, float, dict] | None:
    """The requests through this code's scheduler in-process, all submitted at once (None:
    a code base without one). Returns (tokens, seconds, the scheduler's totals)."""
    try:
        from slmfactory.serving.scheduler import Scheduler
    except ImportError:
        return None
    sched = Scheduler()
    t0 = time.perf_counter()
    jobs = [sched.submit(loaded, b["prompt"], gen_sampling(b)) for b in bodies]
    tokens = sum(len(j.future.result()[0]["ids"]) for j in jobs)
    return tokens, time.perf_counter() - t0, dict(sched.totals)


def gen_request(url: str, domain: str, body: dict) -> dict:
    """One completion through Serve: its tokens, latency, Server-Timing; streamed: the
    times its text chunks arrived (time to first token, gaps between chunks)."""
    t0 = time.perf_counter()
    payload = {**body, "model": domain}
    if body["stream"]:
        payload["stream_options"] = {"include_usage": True}
    req = urllib.request.Request(url, data=json.dumps(payload).encode(), headers=HEADERS)
    with urllib.request.urlopen(req, timeout=300) as r:
        if not body["stream"]:
            got = json.loads(r.read())
            return {"tokens": got["usage"]["completion_tokens"], "latency": time.perf_counter() - t0,
                    "timing": server_timing(r.headers.get("server-timing")), "stream": False}
        arrivals, tokens = [], 0
        for line in r:
            if not line.startswith(b"data: "):
                continue
            data = line[6:].strip()
            if data == b"[DONE]":
                break
            chunk = json.loads(data)
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif chunk.get("choices") and chunk["choices"][0].get("text"):
                arrivals.append(time.perf_counter())
    return {"tokens": tokens, "latency": time.perf_counter() - t0, "stream": True,
            "ttft": arrivals[0] - t0 if arrivals else None, "gaps": [b - a for a, b in zip(arrivals, arrivals[1:])]}


def serve_generation(url: str, domain: str, bodies: list[dict], clients: int) -> tuple[list[dict], float]:
    with ThreadPoolExecutor(clients) as pool:
        t0 = time.perf_counter()
        results = list(pool.map(lambda b: gen_request(url, domain, b), bodies))
    return results, time.perf_counter() - t0


def stream_path_cost(tok, n: int = 128) -> float:
    """Seconds per token of the replica's stream path for a streamed completion: the
    text of each new token (``TextStream``) and its chunk's JSON (``replies.chunk``)."""
    import numpy as np

    from slmfactory.serving import replies
    from slmfactory.serving.generation import TextStream

    ids = np.random.default_rng(1).integers(10, len(tok) - 1, n).tolist()
    t0 = time.perf_counter()
    for _ in range(5):
        text = TextStream(tok, ())
        for t in ids:
            piece = text.push([t])
            if piece:
                json.dumps(replies.chunk("completions", "cmpl-x", "legal", {}, piece))
    return (time.perf_counter() - t0) / (5 * n)


def generation_figures(args, url: str, slm, tok) -> None:
    import numpy as np

    from slmfactory.serving.engine import Loaded
    from slmfactory.serving.generation import Sampling, generate

    loaded = Loaded(slm, tok, int(slm.config.max_position_embeddings))
    eos = tok.eos_token_id if tok.eos_token_id is not None else 0
    rng = np.random.default_rng(0)
    print(f"machine load (1-min average) at start: {os.getloadavg()[0]:.2f}")
    # 6 first: one client, 64-token greedy completion, interleaved with in-process generate.
    prompt = rng.integers(10, len(tok) - 1, 32).tolist()
    body = {"prompt": prompt, "max_tokens": 64, "temperature": 0.0, "top_p": 1.0, "logit_bias": {str(eos): -100},
            "stream": False}
    s = Sampling(max_tokens=64, temperature=0.0, logit_bias=((eos, -100.0),))
    url_c = url.replace("/score", "/completions")
    for _ in range(3):
        generate(loaded, [prompt], s)
        gen_request(url_c, args.domain, body)
    local, remote, timings = [], [], []
    for _ in range(args.latency_rounds):
        t0 = time.perf_counter()
        generate(loaded, [prompt], s)
        local.append(time.perf_counter() - t0)
        r = gen_request(url_c, args.domain, body)
        remote.append(r["latency"])
        timings.append({**r["timing"], "client": r["latency"] * 1e3})
    p50_remote, p50_local = statistics.median(remote), statistics.median(local)
    # 5: the mixed workload, per client count, between two in-process upper-bound runs.
    figure5 = {}
    for clients in [int(c) for c in str(args.gen_clients).split(",")]:
        bodies = gen_workload(np.random.default_rng(clients), len(tok), eos, clients * args.gen_per_client)
        tok_a, sec_a = inprocess_upper_bound(loaded, bodies)
        results, wall = serve_generation(url_c, args.domain, bodies, clients)
        tok_b, sec_b = inprocess_upper_bound(loaded, bodies)
        sched = inprocess_scheduler(loaded, bodies)
        figure5[clients] = (bodies, results, wall, (tok_a + tok_b) / (sec_a + sec_b), sched)
    print(f"machine load (1-min average) at end: {os.getloadavg()[0]:.2f}")
    for clients, (bodies, results, wall, upper_tps, sched) in figure5.items():
        tokens = sum(r["tokens"] for r in results)
        serve_tps = tokens / wall
        streamed = [r for r in results if r["stream"]]
        ttft = [r["ttft"] for r in streamed if r["ttft"] is not None]
        gaps = [g for r in streamed for g in r["gaps"]]
        print(f"5. mixed generation, {clients} clients, {len(bodies)} requests ({len(streamed)} streamed), {tokens} "
              f"tokens: Serve {serve_tps:,.0f} tokens/s, in-process upper bound {upper_tps:,.0f}: ratio "
              f"{serve_tps / upper_tps:.2f} (goal >= 0.7); p99 time to first token {pct(ttft, 0.99) * 1e3:.0f} ms "
              f"(p50 {pct(ttft, 0.5) * 1e3:.0f}), p99 inter-token {pct(gaps, 0.99) * 1e3:.0f} ms "
              f"(p50 {pct(gaps, 0.5) * 1e3:.1f})")
        if sched is not None:
            n_tok, secs, totals = sched
            print(f"   in-process scheduler, all {len(bodies)} submitted at once: {n_tok / secs:,.0f} tokens/s "
                  f"({n_tok / secs / upper_tps:.2f} of the upper bound), {totals['steps']} steps, "
                  f"{totals['row_steps'] / max(1, totals['steps']):.1f} rows per step")
        whole = [r for r in results if not r["stream"] and r["timing"]]
        n = sum(r["tokens"] for r in whole)
        if n:
            parts = [k for k in whole[0]["timing"] if k != "total"]
            per = {k: sum(r["timing"].get(k, 0.0) for r in whole) / n for k in parts}
            proxy = sum(r["latency"] * 1e3 - r["timing"].get("total", 0.0) for r in whole) / n
            print("   7. per generated token, non-streamed requests (ms; the replica's Server-Timing parts, "
                  "a request's share of each step): " + ", ".join(f"{k} {v:.3f}" for k, v in per.items())
                  + f"; proxy+router+http {proxy:.3f}")
            if sched is not None:
                _, _, totals = sched
                per_tok = {k: totals[k] / max(1, totals["tokens"]) * 1e3
                           for k in ("schedule", "prefill", "forward", "logits", "emit")}
                print("   7. per generated token, in-process scheduler (ms): "
                      + ", ".join(f"{k} {v:.3f}" for k, v in per_tok.items()))
    print(f"6. one client, 64-token greedy completion, p50: Serve {p50_remote * 1e3:.1f} ms, in-process generate "
          f"{p50_local * 1e3:.1f} ms: ratio {p50_remote / p50_local:.2f} (goal <= 1.15)")
    print(timing_table(timings))
    print(f"7. the stream path (a token's text and its chunk's JSON, in the replica): "
          f"{stream_path_cost(tok) * 1e3:.3f} ms per token")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--models", default=None, help="default: <workdir>/models")
    ap.add_argument("--domain", default="legal")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--load-seconds", type=float, default=30.0)
    ap.add_argument("--clients", default="32", help="concurrent clients of the load figure (a list: each)")
    ap.add_argument("--synthetic", default=None, metavar="TOKENIZER_DIR",
                    help="bench freshly initialised models of the recipe's presets with this tokenizer")
    ap.add_argument("--tiny", action="store_true",
                    help="bench a freshly initialised SLM of the recipe's preset, tokenizer trained on the sample")
    ap.add_argument("--profile", default=None, metavar="DIR",
                    help="sample the proxy and the replica with py-spy during the latency figure")
    ap.add_argument("--profile-rate", type=int, default=250)
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--generation", action="store_true", help="run the generation figures (5-7) instead of 1-4")
    ap.add_argument("--context", type=int, default=None, help="the synthetic/tiny model's context (default: recipe)")
    ap.add_argument("--gen-clients", default="16,32")
    ap.add_argument("--gen-per-client", type=int, default=6, help="requests per client in figure 5")
    ap.add_argument("--latency-rounds", type=int, default=20)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config overrides for the app (e.g. serving.batch_wait_s=0)")
    args = ap.parse_args()
    if args.api_key:
        HEADERS["authorization"] = f"Bearer {args.api_key}"

    import numpy as np
    import ray
    import torch
    from ray import serve
    from transformers import AutoModelForCausalLM

    from slmfactory.platform.config import load_config, parse_overrides
    from slmfactory.platform.cost import inference_flops_per_token
    from slmfactory.serving.app import build_app
    from slmfactory.serving.engine import Loaded, score_ids

    cfg = load_config(args.config)
    models_dir = Path(args.models) if args.models else cfg.root / "models"
    if args.synthetic:
        models_dir = synthetic_models(cfg, Path(args.synthetic), args.domain, context=args.context)
    elif args.tiny:
        models_dir = synthetic_models(cfg, tiny_tokenizer(cfg), args.domain, keys=("slm",), context=args.context)
        print(f"model: a freshly initialised {cfg.slm.preset} (vocabulary {cfg.tokenizer.vocab_size}, context "
              f"{args.context or cfg.data.seq_len}) in {models_dir}")
    folders = models_of(models_dir, args.domain)
    slm_dir, llm_dir = folders.get("slm"), folders.get("llm")
    if slm_dir is None:
        raise SystemExit(f"no `slm` model of {args.domain} under {models_dir}: run `make demo` first")
    torch.set_num_threads(1)  # the Serve replica uses one thread too: compare like with like
    slm = AutoModelForCausalLM.from_pretrained(slm_dir).eval()
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(slm_dir)
    ctx = int(slm.config.max_position_embeddings)
    n_tok = min(128, ctx)
    rng = np.random.default_rng(0)
    texts = []
    while len(texts) < args.batch:  # real-looking inputs of exactly n_tok tokens
        ids = rng.integers(10, len(tok) - 1, n_tok).tolist()
        text = tok.decode(ids)
        if len(tok(text, add_special_tokens=False)["input_ids"]) == n_tok:
            texts.append(text)
    loaded = Loaded(slm, tok, ctx)
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]

    # In-process baselines: measured below, interleaved with the Serve requests, so that
    # both sides of each ratio see the same machine load (a shared 2-core machine's load
    # moves by 3x within a minute: baselines measured first were not comparable).
    for _ in range(3):
        score_ids(loaded, [ids[0]])
    rounds = max(1, args.requests // args.batch)

    # The Serve app (one replica, one CPU), Ray started with the app's Serve settings (the
    # proxy reads them when it starts, as under `slmfactory serve`).
    import slmfactory.serving.app as app_module

    if hasattr(app_module, "serve_env"):
        os.environ.update(app_module.serve_env(load_config(args.config, parse_overrides(args.set)).serving))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({"config": args.config, "models": str(models_dir), "set": args.set,
                         "max_params": float(sum(p.numel() for p in slm.parameters()))}),
              name="slmfactory", route_prefix="/")
    url = f"http://127.0.0.1:{port}/v1/score"
    if args.generation:
        try:
            generation_figures(args, url, slm, tok)
        finally:
            serve.shutdown()
            ray.shutdown()
        return
    for _ in range(5):
        post(url, {"model": args.domain, "input": texts[0]})
    single, lat = [], []
    profiles = start_profiles(Path(args.profile), args.profile_rate) if args.profile else []
    for i in range(args.requests):
        t0 = time.perf_counter()
        score_ids(loaded, [ids[i % len(ids)]])
        single.append(time.perf_counter() - t0)
        lat.append(post(url, {"model": args.domain, "input": texts[i % len(texts)]}, timings=True)[1])
    latency_timings = TIMINGS[:]
    TIMINGS.clear()
    if profiles:
        print("py-spy, during the latency figure (on-CPU samples only: waits are not in it):")
        stop_profiles(profiles, args.profile_rate, args.requests)
    loop_s = serve_s = 0.0
    with ThreadPoolExecutor(args.batch) as pool:
        for _ in range(rounds):
            t0 = time.perf_counter()
            score_ids(loaded, ids)
            loop_s += time.perf_counter() - t0
            t0 = time.perf_counter()
            list(pool.map(lambda i: post(url, {"model": args.domain, "input": texts[i % len(texts)]},
                                         timings=True), range(args.batch)))
            serve_s += time.perf_counter() - t0
    batch_timings = TIMINGS[:]
    TIMINGS.clear()
    loop_tps = rounds * args.batch * n_tok / loop_s
    serve_tps = rounds * args.batch * n_tok / serve_s

    # Load: N clients for T seconds, scoring and short completions mixed.
    def load_run(n_clients: int) -> tuple[list[tuple[int, float]], float]:
        stop = time.time() + args.load_seconds
        results: list[tuple[int, float]] = []
        lock = threading.Lock()

        def client(k: int) -> None:
            i = 0
            while time.time() < stop:
                if (k + i) % 2:
                    r = post(url, {"model": args.domain, "input": texts[i % len(texts)]})
                else:
                    r = post(url.replace("/score", "/completions"),
                             {"model": args.domain, "prompt": texts[i % len(texts)][:80], "max_tokens": 8,
                              "temperature": 0})
                with lock:
                    results.append(r)
                i += 1

        threads = [threading.Thread(target=client, args=(k,)) for k in range(n_clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return results, args.load_seconds

    loads = {int(n): load_run(int(n)) for n in str(args.clients).split(",")}
    serve.shutdown()
    ray.shutdown()
    p50_serve, p50_local = statistics.median(lat), statistics.median(single)
    print(f"1. scoring {n_tok} tokens, p50: Serve {p50_serve * 1e3:.1f} ms, in-process {p50_local * 1e3:.1f} ms: "
          f"ratio {p50_serve / p50_local:.2f} (goal <= 1.3)")
    print(timing_table(latency_timings))
    print(f"2. throughput at batch {args.batch}: Serve {serve_tps:,.0f} tokens/s, transformers loop {loop_tps:,.0f}: "
          f"ratio {serve_tps / loop_tps:.2f} (goal >= 0.8)")
    print(timing_table(batch_timings))
    if llm_dir is not None:
        llm = AutoModelForCausalLM.from_pretrained(llm_dir).eval()
        x = torch.tensor(ids)
        times = {}
        for name, m in (("slm", slm), ("llm", llm)):
            with torch.no_grad():
                m(input_ids=x)
                t0 = time.perf_counter()
                for _ in range(5):
                    m(input_ids=x)
            times[name] = (time.perf_counter() - t0) / (5 * x.numel())
        flops = {n: inference_flops_per_token(m, n_tok) for n, m in (("slm", slm), ("llm", llm))}
        measured, expected = times["llm"] / times["slm"], flops["llm"] / flops["slm"]
        print(f"3. per-token inference: SLM {times['slm'] * 1e6:.1f} us, LLM {times['llm'] * 1e6:.1f} us: measured "
              f"{measured:.2f}x vs FLOP ratio {expected:.2f}x: {measured / expected:.2f} (goal 0.8..1.2)")
    for n_clients, (results, seconds) in loads.items():
        errors = sum(1 for st, _ in results if st != 200)
        load_lat = [d for _, d in results]
        print(f"4. load: {n_clients} clients x {seconds:.0f}s: {len(results)} requests "
              f"({len(results) / seconds:.1f}/s), {errors} errors, "
              f"p50 {pct(load_lat, 0.5) * 1e3:.0f} ms, p99 {pct(load_lat, 0.99) * 1e3:.0f} ms: "
              f"p99/p50 {pct(load_lat, 0.99) / pct(load_lat, 0.5):.2f} (goal <= 3)")

if __name__ == "__main__":
    main()
