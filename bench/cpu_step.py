"""A CPU training step and MiniLM near the machine's matmul rate: fp32 eager vs ``auto``.

Measured in this one process, side by side:

1. The machine's matmul rate, fp32 and bf16 GFLOP/s (a 1024^3 product and the model's own
   MLP product), interleaved.
2. At the study's SLM shape (configs/study.yaml ``slm``), the demo's (configs/demo.yaml
   ``slm``) and a ~10M-parameter shape: tokens/s of the trainer's step in fp32 eager (the
   baseline) and in what ``precision: auto`` / ``compile: auto`` resolve to for a phase
   long enough to repay a compile (the study's 8M-token pretraining), in alternating rounds
   so that other load hits both; the ratio of the medians; the GFLOP/s of each step (the
   cost model's FLOPs per token) as a fraction of the matmul rate at its precision. Also
   what ``auto`` picks for the recipe's own pretraining phase.
3. A ``torch.profiler`` table (top rows by self CPU time) of both steps at the study and
   demo shapes.
4. MiniLM (the clustering's embedder) on the demo corpus's generic windows (the committed
   sample corpus when the demo's is not built): windows/s in fp32 and bf16 autocast,
   interleaved; cosine of each window's bf16 vector to its fp32 one; the share of windows
   given the same cluster (faiss spherical k-means on the fp32 vectors, as the pipeline
   fits it; bf16 vectors assigned to the same centroids, and a k-means fitted on them).

Tokens are random ids (speed does not depend on the text). Goals: auto / fp32 >= 1.4x at the
study shape, >= 1.3x at the demo's, >= 2x at ~10M; MiniLM >= 2.5x, cosine >= 0.9999, >= 99%
identical assignments.

    python bench/cpu_step.py [--shapes study,demo,10m] [--steps 8] [--rounds 3] [--no-profile]
                             [--windows 600] [--profile-json FILE]
    python bench/cpu_step.py --variants     # fp32/bf16 x eager/compiled: the evidence for auto's rule

``--profile-json FILE`` writes the auto path's rows (params, train tokens/s, the machine) in
the form a device profile's ``throughput_file`` reads. ``slmfactory calibrate -c RECIPE``
measures the same rows at a recipe's own shapes; both time the trainer's step with
``slmfactory/models/train/calibration.py``'s helpers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/_common.py

import numpy as np  # noqa: E402
import torch  # noqa: E402

from slmfactory.models.train.calibration import measuring_trainer, timed_steps  # noqa: E402,F401
from slmfactory.models.arch.lm import count_params  # noqa: E402
from slmfactory.models.train.trainer import Trainer  # noqa: E402
from slmfactory.platform.config import ModelConfig, load_config  # noqa: E402
from slmfactory.platform.cost import model_flop_terms  # noqa: E402
from slmfactory.platform.machine import this_machine  # noqa: E402
from slmfactory.platform.runtime import cpu_bf16_support  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
STUDY_PHASE_TOKENS = 8_000_000   # the study's longest pretraining: what "a long phase" means here


def shapes() -> dict[str, tuple[ModelConfig, int, int, int, object]]:
    """name -> (model, vocab, batch, seq_len, recipe pretrain section or None)."""
    study, demo = load_config(REPO / "configs" / "study.yaml"), load_config(REPO / "configs" / "demo.yaml")
    return {
        "study": (study.slm, study.tokenizer.vocab_size, study.pretrain.batch_size, study.data.seq_len, study.pretrain),
        "demo": (demo.slm, demo.tokenizer.vocab_size, demo.pretrain.batch_size, demo.data.seq_len, demo.pretrain),
        # The demo's SLM before the demo recipe moved to a narrower one (d 128, 2 layers, vocab 4k).
        "mini-slm": (ModelConfig(preset="mini-slm"), demo.tokenizer.vocab_size, demo.pretrain.batch_size,
                     demo.data.seq_len, None),
        "10m": (ModelConfig(preset="tiny", n_layers=8, d_model=256, d_mlp=1024, n_heads=4), 4096, 16, 256, None),
    }


def matmul_gflops(dtype: torch.dtype, m: int, k: int, n: int, seconds: float = 0.4) -> float:
    a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
    for _ in range(3):
        a @ b
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        reps += 1
    return 2.0 * m * k * n * reps / (time.perf_counter() - t0) / 1e9


def matmul_rates(m: int, k: int, n: int, rounds: int = 3) -> dict[str, float]:
    """Median GFLOP/s of fp32 and bf16 (m x k) @ (k x n), interleaved."""
    got: dict[str, list[float]] = {"fp32": [], "bf16": []}
    for _ in range(rounds):
        got["fp32"].append(matmul_gflops(torch.float32, m, k, n))
        got["bf16"].append(matmul_gflops(torch.bfloat16, m, k, n))
    return {k: statistics.median(v) for k, v in got.items()}


def make_trainer(mc, vocab, bs, seq_len, precision: str, compile: str, tokens: np.ndarray,
                 phase_tokens: int = STUDY_PHASE_TOKENS) -> Trainer:
    cfg = load_config(None, {"pretrain.batch_size": bs, "pretrain.max_tokens": phase_tokens,
                             "pretrain.precision": precision, "pretrain.compile": compile,
                             "pretrain.warmup_steps": 10, "pretrain.lr": 1e-3}).pretrain
    return measuring_trainer(mc, vocab, seq_len, cfg, tokens)


def profile_table(tr: Trainer, start: int, steps: int = 3, rows: int = 12) -> str:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for s in range(start, start + steps):
            tr.train_step(s)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=48)


def bench_shape(name, mc, vocab, bs, seq_len, recipe, args, rates) -> dict:
    n_tokens = (args.steps * (args.rounds + 2) + 8) * bs * seq_len
    tokens = np.random.default_rng(0).integers(0, vocab, size=n_tokens + 1).astype(np.uint16)
    base = make_trainer(mc, vocab, bs, seq_len, "fp32", "", tokens, args.phase_tokens)
    auto = make_trainer(mc, vocab, bs, seq_len, "auto", "auto", tokens, args.phase_tokens)
    params = count_params(base.model)
    t0 = time.perf_counter()
    auto.train_step(0), auto.train_step(1)
    first = time.perf_counter() - t0          # the compile (when auto compiles) and warm-up
    base.train_step(0), base.train_step(1)
    b_runs, a_runs = [], []
    step = 2
    for _ in range(args.rounds):
        b_runs.append(timed_steps(base, step, args.steps))
        a_runs.append(timed_steps(auto, step, args.steps))
        step += args.steps
    b, a = statistics.median(b_runs), statistics.median(a_runs)
    fpt = base.flops_per_token
    row = {"shape": name, "params": params, "compute_params": model_flop_terms(base.model)[0], "width": mc.dims().d_model, "batch": f"{bs} x {seq_len}",
           "auto": auto.plan.label(), "auto_reason": auto.plan.reason, "fp32_tok_s": b, "auto_tok_s": a,
           "ratio": a / b, "fp32_gflops": b * fpt / 1e9, "auto_gflops": a * fpt / 1e9,
           "fp32_frac": b * fpt / 1e9 / rates["fp32"], "auto_frac": a * fpt / 1e9 / rates[auto.plan.precision],
           "auto_first_two_steps_s": first, "rounds": {"fp32": b_runs, "auto": a_runs}}
    if recipe is not None:
        from slmfactory.models.train.trainer import plan_execution, model_width

        steps = recipe.max_tokens // (recipe.batch_size * seq_len)
        plan = plan_execution(recipe.precision, recipe.compile, "cpu", width=model_width(base.model), steps=steps,
                              flops_per_step=fpt * recipe.batch_size * seq_len)
        row["recipe_phase"] = f"{steps} steps ({recipe.max_tokens:,} tokens): {plan.label()}"
    if args.profile and name in ("study", "demo"):
        row["profile_fp32"] = profile_table(base, step)
        row["profile_auto"] = profile_table(auto, step)
    print(f"{name}: {params / 1e6:.2f}M, fp32 {b:,.0f} tok/s, auto [{auto.plan.label()}] {a:,.0f} tok/s, "
          f"ratio {a / b:.2f}x", flush=True)
    return row


VARIANTS = (("fp32", ""), ("bf16", ""), ("fp32", "default"), ("bf16", "default"))


def bench_variants(name, mc, vocab, bs, seq_len, args) -> dict:
    """The evidence behind ``auto``'s rule: tokens/s of fp32/bf16 x eager/compiled at one
    shape, interleaved, as ratios to fp32 eager."""
    n_tokens = (args.steps * (args.rounds + 2) + 8) * bs * seq_len
    tokens = np.random.default_rng(0).integers(0, vocab, size=n_tokens + 1).astype(np.uint16)
    trainers = {f"{p} {c or 'eager'}": make_trainer(mc, vocab, bs, seq_len, p, c, tokens, args.phase_tokens)
                for p, c in VARIANTS}
    for tr in trainers.values():
        tr.train_step(0), tr.train_step(1)
    runs: dict[str, list[float]] = {k: [] for k in trainers}
    step = 2
    for _ in range(args.rounds):
        for k, tr in trainers.items():
            runs[k].append(timed_steps(tr, step, args.steps))
        step += args.steps
    med = {k: statistics.median(v) for k, v in runs.items()}
    out = {k: v / med["fp32 eager"] for k, v in med.items()}
    print(f"{name} (width {mc.dims().d_model}): " + ", ".join(f"{k} {med[k]:,.0f} tok/s ({out[k]:.2f}x)" for k in med),
          flush=True)
    return {"shape": name, "tok_s": med, "ratio": out}


def bench_minilm(args) -> dict:
    import faiss

    from _common import bench_workdir, sample_window_texts
    from slmfactory.data.clustering.clusters import nearest_centroid
    from slmfactory.data.clustering.minilm import encode, load_minilm

    demo = load_config(REPO / "configs" / "demo.yaml")
    built = (demo.corpus_dir / "manifest.json").is_file()
    cfg = bench_workdir(demo)
    texts = sample_window_texts(cfg, args.windows)
    model = load_minilm("cpu")
    bs = cfg.cluster.embed_batch_size
    chunk = bs * 2
    parts = [texts[i:i + chunk] for i in range(0, len(texts), chunk)]
    encode(model, parts[0][:8], bs, "fp32"), encode(model, parts[0][:8], bs, "bf16")  # warm-up
    out = {"fp32": [], "bf16": []}
    secs = {"fp32": 0.0, "bf16": 0.0}
    for p in parts:   # alternating chunks: load drift hits both
        for prec in ("fp32", "bf16"):
            t0 = time.perf_counter()
            out[prec].append(encode(model, p, bs, prec))
            secs[prec] += time.perf_counter() - t0
    e32, e16 = np.concatenate(out["fp32"]), np.concatenate(out["bf16"])
    cos = np.sum(e32 * e16, axis=1)
    k = demo.cluster.k

    def fit(x):
        km = faiss.Kmeans(x.shape[1], k, niter=demo.cluster.kmeans_iters, seed=demo.cluster.seed, spherical=True,
                          verbose=False, max_points_per_centroid=max(256, len(x) // k + 1), min_points_per_centroid=1)
        faiss.omp_set_num_threads(1)
        km.train(np.ascontiguousarray(x))
        return np.asarray(km.centroids, dtype=np.float32)

    c32 = fit(e32)
    same_centroids = float(np.mean(nearest_centroid(e32, c32) == nearest_centroid(e16, c32)))
    refit = float(np.mean(nearest_centroid(e32, c32) == nearest_centroid(e16, fit(e16))))
    n = len(texts)
    row = {"windows": n, "corpus": "demo corpus (runs/demo)" if built else "committed sample corpus (demo recipe)",
           "window_tokens": cfg.cluster.window_tokens, "batch": bs,
           "fp32_windows_s": n / secs["fp32"], "bf16_windows_s": n / secs["bf16"], "ratio": secs["fp32"] / secs["bf16"],
           "cosine_min": float(cos.min()), "cosine_mean": float(cos.mean()), "k": k,
           "same_cluster_same_centroids": same_centroids, "same_cluster_refit": refit}
    print(f"MiniLM: fp32 {row['fp32_windows_s']:.1f} windows/s, bf16 {row['bf16_windows_s']:.1f} "
          f"({row['ratio']:.2f}x), cosine min {row['cosine_min']:.6f}, same cluster {same_centroids:.2%} "
          f"(refit {refit:.2%})", flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="study,demo,mini-slm,10m")
    ap.add_argument("--steps", type=int, default=8, help="steps per timed round (4 at 10m)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--phase-tokens", type=int, default=STUDY_PHASE_TOKENS,
                    help="the phase length auto plans for (default: the study's 8M-token pretraining)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: all cores)")
    ap.add_argument("--no-profile", dest="profile", action="store_false")
    ap.add_argument("--windows", type=int, default=600, help="MiniLM windows (0: skip MiniLM)")
    ap.add_argument("--profile-json", default="", help="write the auto path's device-profile rows here")
    ap.add_argument("--json", default="", help="write every figure here")
    ap.add_argument("--variants", action="store_true",
                    help="instead: fp32/bf16 x eager/compiled at each shape (the evidence behind auto's rule)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    threads = torch.get_num_threads()   # faiss (MiniLM's k-means) later shares and lowers OpenMP's count
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    print(f"{when}; {cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
          f"bf16 matrix feature: {cpu_bf16_support() or 'none'}", flush=True)
    table = shapes()
    wanted = [s for s in args.shapes.split(",") if s]
    if args.variants:
        res = []
        for name in wanted:
            mc, vocab, bs, seq_len, _ = table[name]
            sub = argparse.Namespace(**{**vars(args), "steps": min(args.steps, 4) if name == "10m" else args.steps})
            res.append(bench_variants(name, mc, vocab, bs, seq_len, sub))
        print("\n| shape (width) | " + " | ".join(f"{p} {c or 'eager'}" for p, c in VARIANTS) + " |")
        print("|---|" + "---|" * len(VARIANTS))
        for r, name in zip(res, wanted):
            print(f"| {name} ({table[name][0].dims().d_model}) | "
                  + " | ".join(f"{r['tok_s'][k]:,.0f} ({r['ratio'][k]:.2f}x)" for k in r["tok_s"]) + " |")
        if args.json:
            Path(args.json).write_text(json.dumps({"when": when, "cpu": cpu, "variants": res}, indent=2))
        return
    rows, mm = [], {}
    big = matmul_rates(1024, 1024, 1024)
    print(f"matmul 1024^3: fp32 {big['fp32']:.0f} GFLOP/s, bf16 {big['bf16']:.0f} GFLOP/s", flush=True)
    for name in wanted:
        mc, vocab, bs, seq_len, recipe = table[name]
        d = mc.dims()
        rates = matmul_rates(bs * seq_len, d.d_model, d.d_mlp)
        mm[name] = rates
        print(f"{name}: matmul ({bs * seq_len} x {d.d_model}) @ ({d.d_model} x {d.d_mlp}): fp32 "
              f"{rates['fp32']:.0f}, bf16 {rates['bf16']:.0f} GFLOP/s", flush=True)
        sub = argparse.Namespace(**{**vars(args), "steps": min(args.steps, 4) if name == "10m" else args.steps})
        row = bench_shape(name, mc, vocab, bs, seq_len, recipe, sub, rates)
        prec = "bf16" if row["auto"].startswith("bf16") else "fp32"
        row["fp32_frac_peak"] = row["fp32_gflops"] / big["fp32"]
        row["auto_frac_peak"] = row["auto_gflops"] / big[prec]
        rows.append(row)
    big2 = matmul_rates(1024, 1024, 1024)
    print(f"\nmatmul 1024^3, again at the end: fp32 {big2['fp32']:.0f} GFLOP/s, bf16 {big2['bf16']:.0f} GFLOP/s\n")
    print("GFLOP/s by the cost model's training FLOPs per token; in brackets, the share of the matmul rate at the "
          "step's precision: of the 1024^3 product (the machine's rate) / of the model's own MLP product\n")
    print("| shape | params | batch | auto resolves to | fp32 eager tok/s | auto tok/s | ratio | "
          "fp32 eager GFLOP/s | auto GFLOP/s | first 2 auto steps |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['params'] / 1e6:.2f}M | {r['batch']} | {r['auto']} | {r['fp32_tok_s']:,.0f} | "
              f"{r['auto_tok_s']:,.0f} | **{r['ratio']:.2f}x** | {r['fp32_gflops']:.0f} ({r['fp32_frac_peak']:.0%} / "
              f"{r['fp32_frac']:.0%}) | {r['auto_gflops']:.0f} ({r['auto_frac_peak']:.0%} / {r['auto_frac']:.0%}) | "
              f"{r['auto_first_two_steps_s']:.1f} s |")
    for r in rows:
        if "recipe_phase" in r:
            print(f"{r['shape']}: its recipe's pretraining phase, {r['recipe_phase']}")
    for r in rows:
        for side in ("fp32", "auto"):
            if f"profile_{side}" in r:
                print(f"\nprofile, {r['shape']} shape, {side} step ({r['auto'] if side == 'auto' else 'fp32, eager'}), "
                      f"3 steps:\n{r[f'profile_{side}']}")
    minilm = bench_minilm(args) if args.windows else None
    if minilm:
        print(f"\n| MiniLM, {minilm['windows']} windows of {minilm['window_tokens']} tokens ({minilm['corpus']}) | fp32 | "
              f"bf16 autocast |\n|---|---|---|\n| windows/s | {minilm['fp32_windows_s']:.1f} | "
              f"{minilm['bf16_windows_s']:.1f} (**{minilm['ratio']:.2f}x**) |\n| cosine to fp32 (min / mean) | - | "
              f"{minilm['cosine_min']:.6f} / {minilm['cosine_mean']:.6f} |\n| same cluster (k={minilm['k']}, fp32 "
              f"centroids / refitted) | - | {minilm['same_cluster_same_centroids']:.2%} / "
              f"{minilm['same_cluster_refit']:.2%} |")
    if args.profile_json:
        machine = {**this_machine(), "threads": threads, "measured": when}
        prof = [{"params": float(r["compute_params"]), "train_tokens_per_s": round(r["auto_tok_s"], 1),
                 "source": f"bench/cpu_step.py {when}, {cpu}, {threads} threads: {r['auto']}, "
                           f"{r['shape']} shape", "machine": machine} for r in rows]
        Path(args.profile_json).write_text(json.dumps(prof, indent=2) + "\n")
        print(f"\ndevice-profile rows -> {args.profile_json}")
    if args.json:
        Path(args.json).write_text(json.dumps({"when": when, "cpu": cpu, "matmul": mm, "matmul_1024": [big, big2],
                                               "shapes": rows, "minilm": minilm}, indent=2, default=str))


if __name__ == "__main__":
    main()
