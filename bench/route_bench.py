"""``model: "auto"``: how well it routes and what it costs, the clustering route (before,
``serving.auto_route: cluster``) beside the route by the served models' own scores (after,
``serving.auto_route: nll``), in one run on this machine.

1. Accuracy on the served domains' own held-out test documents: pieces of
   ``--piece-tokens`` tokens of each domain's test split, the share routed to their own
   domain (goal >= 0.95).
2. Text of a kind no domain was built for (pieces of the generic corpus's valid split, or
   of ``--foreign FILE``, e.g. R's manuals): the share routed to the domain whose model
   scores the whole piece best, as ``/v1/score`` reports it (goal >= 0.90).
3. Latency ``auto`` adds, through Ray Serve: both routes served side by side (two apps on
   one Serve instance, requests interleaved), each piece sent to ``/v1/score`` with
   ``model: auto`` on each app and with the chosen domain named; p50/p99 of the replica's
   ``route`` part (``Server-Timing``) and of the client's latency, auto less named.

Figures 1 and 2 are computed twice: in this process with the engine's functions (for each
``--route-tokens`` value) and from the served apps' answers (the recipe's value).

Models: the exported models under ``--models`` (default ``<workdir>/models``, what ``make
demo`` writes) when they hold at least two domains, with the run's clustering; else the
recipe's SLM trained here on each domain of ``sweep.domains`` (``slm``: a shared generic
phase of ``--pretrain-tokens``, fine-tuned on ``--finetune-tokens`` of the domain) and the
recipe's clustering (``--cluster-windows`` generic windows), on a copy of the recipe's
corpus and tokenizer (the committed sample when it has none), in ``--work`` (kept: a rerun
trains nothing again).

    python bench/route_bench.py                                  # the demo recipe
    python bench/route_bench.py --models runs/demo/models        # after `make demo`
    python bench/route_bench.py --foreign r-manuals.txt --route-tokens 64,128,256
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import socket
import statistics
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

os.environ.setdefault("OMP_NUM_THREADS", "1")
# As bench/serve_bench.py: Ray starts its workers at nice 15; on a shared machine the
# replica would then get a fraction of the CPU this process gets.
os.environ.setdefault("RAY_worker_niceness", "0")

from slmfactory.platform import runtime  # noqa: E402,F401  (env defaults before Ray)


def pct(values: list[float], q: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, int(q * len(v)))] if v else math.nan


# -- models, clustering, prompts ------------------------------------------------------------

def served_models(cfg, models_dir: Path | None) -> dict[str, Path] | None:
    """The best exported model of each domain under ``models_dir``, or None if fewer than two."""
    from slmfactory.platform.errors import DataError
    from slmfactory.serving.catalog import from_folder

    if models_dir is None or not models_dir.is_dir():
        return None
    try:
        entries = from_folder(models_dir)
    except DataError:
        return None
    return {d: Path(e.path) for d, e in sorted(entries.items())} if len(entries) >= 2 else None


def train_here(cfg, work: Path, args) -> tuple[object, dict[str, Path], list[str]]:
    """(the recipe on ``work``, each domain's model folder, the overrides that make it):
    the recipe's corpus and tokenizer copied to ``work`` (the sample corpus if it has
    none), ``slm`` trained on each of ``sweep.domains``, the clustering computed."""
    import ray

    from slmfactory.data.clustering.pipeline import run_clustering
    from slmfactory.data.corpus.build import build_sample_corpus
    from slmfactory.data.tokens.tokenizer import ensure_tokenizer
    from slmfactory.pipeline import run_trial
    from slmfactory.platform.runtime import init_ray

    work.mkdir(parents=True, exist_ok=True)
    sets = {"workdir": str(work), "tracking.enabled": False, "strategy.name": "slm", "serving.replica_cpus": 0.5,
            "pretrain.max_tokens": args.pretrain_tokens, "finetune.max_tokens": args.finetune_tokens,
            "cluster.max_generic_windows": args.cluster_windows,
            "cluster.sample_windows": min(cfg.cluster.sample_windows, args.cluster_windows)}
    here = cfg.replace(**sets)
    if not (here.corpus_dir / "manifest.json").is_file():
        if (cfg.corpus_dir / "manifest.json").is_file():
            print(f"copying the recipe's corpus and tokenizer ({cfg.corpus_dir}) to {work}", flush=True)
            shutil.copytree(cfg.corpus_dir, here.corpus_dir)
            if (cfg.root / "tokenizer").is_dir():
                shutil.copytree(cfg.root / "tokenizer", here.root / "tokenizer", dirs_exist_ok=True)
        else:
            print("the recipe has no corpus: the committed sample", flush=True)
            build_sample_corpus(here)
    ensure_tokenizer(here)
    domains = list(cfg.sweep.domains) or [cfg.data.domain]
    folders = {}
    for d in domains:
        t0 = time.perf_counter()
        rec = run_trial(here.replace(**{"data.domain": d}), log=None)
        folders[d] = Path(rec.model_path)
        print(f"  {d}: {folders[d]} ({time.perf_counter() - t0:.0f} s)", flush=True)
    init_ray(num_cpus=2)
    try:
        run_clustering(here, progress=False)
    finally:
        ray.shutdown()
    return here, folders, [f"{k}={v}" for k, v in sets.items()]


def pieces_of(tok, texts: list, n: int, piece_tokens: int, by_source: bool = False) -> list[str]:
    """``n`` texts of ``piece_tokens`` tokens: the first piece of each text, then the
    second, ... (spread over documents; ``by_source``: ``texts`` are ``(source, text)``,
    and the pieces go round-robin over the sources)."""
    docs: dict[object, list[list[list[int]]]] = {}
    for i, t in enumerate(texts):
        group, text = t if by_source else (i, t)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        cut = [ids[s:s + piece_tokens] for s in range(0, len(ids) - piece_tokens + 1, piece_tokens)]
        if cut:
            docs.setdefault(group, []).append(cut)
    out: list[str] = []
    rank = 0
    while len(out) < n:
        got = False
        for group in docs.values():
            # the rank-th piece of this group: its documents' pieces, first pieces first
            flat = [c[j] for j in range(max(map(len, group))) for c in group if j < len(c)]
            if rank < len(flat):
                out.append(tok.decode(flat[rank]))
                got = True
                if len(out) == n:
                    break
        if not got:
            break
        rank += 1
    return out


def prompts(cfg, domains: list[str], args) -> tuple[dict[str, list[str]], list[str], str]:
    """({domain: held-out pieces}, foreign pieces, what the foreign text is)."""
    import pyarrow.parquet as pq

    from slmfactory.data.corpus.store import iter_texts
    from slmfactory.data.tokens.tokenizer import ensure_tokenizer, load_tokenizer

    tok = load_tokenizer(ensure_tokenizer(cfg))
    held = {d: pieces_of(tok, list(iter_texts(cfg.corpus_dir, d, "test")), args.per_domain, args.piece_tokens)
            for d in domains}
    if args.foreign:
        text = Path(args.foreign).read_text(errors="replace")
        docs = [p for p in text.split("\n\n\n") if p.strip()] or [text]
        return held, pieces_of(tok, docs, args.n_foreign, args.piece_tokens), str(args.foreign)
    t = pq.read_table(cfg.corpus_dir / "generic" / "valid.parquet", columns=["source", "text"])
    rows = list(zip(t.column("source").to_pylist(), t.column("text").to_pylist()))
    return held, pieces_of(tok, rows, args.n_foreign, args.piece_tokens, by_source=True), \
        f"the generic corpus's valid split, round-robin over its {len({s for s, _ in rows})} sources"


# -- in-process: both routes, with the engine's own functions ---------------------------------

def in_process(models: dict, router: dict | None, held: dict[str, list[str]], foreign: list[str],
               ks: list[int]) -> dict:
    """Accuracy (held-out: own domain; foreign: the best full-piece score) of each route,
    and each route's own compute per prompt in this process (ms)."""
    from slmfactory.serving import engine

    minilm = engine.load_minilm() if router is not None and engine.uses_minilm(router) else None
    rows = [(d, t) for d, ts in held.items() for t in ts] + [(None, t) for t in foreign]
    out: dict = {"held": {}, "foreign": {}, "ms": {}, "regret": {}, "own_is_best": 0, "best": [], "full": []}
    domains = list(models)
    for label in ["cluster"] * (router is not None) + [f"nll@{k}" for k in ks]:
        out["held"][label], out["foreign"][label], out["ms"][label], out["regret"][label] = 0, 0, [], []
    for own, text in rows:
        full = {d: -statistics.fmean(engine.score_ids(m, [m.encode([text])[0]])[0]) for d, m in models.items()}
        best = min(domains, key=lambda d: full[d])
        out["best"].append(best)
        out["full"].append(full)
        if own is not None:
            out["own_is_best"] += best == own
        picks = {}
        if router is not None:
            t0 = time.perf_counter()
            emb = engine.route_embedding(router, [text], minilm)
            picks["cluster"] = engine.pick_domain(router, domains, emb)[0]
            out["ms"]["cluster"].append((time.perf_counter() - t0) * 1e3)
        for k in ks:
            t0 = time.perf_counter()
            picks[f"nll@{k}"] = engine.pick_by_nll(engine.route_nlls(models, text, k))[0]
            out["ms"][f"nll@{k}"].append((time.perf_counter() - t0) * 1e3)
        for label, pick in picks.items():
            if own is not None:
                out["held"][label] += pick == own
            else:
                out["foreign"][label] += pick == best
                out["regret"][label].append(full[pick] - full[best])
    return out


