"""Serving benchmarks, each a ratio from one side-by-side run on this machine:

1. latency: Serve p50 for scoring 128 tokens / the same model's forward in-process (goal <= 1.2);
2. throughput: batched Serve scoring / a plain transformers loop at the same batch size (goal >= 0.8);
3. inference cost: measured per-token time of the SLM vs the LLM / their FLOP ratio (goal within 20%);
4. load: 32 concurrent clients for 30 s on loopback: errors, p50 and p99 latency.

Uses the models `make demo` exported (``--models runs/demo/models``; the best SLM and LLM
of ``--domain``).

    python bench/serve_bench.py --config configs/demo.yaml --domain legal
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

from slmfactory.platform import runtime  # noqa: F401  (env defaults before Ray)


def post(url: str, body: dict) -> tuple[int, float]:
    t0 = time.perf_counter()
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            r.read()
            status = r.status
    except urllib.error.HTTPError as e:
        status = e.code
    return status, time.perf_counter() - t0


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--models", default=None, help="default: <workdir>/models")
    ap.add_argument("--domain", default="legal")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--load-seconds", type=float, default=30.0)
    ap.add_argument("--clients", type=int, default=32)
    args = ap.parse_args()

    import numpy as np
    import ray
    import torch
    from ray import serve
    from transformers import AutoModelForCausalLM

    from slmfactory.platform.config import load_config
    from slmfactory.platform.cost import inference_flops_per_token
    from slmfactory.serving.app import Loaded, build_app, score_ids

    cfg = load_config(args.config)
    models_dir = Path(args.models) if args.models else cfg.root / "models"
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

    # In-process baselines.
    for _ in range(3):
        score_ids(loaded, [ids[0]])
    single = []
    for i in range(args.requests):
        t0 = time.perf_counter()
        score_ids(loaded, [ids[i % len(ids)]])
        single.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    rounds = max(1, args.requests // args.batch)
    for _ in range(rounds):
        score_ids(loaded, ids)
    loop_tps = rounds * args.batch * n_tok / (time.perf_counter() - t0)

    # The Serve app (one replica, one CPU).
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({"config": args.config, "models": str(models_dir),
                         "max_params": float(sum(p.numel() for p in slm.parameters()))}),
              name="slmfactory", route_prefix="/")
    url = f"http://127.0.0.1:{port}/v1/score"
    for _ in range(5):
        post(url, {"model": args.domain, "input": texts[0]})
    lat = [post(url, {"model": args.domain, "input": texts[i % len(texts)]})[1] for i in range(args.requests)]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(args.batch) as pool:
        list(pool.map(lambda i: post(url, {"model": args.domain, "input": texts[i % len(texts)]}),
                      range(rounds * args.batch)))
    serve_tps = rounds * args.batch * n_tok / (time.perf_counter() - t0)

    # Load: N clients for T seconds, scoring and short completions mixed.
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

    threads = [threading.Thread(target=client, args=(k,)) for k in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    serve.shutdown()
    ray.shutdown()
    errors = sum(1 for s, _ in results if s != 200)
    load_lat = [d for _, d in results]

    p50_serve, p50_local = statistics.median(lat), statistics.median(single)
    print(f"1. scoring {n_tok} tokens, p50: Serve {p50_serve * 1e3:.1f} ms, in-process {p50_local * 1e3:.1f} ms: "
          f"ratio {p50_serve / p50_local:.2f} (goal <= 1.2)")
    print(f"2. throughput at batch {args.batch}: Serve {serve_tps:,.0f} tokens/s, transformers loop {loop_tps:,.0f}: "
          f"ratio {serve_tps / loop_tps:.2f} (goal >= 0.8)")
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
    print(f"4. load: {args.clients} clients x {args.load_seconds:.0f}s: {len(results)} requests, {errors} errors, "
          f"p50 {pct(load_lat, 0.5) * 1e3:.0f} ms, p99 {pct(load_lat, 0.99) * 1e3:.0f} ms")


if __name__ == "__main__":
    main()
