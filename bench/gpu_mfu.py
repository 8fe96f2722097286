"""Model FLOP utilisation of the paper's SLM trained by our Trainer on one GPU.

MFU = achieved FLOP/s / peak, where achieved = ``train_flops_per_token`` (6·N + 6·L·T·d,
slmfactory.platform.cost) x training tokens/s, timed around each ``train_step`` after
``--warmup`` steps (CUDA-synchronised, so queued kernels are not mistaken for speed).
The Trainer runs bf16 autocast on CUDA by itself; peak defaults to the H100 SXM dense
bf16 figure (989 TFLOP/s) — pass ``--peak`` for another card (A100: 312e12).

Tokens are a seeded uniform stream over the vocabulary: speed does not depend on which
tokens they are, and a 32k BPE need not be trained first.

    python bench/gpu_mfu.py [--preset paper-slm] [--seq-len 1024] [--batch 32] [--steps 30]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

from slmfactory.models.data import PackedBatches  # noqa: E402
from slmfactory.models.launch import WorkerContext  # noqa: E402
from slmfactory.models.lm import build_model, count_params  # noqa: E402
from slmfactory.models.trainer import Trainer  # noqa: E402
from slmfactory.platform.config import ModelConfig, TrainConfig  # noqa: E402
from slmfactory.platform.cost import train_flops_per_token  # noqa: E402

NO_GPU = "no CUDA device: this benchmark needs a GPU"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="paper-slm")
    ap.add_argument("--vocab", type=int, default=32_000, help="paper: 32k SentencePiece")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=32, help="sequences per step")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--peak", type=float, default=989e12, help="peak dense bf16 FLOP/s of the card")
    ap.add_argument("--json", default=None, help="also write the numbers here")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print(NO_GPU, file=sys.stderr)
        return 2
    if args.steps <= args.warmup:
        ap.error("--steps must exceed --warmup")

    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True  # any fp32 matmul left outside autocast
    model = build_model(ModelConfig(preset=args.preset), args.vocab, args.seq_len).to(device)
    rng = np.random.default_rng(0)
    n_tokens = (args.steps + 1) * args.batch * (args.seq_len + 1)
    tokens = rng.integers(0, args.vocab, size=n_tokens, dtype=np.int64).astype(np.int32)
    tcfg = TrainConfig(lr=1e-4, warmup_steps=args.warmup, batch_size=args.batch,
                       max_tokens=args.steps * args.batch * args.seq_len, eval_every=0, checkpoint_every=0)
    out = Path(args.json or "/tmp/gpu_mfu-timing.json")

    def factory(ctx: WorkerContext) -> Trainer:
        return Trainer(model, PackedBatches(tokens, args.seq_len, args.batch, seed=0), tcfg,
                       seq_len=args.seq_len, out_dir=None, phase="mfu", device=ctx.device, log=None)

    trainer = _common.timed_factory(factory, str(out), args.warmup)(WorkerContext(device=device, log=None))
    trainer.fit(resume=False)
    t = json.loads(out.read_text())
    fpt = train_flops_per_token(model, args.seq_len)
    achieved = fpt * t["tokens_per_s"]
    mfu = achieved / args.peak
    name = torch.cuda.get_device_name(device)
    print(f"{name}: {args.preset} ({count_params(model) / 1e6:.1f}M params), context {args.seq_len}, "
          f"batch {args.batch}, bf16 autocast")
    print(f"{t['tokens_per_s']:,.0f} tokens/s over {t['steps']} steps; {fpt / 1e9:.3f} GFLOP/token; "
          f"{achieved / 1e12:.1f} TFLOP/s; peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    print(f"MFU {mfu:.3f} (peak {args.peak / 1e12:.0f} TFLOP/s)")
    t.update({"device": name, "preset": args.preset, "flops_per_token": fpt, "achieved_flops": achieved,
              "peak_flops": args.peak, "mfu": mfu})
    out.write_text(json.dumps(t, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