# -- through Ray Serve: both routes side by side ---------------------------------------------

def post(url: str, body: dict) -> tuple[int, dict, dict, float]:
    from bench.serve_bench import server_timing

    t0 = time.perf_counter()
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            raw, status, header = r.read(), r.status, r.headers.get("server-timing")
    except urllib.error.HTTPError as e:
        raw, status, header = e.read(), e.code, None
    took = (time.perf_counter() - t0) * 1e3
    return status, json.loads(raw or b"{}"), server_timing(header), took


def through_serve(config: Path, sets: list[str], models_dir: Path, held: dict[str, list[str]], foreign: list[str],
                  warmup: int) -> dict:
    """Both apps on one Serve instance (``/before``: the clustering route, ``/after``: the
    models' scores); every piece to each app with ``model: auto``, and to ``/after`` naming
    the domain it chose, interleaved."""
    import ray
    from ray import serve

    from slmfactory.platform.config import load_config, parse_overrides
    from slmfactory.platform.runtime import init_ray
    from slmfactory.serving.app import build_app, serve_env

    cfg = load_config(config, parse_overrides(sets))
    os.environ.update(serve_env(cfg.serving))
    init_ray(num_cpus=2)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rows = [(d, t) for d, ts in held.items() for t in ts] + [(None, t) for t in foreign]
    res = {"before": [], "after": [], "named": []}
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        for name, route in (("before", "cluster"), ("after", "nll")):
            serve.run(build_app({"config": str(config), "set": [*sets, f"serving.auto_route={route}"],
                                 "models": str(models_dir)}), name=name, route_prefix=f"/{name}")
        base = f"http://127.0.0.1:{port}"
        for _, text in rows[:warmup]:  # models loaded, embedder loaded, first-call costs paid
            for name in ("before", "after"):
                post(f"{base}/{name}/v1/score", {"model": "auto", "input": text})
        for own, text in rows:
            got = {}
            for name in ("before", "after"):
                status, body, timing, took = post(f"{base}/{name}/v1/score", {"model": "auto", "input": text})
                assert status == 200, (name, status, body)
                got[name] = body["model"]
                res[name].append({"own": own, "pick": body["model"], "route": timing.get("route", math.nan),
                                  "total": timing.get("total", math.nan), "client": took,
                                  "info": body.get("slmfactory", {})})
            status, body, timing, took = post(f"{base}/after/v1/score", {"model": got["after"], "input": text})
            assert status == 200, (status, body)
            res["named"].append({"client": took, "total": timing.get("total", math.nan)})
    finally:
        serve.shutdown()
        ray.shutdown()
    return res


