"""Instant specialisation, measured on this machine:

1. cold start: `slmfactory serve` started from nothing → POST /v1/domains with 50 documents
   of a held-out domain → the first completion of the new domain; seconds per phase and
   the total against the 30 s goal;
2. quality and cost: on each held-out domain (default math, literature, religion: no
   generic phase, k-means or setting of the instant path ever saw them), the test
   perplexity of every instant rule built from 50 of its training documents, next to the
   generic SLM (no specialisation), the chosen instant model fine-tuned on the same 50
   documents, and the sweep's fine-tuned SLM, SLM-pn and SLM-mix (40k in-domain tokens);
   each with its specialisation cost in seconds and FLOPs.

Needs the recipe's sweep (it trains the generic phases and the comparison models):

    slmfactory corpus build -c configs/instant.yaml && slmfactory sweep -c configs/instant.yaml
    python bench/instant_domain.py -c configs/instant.yaml
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from slmfactory.platform import runtime  # noqa: F401  (env defaults before Ray)

REPO = Path(__file__).resolve().parents[1]
GOAL_SECONDS = 30.0
N_DOCS = 50


def call(method: str, url: str, body: dict | None = None, timeout: float = 300) -> tuple[int, dict]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            return e.code, json.loads(raw or b"{}")
        except ValueError:  # the Serve proxy's own plain-text answer while the app deploys
            return e.code, {"text": raw.decode("utf-8", "replace")}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def domain_docs(cfg, domain: str, n: int = N_DOCS) -> list[str]:
    """The first ``n`` training documents of ``domain`` (corpus order: hash-shuffled)."""
    from slmfactory.data.corpus.store import iter_texts

    out = []
    for t in iter_texts(cfg.corpus_dir, domain, "train"):
        out.append(t)
        if len(out) == n:
            break
    return out


def forget(cfg, texts: list[str], name: str) -> None:
    """Drop earlier results for these documents (their candidate stages) and the bench's
    domain name, so that the cold start computes everything again."""
    import shutil

    from slmfactory.models.instant import documents_digest

    digest = documents_digest(texts)
    for marker in (cfg.root / "instant").glob("*/stage.json"):
        if json.loads(marker.read_text()).get("inputs", {}).get("docs") == digest:
            shutil.rmtree(marker.parent, ignore_errors=True)
    (cfg.root / "instant" / "domains" / f"{name}.json").unlink(missing_ok=True)


def cold_start(args, cfg, domain: str) -> dict:
    texts = domain_docs(cfg, domain)
    name = f"{domain}-instant-bench"
    forget(cfg, texts, name)
    port = free_port()
    cmd = [sys.executable, "-m", "slmfactory.cli", "serve", "-c", args.config, "--port", str(port),
           "--models", str(cfg.root / "models"), *[a for s in args.set or [] for a in ("--set", s)]]
    url = f"http://127.0.0.1:{port}"
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    out: dict = {"domain": domain, "documents": len(texts), "bytes": sum(len(t.encode()) for t in texts)}
    try:
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"serve exited with {proc.returncode}: {proc.stderr.read()[-2000:]}")
            try:
                if call("GET", f"{url}/healthz", timeout=2)[0] == 200:
                    break
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            time.sleep(0.2)
        out["ready"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        status, body = call("POST", f"{url}/v1/domains", {"name": name, "documents": texts})
        if status != 201:
            raise SystemExit(f"POST /v1/domains: {status} {body}")
        out["create"] = time.perf_counter() - t1
        out["server_timings"] = body["timings"]
        out["chosen"], out["candidates"] = body["chosen"], body["candidates"]
        t2 = time.perf_counter()
        status, r = call("POST", f"{url}/v1/completions", {"model": name, "prompt": texts[0][:80],
                                                             "max_tokens": 16, "temperature": 0})
        if status != 200:
            raise SystemExit(f"POST /v1/completions: {status} {r}")
        out["first_completion"] = time.perf_counter() - t2
        out["total"] = time.perf_counter() - t0
        out["completion"] = r["choices"][0]["text"]
        if cfg.tracking.enabled:  # registration runs off the request path: how long until it lands
            t3 = time.perf_counter()
            while time.perf_counter() - t3 < 120:
                view = call("GET", f"{url}/v1/domains/{name}")[1]
                if view.get("mlflow"):
                    out["mlflow"] = view["mlflow"]
                    out["mlflow_after_create"] = time.perf_counter() - t1
                    break
                time.sleep(0.5)
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    return out


def sweep_models(cfg, domain: str) -> dict[str, dict]:
    """The sweep's exported model of each strategy on ``domain`` (slmfactory.json)."""
    best: dict[str, dict] = {}
    for meta in (cfg.root / "models").glob("*/slmfactory.json"):
        m = json.loads(meta.read_text())
        if m.get("domain") == domain and (m["strategy"] not in best or m["test_ppl"] < best[m["strategy"]]["test_ppl"]):
            best[m["strategy"]] = m
    return best


