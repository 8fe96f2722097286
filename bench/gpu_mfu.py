"""Model FLOP utilisation of the paper's SLM trained by our Trainer on one GPU.

MFU = achieved FLOP/s / peak, where achieved = ``train_flops_per_token`` (6·N + 6·L·T·d,
slmfactory.platform.cost) x training tokens/s, timed around each ``train_step`` after
``--warmup`` steps (CUDA-synchronised, so queued kernels are not mistaken for speed).
The Trainer runs bf16 autocast and fused AdamW on CUDA by itself. Each variant
``MODE:BATCH`` (MODE ``eager`` or a ``torch.compile`` mode, i.e. ``pretrain.compile``)
trains a fresh model in this process; the table prints each one's ratio to the first.
Peak is the card's dense bf16 figure (H100/H200 SXM: 989 TFLOP/s, A100: 312), found
from the device name or given with ``--peak``.

Tokens are a seeded uniform stream over the vocabulary: speed does not depend on which
tokens they are, and a 32k BPE need not be trained first.

    python bench/gpu_mfu.py [--preset paper-slm] [--seq-len 1024] \
        [--variants eager:32,default:32,default:64] [--steps 30]
    python bench/gpu_mfu.py --device cpu --preset tiny --vocab 512 --seq-len 64 \
        --variants eager:4 --steps 6 --warmup 2 --peak 2e11     # smoke run without a GPU

``--profile FILE`` also times forward-only (inference) tokens/s of each variant and writes
the fastest variant's row to FILE, the rows a device profile prices work with
(``device.throughput_file: FILE``; run once per model size with ``--preset`` and merge the
lists, or append with ``--profile`` on an existing file)."""

from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

from slmfactory.data.tokens.streams import PackedBatches  # noqa: E402
from slmfactory.models.train.launch import WorkerContext  # noqa: E402
from slmfactory.models.arch.lm import build_model, count_params  # noqa: E402
from slmfactory.models.train.trainer import Trainer  # noqa: E402
from slmfactory.platform.config import COMPILE_MODES, ModelConfig, TrainConfig  # noqa: E402
from slmfactory.platform.cost import train_flops_per_token  # noqa: E402

NO_GPU = "no CUDA device: this benchmark needs a GPU (or --device cpu for a smoke run)"
MODES = ("eager",) + COMPILE_MODES[1:]
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12}


def parse_variants(text: str) -> list[tuple[str, int]]:
    out = []
    for item in text.split(","):
        mode, _, batch = item.strip().partition(":")
        if mode not in MODES or not batch.isdigit() or int(batch) < 1:
            raise argparse.ArgumentTypeError(f"--variants: expected MODE:BATCH with MODE in {MODES}, got {item!r}")
        out.append((mode, int(batch)))
    return out


