"""Scoring a model on tokens: summed next-token NLL (``evaluate_nll``, all-reduced across
ranks), per-sequence NLLs and their bootstrap perplexity interval, evaluation on the trial's
device, perplexity.

Separate from the training loop (``trainer.py``): validation calls ``evaluate_nll``, and the
phase library, generic (routed) evaluation and the serving tests score models with these
without a trainer.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Callable

import numpy as np
import torch

from slmfactory.data.tokens import as_sequences
from slmfactory.models.train.execution import autocast_for, eval_device
from slmfactory.platform.errors import DataError


@torch.no_grad()
def evaluate_nll(model, tokens: np.ndarray, seq_len: int, batch_size: int = 16,
                 rank: int = 0, world_size: int = 1, device: torch.device | str | None = None,
                 autocast: Callable = nullcontext) -> tuple[float, int]:
    """Summed next-token NLL and the number of predicted tokens over ``tokens``, on
    ``device`` (default: where the model is).

    Sequences are split across ranks and the sums all-reduced when a process group is up,
    so every rank returns the same totals.
    """
    if device is None:
        device = next(model.parameters()).device
    seqs = as_sequences(tokens, seq_len, "eval")[rank::world_size]
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for i in range(0, len(seqs), batch_size):
        x = torch.from_numpy(seqs[i:i + batch_size].astype(np.int64)).to(device)
        with autocast():
            loss = model(input_ids=x, labels=x).loss
        n = x.shape[0] * (x.shape[1] - 1)
        total[0] += loss.double() * n
        total[1] += n
    if world_size > 1 and torch.distributed.is_initialized():
        torch.distributed.all_reduce(total)
    model.train(was_training)
    return float(total[0]), int(total[1])


@torch.no_grad()
def sequence_nlls(model, tokens: np.ndarray, seq_len: int, batch_size: int = 16,
                  device: torch.device | str | None = None, autocast: Callable = nullcontext) -> np.ndarray:
    """(n_sequences,) summed next-token NLL of each non-overlapping sequence of ``tokens``
    (seq_len - 1 predictions each): what a bootstrap over test sequences resamples."""
    if device is None:
        device = next(model.parameters()).device
    seqs = as_sequences(tokens, seq_len, "eval")
    was_training = model.training
    model.eval()
    out = np.empty(len(seqs), dtype=np.float64)
    for i in range(0, len(seqs), batch_size):
        x = torch.from_numpy(seqs[i:i + batch_size].astype(np.int64)).to(device)   # (B, T)
        with autocast():
            logits = model(input_ids=x).logits                                      # (B, T, V)
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), x[:, 1:],
                                                reduction="none")                   # (B, T-1)
        out[i:i + len(x)] = nll.double().sum(1).cpu().numpy()
    model.train(was_training)
    return out


def bootstrap_ppl(seq_nll: np.ndarray, tokens_per_seq: int, replicates: int = 1000, seed: int = 0,
                  level: float = 0.95) -> dict[str, float]:
    """Perplexity of a test sample and its bootstrap interval over test *sequences*
    (sequences resampled with replacement, ``replicates`` times, seeded: the same draws
    for every strategy scoring the same sample). Returns ``nll`` (mean per token), ``se``
    (the replicates' standard deviation of the mean NLL), ``ppl``, ``lo``, ``hi``
    (percentile interval at ``level``)."""
    seq_nll = np.asarray(seq_nll, dtype=np.float64)
    n = len(seq_nll)
    if n == 0:
        raise DataError("bootstrap: no test sequences")
    nll = float(seq_nll.sum() / (n * tokens_per_seq))
    draws = np.random.default_rng(seed).integers(0, n, size=(replicates, n))       # (R, n)
    means = seq_nll[draws].sum(1) / (n * tokens_per_seq)                             # (R,)
    tail = (1.0 - level) / 2.0
    lo, hi = np.quantile(means, [tail, 1.0 - tail])
    return {"nll": nll, "se": float(means.std(ddof=1)) if replicates > 1 else 0.0, "ppl": math.exp(nll),
            "lo": math.exp(float(lo)), "hi": math.exp(float(hi)), "sequences": n}


def evaluate_on_trial_device(model, tokens: np.ndarray, seq_len: int, batch_size: int,
                             device: torch.device | str | None = None) -> tuple[float, int]:
    """``evaluate_nll`` on ``device`` (default: the trial's, its GPU when it has one) with
    the trainer's mixed precision; the model is moved there for the pass and back after."""
    device = torch.device(device) if device is not None else eval_device()
    was = next(model.parameters()).device
    model.to(device)
    try:
        return evaluate_nll(model, tokens, seq_len, batch_size, device=device, autocast=autocast_for(device))
    finally:
        model.to(was)


def perplexity(nll_sum: float, n_tokens: int) -> float:
    return math.exp(nll_sum / max(n_tokens, 1))