def quality_table(args, cfg) -> list[dict]:
    import torch

    from slmfactory.models.instant import (
        _NoTraining, build_instant, finetune_instant, generic_families)
    from slmfactory.models.train.launch import LocalLauncher
    from slmfactory.models.train.phases import DomainData, evaluate_ppl, load_lm
    from slmfactory.models.strategies.base import StrategyContext, get_strategy

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    families = generic_families(cfg, train=False)
    generic_slm = get_strategy("slm").pretrain(StrategyContext(cfg, _NoTraining(), log=None))
    slm = load_lm(cfg, "slm", generic_slm.weights()).eval()
    from transformers import AutoModelForCausalLM

    from slmfactory.data.clustering.minilm import load_minilm

    minilm = load_minilm("cpu")
    rows = []
    for domain in args.domains:
        texts = domain_docs(cfg, domain)
        test = DomainData.of(cfg, domain).test.load()
        built = build_instant(cfg, texts, families, embedder=minilm)
        n_test = (len(test) // cfg.data.seq_len) * cfg.data.seq_len
        base_ppl = evaluate_ppl(cfg, slm, test)[1]
        add = lambda **r: rows.append({"domain": domain, **r})  # noqa: E731
        add(model="generic SLM (no specialisation)", ppl=base_ppl, seconds=0.0, flops=0.0)
        for rule, c in built.candidates.items():
            model = AutoModelForCausalLM.from_pretrained(c.path).eval()
            ppl = evaluate_ppl(cfg, model, test)[1]
            add(model=f"instant {rule}" + (" (chosen)" if rule == built.chosen else ""), ppl=ppl,
                seconds=built.shared_seconds + c.seconds, flops=built.shared_flops + c.flops,
                detail=c.detail, heldout_ppl=c.heldout_ppl)
        if not args.no_finetune:
            best = built.best
            ft = finetune_instant(cfg, built.docs.train, built.docs.heldout, best, cfg.finetune.max_tokens,
                                  cfg.root / "instant" / "data" / built.docs.digest,
                                  launcher=LocalLauncher(device="cpu", log=None))
            model = AutoModelForCausalLM.from_pretrained(ft["path"]).eval()
            add(model=f"instant {best.rule} + fine-tune on the 50 docs ({ft['steps']} steps)",
                ppl=evaluate_ppl(cfg, model, test)[1], seconds=built.shared_seconds + best.seconds + ft["seconds"],
                flops=built.shared_flops + best.flops + ft["flops"])
        for strategy, m in sorted(sweep_models(cfg, domain).items()):
            spec = m.get("spec_cost") or {}
            add(model=f"sweep {strategy} (fine-tuned on {cfg.data.domain_train_tokens // 1000}k in-domain tokens)",
                ppl=m["test_ppl"], seconds=spec.get("wall_seconds", float("nan")), flops=spec.get("flops", float("nan")))
        print(f"[bench] {domain}: {len(texts)} docs, {len(built.docs.train) + len(built.docs.heldout):,} tokens; "
              f"test {n_test:,} tokens; histogram pn {[round(x, 2) for x in built.histogram.get('pn', [])]}",
              file=sys.stderr, flush=True)
    return rows


def verdicts(rows: list[dict]) -> list[str]:
    out = []
    for d in dict.fromkeys(r["domain"] for r in rows):
        r = {x["model"].split(" (")[0]: x["ppl"] for x in rows if x["domain"] == d}
        best = min((x for x in rows if x["domain"] == d), key=lambda x: x["ppl"])
        line = [f"{d}: best overall {best['model']} ({best['ppl']:.1f})"]
        for fam in ("pn", "mix"):
            h, m = r.get(f"instant {fam}-histogram"), r.get(f"instant {fam}-most-frequent")
            if h and m and abs(h - m) < 1e-9 * m:
                line.append(f"{fam}: a tie, the histogram is one-hot ({h:.1f})")
            elif h and m:
                w = "histogram" if h < m else "most-frequent"
                line.append(f"{fam}: {w} wins by {abs(m - h) / max(h, m) * 100:.1f}% ({h:.1f} vs {m:.1f})")
        inst = min(x["ppl"] for x in rows if x["domain"] == d and x["model"].startswith("instant ")
                   and "fine-tune" not in x["model"])
        g = r["generic SLM"]
        line.append(f"best instant {inst:.1f} vs generic SLM {g:.1f} ({(inst - g) / g * 100:+.1f}%)")
        out.append("; ".join(line))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", "-c", default="configs/instant.yaml")
    ap.add_argument("--set", action="append", metavar="KEY=VALUE")
    ap.add_argument("--domains", nargs="+", default=["math", "literature", "religion"])
    ap.add_argument("--cold-domain", default=None, help="domain of the cold-start run (default: the first)")
    ap.add_argument("--skip-cold", action="store_true")
    ap.add_argument("--skip-table", action="store_true")
    ap.add_argument("--no-finetune", action="store_true", help="no fine-tuning row for the instant model")
    args = ap.parse_args()
    from slmfactory.platform.config import load_config, parse_overrides

    cfg = load_config(args.config, parse_overrides(args.set or []))
    report: dict = {}
    if not args.skip_cold:
        c = cold_start(args, cfg, args.cold_domain or args.domains[0])
        report["cold_start"] = c
        st = c["server_timings"]
        print(f"\ncold start → {c['documents']} documents ({c['bytes'] / 1e6:.2f} MB) of '{c['domain']}' → first "
              f"completion")
        print(f"  serve start until /healthz answers : {c['ready']:6.2f} s")
        print(f"  POST /v1/domains (201)             : {c['create']:6.2f} s   server side: tokenize "
              f"{st.get('tokenize', 0):.2f}, embed {st.get('embed', 0):.2f} (MiniLM loaded at replica start), "
              + ", ".join(f"{r} {st[r]:.2f}" for r in c["candidates"] if r in st))
        print(f"  first completion of the new domain : {c['first_completion']:6.2f} s")
        print(f"  total                              : {c['total']:6.2f} s   (goal <= {GOAL_SECONDS:.0f} s: "
              f"{'met' if c['total'] <= GOAL_SECONDS else 'MISSED'})")
        print(f"  chosen rule: {c['chosen']}; completion: {c['completion'][:60]!r}")
        if "mlflow_after_create" in c:
            print(f"  registered in MLflow {c['mlflow_after_create']:.1f} s after the POST began (off the request "
                  f"path): {c['mlflow'].get('registered_model', c['mlflow'])}")
    if not args.skip_table:
        rows = quality_table(args, cfg)
        report["table"] = rows
        print("\n| domain | model | test ppl | vs generic SLM | spec. seconds | spec. FLOPs |")
        print("|---|---|---:|---:|---:|---:|")
        base = {r["domain"]: r["ppl"] for r in rows if r["model"].startswith("generic SLM")}
        for r in rows:
            print(f"| {r['domain']} | {r['model']} | {r['ppl']:.2f} | {(r['ppl'] - base[r['domain']]) / base[r['domain']] * 100:+.1f}% "
                  f"| {r['seconds']:.2f} | {r['flops']:.2e} |")
        report["verdicts"] = verdicts(rows)
        print()
        for v in report["verdicts"]:
            print(v)
    out = cfg.root / "reports" / "instant_domain.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1, default=str))
    print(f"\nwritten: {out}")


if __name__ == "__main__":
    main()