def inference_tokens_per_s(model, device: torch.device, vocab: int, seq_len: int, batch: int, steps: int,
                           warmup: int) -> float:
    """Forward-only tokens/s (bf16 autocast on CUDA), CUDA-synchronised around the timed steps."""
    import time
    from contextlib import nullcontext

    model.eval()
    x = torch.randint(0, vocab, (batch, seq_len), device=device, generator=torch.Generator(device).manual_seed(0))
    cast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    with torch.inference_mode(), cast:
        for i in range(steps):
            if i == warmup:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                t0 = time.perf_counter()
            model(input_ids=x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return batch * seq_len * (steps - warmup) / (time.perf_counter() - t0)


def run_variant(args, device: torch.device, mode: str, batch: int, timing_file: Path) -> dict:
    model = build_model(ModelConfig(preset=args.preset), args.vocab, args.seq_len).to(device)
    rng = np.random.default_rng(0)
    n_tokens = (args.steps + 1) * batch * (args.seq_len + 1)
    tokens = rng.integers(0, args.vocab, size=n_tokens, dtype=np.int64).astype(np.int32)
    tcfg = TrainConfig(lr=1e-4, warmup_steps=args.warmup, batch_size=batch, compile="" if mode == "eager" else mode,
                       max_tokens=args.steps * batch * args.seq_len, eval_every=0, checkpoint_every=0)

    def factory(ctx: WorkerContext) -> Trainer:
        return Trainer(model, PackedBatches(tokens, args.seq_len, batch, seed=0), tcfg,
                       seq_len=args.seq_len, out_dir=None, phase="mfu", device=ctx.device, log=None)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    trainer = _common.timed_factory(factory, str(timing_file), args.warmup)(WorkerContext(device=device, log=None))
    result = trainer.fit(resume=False)
    t = json.loads(timing_file.read_text())
    fpt = train_flops_per_token(model, args.seq_len)
    t.update(mode=mode, batch=batch, params=count_params(model), flops_per_token=fpt,
             achieved_flops=fpt * t["tokens_per_s"], mfu=fpt * t["tokens_per_s"] / args.peak,
             final_loss=result.train_loss,
             peak_memory_gib=torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0)
    if args.profile:
        t["inference_tokens_per_s"] = inference_tokens_per_s(model, device, args.vocab, args.seq_len, batch,
                                                             args.steps, args.warmup)
    del trainer, model
    gc.collect()
    if device.type == "cuda":
        torch._dynamo.reset()
        torch.cuda.empty_cache()
    return t


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="paper-slm")
    ap.add_argument("--vocab", type=int, default=32_000, help="paper: 32k SentencePiece")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--variants", type=parse_variants, default=parse_variants("eager:32,default:32,default:64"),
                    help="comma-separated MODE:BATCH; the first is the baseline of the ratios")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=8, help="untimed steps (compilation happens here)")
    ap.add_argument("--peak", type=float, default=0.0, help="peak dense bf16 FLOP/s (default: from the device name)")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--json", default=None, help="also write the numbers here")
    ap.add_argument("--profile", default=None,
                    help="append this size's measured row (params, train/inference tokens/s) to this JSON list: "
                         "a device profile's device.throughput_file")
    args = ap.parse_args(argv)
    if args.steps <= args.warmup:
        ap.error("--steps must exceed --warmup")
    if args.device == "cuda" and not torch.cuda.is_available():
        print(NO_GPU, file=sys.stderr)
        return 2
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    if not args.peak:
        args.peak = next((v for k, v in PEAK_BF16.items() if k in name), 0.0)
        if not args.peak:
            ap.error(f"--peak: no known bf16 peak for {name!r}; pass the card's dense bf16 FLOP/s")
    torch.backends.cuda.matmul.allow_tf32 = True  # any fp32 matmul left outside autocast

    timing_file = Path(args.json or "/tmp/gpu_mfu.json").with_suffix(".timing.json")
    rows = []
    for mode, batch in args.variants:
        row = run_variant(args, device, mode, batch, timing_file)
        rows.append(row)
        print(f"  {mode}:{batch} {row['tokens_per_s']:,.0f} tokens/s  MFU {row['mfu']:.3f}  "
              f"peak memory {row['peak_memory_gib']:.1f} GiB", flush=True)
    base = rows[0]["tokens_per_s"]
    print(f"\n{name}: {args.preset} ({rows[0]['params'] / 1e6:.1f}M params), context {args.seq_len}, "
          f"vocab {args.vocab}, bf16 autocast, {rows[0]['flops_per_token'] / 1e9:.3f} GFLOP/token, "
          f"peak {args.peak / 1e12:.0f} TFLOP/s, {args.steps - args.warmup} timed steps each")
    print(f"| variant | tokens/s | TFLOP/s | MFU | vs {args.variants[0][0]}:{args.variants[0][1]} | peak GiB | loss |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']}:{r['batch']} | {r['tokens_per_s']:,.0f} | {r['achieved_flops'] / 1e12:.1f} | "
              f"{r['mfu']:.3f} | {r['tokens_per_s'] / base:.2f} | {r['peak_memory_gib']:.1f} | {r['final_loss']:.3f} |")
    if args.profile:
        best = max(rows, key=lambda r: r["tokens_per_s"])
        path = Path(args.profile)
        table = json.loads(path.read_text()) if path.is_file() else []
        table = [r for r in table if r.get("params") != best["params"]] + [{
            "params": best["params"], "train_tokens_per_s": best["tokens_per_s"],
            "inference_tokens_per_s": best["inference_tokens_per_s"],
            "source": f"bench/gpu_mfu.py {name} {args.preset} {best['mode']}:{best['batch']} context {args.seq_len}"}]
        path.write_text(json.dumps(sorted(table, key=lambda r: r["params"]), indent=2))
        print(f"profile row for {args.preset} -> {path} (device.throughput_file)")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": name, "preset": args.preset, "seq_len": args.seq_len,
                                               "peak_flops": args.peak, "variants": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
