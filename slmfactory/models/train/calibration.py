"""``slmfactory calibrate``: this machine's training rate at a recipe's own model shapes,
as device-profile rows.

A recipe's device profile (``device.throughput``) prices every projected device-hour; its
rows are tokens/s measured on one machine. Here the recipe's ``slm`` and ``llm`` are
trained at its ``data.seq_len``, ``pretrain.batch_size`` and ``tokenizer.vocab_size`` by the
trainer itself, on the path ``precision`` / ``compile`` (``auto``: ``trainer.plan_execution``)
take for its longest generic pretraining phase, on random token ids (speed does not depend on
the text). The rows record the machine they were measured on (``platform/machine.py``), in the
JSON form ``device.throughput_file`` reads, with the ratio to what the recipe's current
profile projects at each size. ``bench/cpu_step.py`` times its steps with the same helpers.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from slmfactory.data.tokens import PackedBatches
from slmfactory.models.arch import build_model, count_params
from slmfactory.models.train.execution import eval_device
from slmfactory.models.train.trainer import Trainer
from slmfactory.platform.config import ModelConfig, RunConfig, TrainConfig
from slmfactory.platform.cost import model_flop_terms, projected_tokens_per_s
from slmfactory.platform.machine import describe, this_machine
from slmfactory.platform.runtime import say
from slmfactory.platform.stages import write_text_atomic

WARMUP_STEPS = 2
"""Untimed steps first: the allocator's warm-up, and the compile when the plan compiles."""
ROUNDS = 3
"""The timed steps run in up to this many rounds; the rate is the rounds' median (a burst of
other load slows one round, not the figure)."""


def measuring_trainer(model_cfg: ModelConfig, vocab: int, seq_len: int, train_cfg: TrainConfig, tokens: np.ndarray,
                      device: torch.device | str = "cpu", profile=None) -> Trainer:
    """A trainer of a fresh ``model_cfg`` on ``tokens`` whose execution plan is the one
    ``train_cfg`` (its precision, compile, batch size and budget) resolves to; no
    validation, checkpoints or early stopping, nothing logged."""
    train_cfg = dataclasses.replace(train_cfg, eval_every=0, checkpoint_every=0, patience=0)
    model = build_model(model_cfg, vocab, seq_len, seed=0).to(device)
    return Trainer(model, PackedBatches(tokens, seq_len, train_cfg.batch_size, seed=0), train_cfg, seq_len=seq_len,
                   device=device, profile=profile, log=None)


def timed_steps(tr: Trainer, start: int, n: int) -> float:
    """Training tokens/s of ``n`` of ``tr``'s steps from step ``start`` (each step ends
    with its loss read back, so a GPU's queued work is inside the window)."""
    t0 = time.perf_counter()
    for s in range(start, start + n):
        tr.train_step(s)
    return n * tr.cfg.batch_size * tr.seq_len / (time.perf_counter() - t0)


def random_tokens(vocab: int, n: int, seed: int = 0) -> np.ndarray:
    """``n`` random token ids below ``vocab`` (uint16 where they fit, as token streams are)."""
    dtype = np.uint16 if vocab <= 65536 else np.int32
    return np.random.default_rng(seed).integers(0, vocab, size=n).astype(dtype)


def longest_generic_phase(cfg: RunConfig) -> TrainConfig:
    """The recipe's ``pretrain`` section at its largest generic budget (``sweep.generic_tokens``
    or ``sweep.generic_flops``, else its own): the phase whose length ``compile: auto``
    weighs, and the one a profile's hours are mostly spent on."""
    tcfg = cfg.pretrain
    if cfg.sweep.generic_tokens:
        tcfg = dataclasses.replace(tcfg, max_tokens=int(max(cfg.sweep.generic_tokens)), max_flops=0.0)
    elif cfg.sweep.generic_flops:
        tcfg = dataclasses.replace(tcfg, max_flops=float(max(cfg.sweep.generic_flops)))
    return tcfg