# -- the report ------------------------------------------------------------------------------

def share(hits: int, n: int) -> str:
    return f"{hits}/{n} = {hits / n:.3f}" if n else "-"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=REPO / "configs" / "demo.yaml")
    ap.add_argument("--models", type=Path, default=None, help="exported models (default <workdir>/models)")
    ap.add_argument("--work", type=Path, default=None,
                    help="where to train when no exported models (default /tmp/slmfactory-bench/route-<recipe>)")
    ap.add_argument("--per-domain", type=int, default=60, help="held-out pieces per served domain")
    ap.add_argument("--n-foreign", type=int, default=60, help="pieces of text no domain was built for")
    ap.add_argument("--foreign", type=Path, default=None, help="a text file to cut them from (default: generic valid)")
    ap.add_argument("--piece-tokens", type=int, default=256)
    ap.add_argument("--route-tokens", default="64,128,256",
                    help="serving.route_tokens values compared in-process (Serve runs the recipe's)")
    ap.add_argument("--pretrain-tokens", type=int, default=262144)
    ap.add_argument("--finetune-tokens", type=int, default=131072)
    ap.add_argument("--cluster-windows", type=int, default=4000)
    ap.add_argument("--warmup", type=int, default=6)
    ap.add_argument("--no-serve", action="store_true", help="in-process figures only")
    args = ap.parse_args(argv)

    import torch

    from slmfactory.platform.config import load_config
    from slmfactory.serving import engine
    from slmfactory.serving.catalog import router_data

    torch.set_num_threads(1)
    cfg = load_config(args.config)
    ks = [int(k) for k in args.route_tokens.split(",") if k]
    t0 = time.perf_counter()
    folders = served_models(cfg, args.models or cfg.root / "models")
    sets: list[str] = []
    if folders is not None:
        print(f"served: the exported models under {args.models or cfg.root / 'models'}")
        models_dir = args.models or cfg.root / "models"
    else:
        work = args.work or Path("/tmp/slmfactory-bench") / f"route-{cfg.name}"
        print(f"no exported models of two domains at {args.models or cfg.root / 'models'}: training the recipe's "
              f"slm on {list(cfg.sweep.domains)} in {work} (pretrain {args.pretrain_tokens:,} tokens, fine-tune "
              f"{args.finetune_tokens:,}; clustering on {args.cluster_windows:,} generic windows)", flush=True)
        cfg, folders, sets = train_here(cfg, work, args)
        models_dir = cfg.root / "models"
    domains = sorted(folders)
    router = router_data(cfg, domains)
    models = {d: engine.load(str(folders[d])) for d in domains}
    held, foreign, what = prompts(cfg, domains, args)
    n_held, n_foreign = sum(map(len, held.values())), len(foreign)
    params = {d: sum(p.numel() for p in m.model.parameters()) for d, m in models.items()}
    sizes = ", ".join(f"{params[d]:,}" for d in domains)
    clustering = "none" if router is None else f"{router['embedder']}, k={len(router['centroids'])}"
    print(f"\nready in {time.perf_counter() - t0:.0f} s. Domains {domains} ({sizes} parameters), context "
          f"{models[domains[0]].context}; clustering: {clustering}")
    print(f"prompts: {n_held} held-out pieces of {args.piece_tokens} tokens "
          f"({', '.join(f'{d} {len(v)}' for d, v in held.items())}); {n_foreign} foreign pieces from {what}")
    print(f"machine: {os.cpu_count()} cores, {_cpu_name()}, torch threads 1 (load average "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())})\n", flush=True)

    ip = in_process(models, router, held, foreign, ks)
    print(f"own domain's model scores its held-out piece best: {share(ip['own_is_best'], n_held)}")
    counts = {d: ip["best"][n_held:].count(d) for d in domains}
    print(f"foreign pieces scored best by: {counts}")
    print("\nin-process (engine functions; ms: the route's own compute, 1 thread)")
    print(f"{'route':<10} {'1. held-out accuracy':>22} {'2. foreign share':>20} {'regret mean':>12} {'max':>6} "
          f"{'p50 ms':>8} {'p99 ms':>8}")
    for label in ip["held"]:
        ms, reg = ip["ms"][label], ip["regret"][label] or [math.nan]
        print(f"{label:<10} {share(ip['held'][label], n_held):>22} {share(ip['foreign'][label], n_foreign):>20} "
              f"{statistics.fmean(reg):>12.4f} {max(reg):>6.3f} {pct(ms, .5):>8.2f} {pct(ms, .99):>8.2f}")
    print("   (regret: on the foreign pieces, the routed model's NLL per token less the best model's, nats)")
    if "cluster" in ip["ms"]:
        base = pct(ip["ms"]["cluster"], .5)
        print("   ratios to the clustering route, p50: " + ", ".join(
            f"{lb} {pct(ip['ms'][lb], .5) / base:.2f}x" for lb in ip["ms"] if lb != "cluster"))
    if args.no_serve:
        return 0

    k = cfg.serving.route_tokens
    print(f"\nthrough Ray Serve (both apps on one Serve instance, requests interleaved; after: route_tokens {k})",
          flush=True)
    res = through_serve(args.config, sets, models_dir, held, foreign, args.warmup)
    best = ip["best"]
    print(f"{'route':<8} {'1. held-out':>16} {'2. foreign':>16} {'route p50':>10} {'p99':>8} "
          f"{'auto p50':>9} {'p99':>8} {'named p50':>10} {'p99':>8} {'added p50':>10} {'p99':>8}")
    named = [r["client"] for r in res["named"]]
    summary = {}
    for name in ("before", "after"):
        rows = res[name]
        hits = sum(r["pick"] == r["own"] for r in rows[:n_held])
        fhits = sum(r["pick"] == b for r, b in zip(rows[n_held:], best[n_held:]))
        route = [r["route"] for r in rows]
        client = [r["client"] for r in rows]
        added = [a - b for a, b in zip(client, named)]
        summary[name] = {"route50": pct(route, .5), "route99": pct(route, .99), "added50": pct(added, .5),
                         "added99": pct(added, .99)}
        print(f"{name:<8} {share(hits, n_held):>16} {share(fhits, n_foreign):>16} {pct(route, .5):>10.2f} "
              f"{pct(route, .99):>8.2f} {pct(client, .5):>9.2f} {pct(client, .99):>8.2f} {pct(named, .5):>10.2f} "
              f"{pct(named, .99):>8.2f} {pct(added, .5):>10.2f} {pct(added, .99):>8.2f}")
    b, a = summary["before"], summary["after"]
    print(f"   (ms. route: the replica's `route` part of Server-Timing; auto / named: the client's latency of "
          f"/v1/score with model auto / naming the domain chosen; added: auto less named, per piece)")
    print(f"   after / before: route p50 {a['route50'] / b['route50']:.2f}x, p99 {a['route99'] / b['route99']:.2f}x; "
          f"added p50 {a['added50']:.1f} vs {b['added50']:.1f} ms, p99 {a['added99']:.1f} vs {b['added99']:.1f} ms")
    agree = sum(r["pick"] == p for r, p in zip(res["after"], _nll_picks(models, held, foreign, k)))
    print(f"   the served nll route agrees with the in-process one on {agree}/{len(res['after'])} pieces")
    return 0


def _nll_picks(models, held, foreign, k) -> list[str]:
    from slmfactory.serving import engine

    return [engine.pick_by_nll(engine.route_nlls(models, t, k))[0]
            for t in [t for ts in held.values() for t in ts] + foreign]


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "?"


if __name__ == "__main__":
    raise SystemExit(main())
