"""Trainer tokens/s vs a bare PyTorch loop on the same model and batches, side by side.

Both run in this process, interleaved in rounds (bare, trainer, bare, trainer, …) so that
drift in machine load hits both equally; the ratio of the medians is printed.
Goal: trainer / bare >= 0.97 (the hooks, LR schedule and budget logic cost ~nothing).

    python bench/train_throughput.py [--config configs/demo.yaml] [--steps 30] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import real_tokens  # noqa: E402

from slmfactory.data.tokens.streams import PackedBatches  # noqa: E402
from slmfactory.models.arch.lm import build_model, count_params  # noqa: E402
from slmfactory.models.train.trainer import Trainer  # noqa: E402
from slmfactory.platform.config import load_config  # noqa: E402


def bare_loop(model, batches, steps: int, lr: float, clip: float) -> float:
    """The baseline: forward with labels, backward, clip, Adam step. Returns tokens/s."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.99), foreach=True)
    model.train()
    t0 = time.perf_counter()
    for step in range(steps):
        x = batches.batch(step).input_ids
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        float(loss.detach())
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return steps * x.numel() / (time.perf_counter() - t0)


def trainer_loop(model, batches, cfg, steps: int, seq_len: int) -> float:
    tcfg = cfg.replace(**{"pretrain.max_tokens": steps * cfg.pretrain.batch_size * seq_len,
                          "pretrain.eval_every": 0, "pretrain.checkpoint_every": 0}).pretrain
    with tempfile.TemporaryDirectory() as d:
        tr = Trainer(model, batches, tcfg, seq_len=seq_len, out_dir=None, log=None)
        t0 = time.perf_counter()
        res = tr.fit(resume=False)
        return res.tokens / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    cfg = load_config(args.config)
    seq_len, bs = cfg.data.seq_len, cfg.pretrain.batch_size
    tokens, vocab = real_tokens(cfg.tokenizer.vocab_size, (args.steps + 1) * bs * seq_len * 2)
    batches = PackedBatches(tokens, seq_len, bs, seed=0)
    torch.manual_seed(0)
    print(f"model {cfg.slm.preset}: {count_params(build_model(cfg.slm, vocab, seq_len)) / 1e6:.2f}M params, "
          f"batch {bs} x {seq_len}, {args.steps} steps/round, {torch.get_num_threads()} threads")
    bare, ours = [], []
    bare_loop(build_model(cfg.slm, vocab, seq_len), batches, 3, cfg.pretrain.lr, cfg.pretrain.grad_clip)  # warm-up
    for r in range(args.rounds):
        bare.append(bare_loop(build_model(cfg.slm, vocab, seq_len), batches, args.steps, cfg.pretrain.lr,
                              cfg.pretrain.grad_clip))
        ours.append(trainer_loop(build_model(cfg.slm, vocab, seq_len), batches, cfg, args.steps, seq_len))
        print(f"round {r}: bare {bare[-1]:,.0f} tok/s   trainer {ours[-1]:,.0f} tok/s")
    ratio = statistics.median(ours) / statistics.median(bare)
    print(f"trainer/bare tokens/s ratio: {ratio:.3f} (goal >= 0.97)")


if __name__ == "__main__":
    main()