@dataclass
class Measured:
    """One model shape measured: its device-profile row and how it compares."""

    model: str
    """``slm`` or ``llm`` (both, when the recipe gives them one shape)."""
    params: int
    compute_params: float
    """``model_flop_terms``' N (tied head included): what profile rows and ``Work`` count."""
    plan: str
    reason: str
    tokens_per_s: float
    projected_tokens_per_s: float
    """What the recipe's current device profile projects at this size."""
    first_steps_s: float
    """The untimed warm-up steps (the compile when the plan compiles)."""
    rounds: list[float] = field(default_factory=list)
    row: dict = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        """Measured / projected: below 1 this machine trains slower than the profile says."""
        return self.tokens_per_s / self.projected_tokens_per_s


def calibrate(cfg: RunConfig, steps: int = 12, log: Callable[[str], None] | None = say,
              device: torch.device | str | None = None) -> list[Measured]:
    """Measure the recipe's ``slm`` and ``llm`` (one row per distinct shape) on this
    machine: ``WARMUP_STEPS`` untimed, then ``steps`` timed in up to ``ROUNDS`` rounds."""
    if steps < 1:
        raise ValueError("steps: expected >= 1")
    device = torch.device(device) if device is not None else eval_device()
    tcfg = longest_generic_phase(cfg)
    vocab, seq_len, bs = cfg.tokenizer.vocab_size, cfg.data.seq_len, tcfg.batch_size
    rounds = min(ROUNDS, steps)
    per_round = math.ceil(steps / rounds)
    tokens = random_tokens(vocab, (WARMUP_STEPS + rounds * per_round + 1) * bs * seq_len + 1)
    machine = this_machine()
    when = machine["measured"]
    shapes: dict[str, ModelConfig] = {}
    for key in ("slm", "llm"):
        mc = getattr(cfg, key)
        same = next((k for k, other in shapes.items() if other.dims() == mc.dims()), None)
        if same is None:
            shapes[key] = mc
        else:
            shapes[f"{same}+{key}"] = shapes.pop(same)
    out = []
    for key, mc in shapes.items():
        tr = measuring_trainer(mc, vocab, seq_len, tcfg, tokens, device, cfg.device)
        d = mc.dims()
        if log:
            log(f"[calibrate] {key}: {count_params(tr.model) / 1e6:.2f}M parameters (d {d.d_model}, {d.n_layers} "
                f"layers), batch {bs} x {seq_len}: {tr.plan.label()} ({tr.plan.reason or 'as the recipe sets it'})")
        t0 = time.perf_counter()
        for s in range(WARMUP_STEPS):
            tr.train_step(s)
        first = time.perf_counter() - t0
        rates = [timed_steps(tr, WARMUP_STEPS + r * per_round, per_round) for r in range(rounds)]
        tps = statistics.median(rates)
        n_compute = float(model_flop_terms(tr.model)[0])
        projected = projected_tokens_per_s(cfg.device, n_compute, tr.flops_per_token)
        row = {"params": n_compute, "train_tokens_per_s": round(tps, 1),
               "source": f"slmfactory calibrate {when}, recipe {cfg.name}, {key} shape (d {d.d_model}, {d.n_layers} "
                         f"layers, vocab {vocab}, batch {bs} x {seq_len}): {tr.plan.label()}, "
                         f"{rounds} x {per_round} steps, {describe(machine)}",
               "machine": machine}
        out.append(Measured(key, count_params(tr.model), n_compute, tr.plan.label(), tr.plan.reason, tps, projected,
                            first, rates, row))
        if log:
            log(f"[calibrate] {key}: {tps:,.0f} tokens/s (rounds {', '.join(f'{r:,.0f}' for r in rates)}; warm-up "
                f"{first:.1f} s); profile {cfg.device.name} projects {projected:,.0f}: {tps / projected:.2f}x")
        tr.restore_attention()
        del tr
        gc.collect()
    return out


def write_profile(measured: list[Measured], path: str | Path) -> Path:
    """The rows as the JSON list ``device.throughput_file`` reads."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps([m.row for m in measured], indent=2) + "\n")
    return path
