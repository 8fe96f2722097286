"""Where and in which precision a phase runs: its execution plan (``plan_execution``:
``precision`` / ``compile``, either ``auto``, resolved for the device and the model's width),
the autocast that carries it out, fp32 attention under CPU bf16, and the evaluation device.

Separate from the loop (``trainer.py``) because the choice is a pure function of the phase's
shape and the machine: the bench scripts and the docs (docs/cpu-speed.md) reason about it alone.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable

import torch

from slmfactory.platform.runtime import cpu_bf16_support


def eval_device() -> torch.device:
    """Where a trial evaluates: its GPU when the process has one (Ray exposes only the
    trial's own GPUs), else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast_for(device: torch.device | str, precision: str | None = None) -> Callable:
    """Mixed precision on ``device``: bf16 autocast when ``precision`` is ``bf16`` (default:
    bf16 on CUDA, fp32 elsewhere: what evaluation outside a trainer uses)."""
    device = torch.device(device)
    if precision is None:
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "bf16":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext


# -- precision and compile: what ``auto`` picks (docs/cpu-speed.md, bench/cpu_step.py) --------

BF16_EAGER_MIN_WIDTH = 256
"""Eager CPU bf16 pays surely from this hidden width (2-core Xeon with AMX, tokens/s against
fp32 eager: d 256 1.6x; below it 1.05-1.37x, and 0.6x before attention ran in fp32: the casts
and elementwise work eat most of the faster matrix products)."""
BF16_COMPILED_MIN_WIDTH = 64
"""Compiled, the casts fuse into neighbouring kernels and bf16 pays from this width (bench/
cpu_step.py --variants, attention in fp32: d 64 bf16 compiled 1.9-2.4x fp32 eager where fp32
compiled gives 1.1-1.5x; d 128 2.8x; d 256 2.8-3.2x). Narrower models are unmeasured."""
CPU_EAGER_FLOPS = 60e9
"""Training FLOP/s assumed for an eager fp32 step on a CPU when estimating a phase's length
(the slowest shape measured on the 2-core Xeon: the study's 0.26M model; larger shapes run
faster, so the estimate errs towards a longer phase)."""
COMPILE_SECONDS = 30.0
"""One-off cost of ``torch.compile`` (forward + backward) on 2 cores: 11-32 s measured."""
COMPILE_GAIN = 1.4
"""Speed-up assumed for a compiled step over eager when deciding whether compiling repays."""


@dataclass(frozen=True)
class ExecutionPlan:
    """How a phase runs: the resolved precision and compile mode, and why."""

    precision: str
    """``fp32`` or ``bf16`` (autocast)."""
    compile: str
    """A ``torch.compile`` mode, or "" for eager."""
    reason: str

    def label(self) -> str:
        return f"{self.precision}, " + (f"compiled ({self.compile})" if self.compile else "eager")


def plan_execution(precision: str, compile: str, device: torch.device | str, *, width: int,
                   steps: int, flops_per_step: float, peak_flops: float = 0.0,
                   bf16_support: Callable[[], str] = cpu_bf16_support) -> ExecutionPlan:
    """Resolve ``precision`` / ``compile`` (either may be ``auto``) for a phase of ``steps``
    steps of ``flops_per_step`` on ``device``, for a model of hidden width ``width``.

    compile ``auto``: compile (mode ``default``) when the phase's estimated eager time, at
    ``CPU_EAGER_FLOPS`` on a CPU (``peak_flops`` · 0.4 elsewhere), would shrink by
    ``1 - 1/COMPILE_GAIN`` by more than ``COMPILE_SECONDS``: a phase too short to repay the
    compile stays eager. precision ``auto``: bf16 on CUDA; on a CPU, bf16 only where
    ``bf16_support()`` names a bf16 matrix feature and ``width`` reaches
    ``BF16_COMPILED_MIN_WIDTH`` (compiled) or ``BF16_EAGER_MIN_WIDTH`` (eager); else fp32.
    """
    device = torch.device(device)
    reasons = []
    if compile == "auto":
        rate = CPU_EAGER_FLOPS if device.type == "cpu" else max(peak_flops, 1.0) * 0.4
        eager_s = steps * flops_per_step / rate
        saved = eager_s * (1.0 - 1.0 / COMPILE_GAIN)
        compile = "default" if saved > COMPILE_SECONDS else ""
        reasons.append(f"compile: ~{eager_s:.0f} s eager, saves ~{saved:.0f} s vs {COMPILE_SECONDS:.0f} s to compile")
    if precision == "auto":
        if device.type == "cuda":
            precision = "bf16"
            reasons.append("bf16: CUDA")
        elif device.type != "cpu":
            precision = "fp32"
        else:
            feature = bf16_support()
            need = BF16_COMPILED_MIN_WIDTH if compile else BF16_EAGER_MIN_WIDTH
            if not feature:
                precision = "fp32"
                reasons.append("fp32: this CPU has no bf16 matrix units (no AMX-BF16 / AVX-512-BF16)")
            elif width < need:
                precision = "fp32"
                reasons.append(f"fp32: width {width} < {need} ({'compiled' if compile else 'eager'})")
            else:
                precision = "bf16"
                reasons.append(f"bf16: {feature}, width {width} >= {need}")
    return ExecutionPlan(precision, compile, "; ".join(reasons))


SDPA_FP32 = "sdpa_fp32"


def _sdpa_fp32(module, query, key, value, attention_mask, **kwargs):
    """HF's SDPA attention with autocast off: fp32 inputs and output. CPU autocast runs
    ``scaled_dot_product_attention`` in bf16, and torch's CPU flash kernel is ~4x slower in
    bf16 than in fp32 at these head sizes (bench/cpu_step.py's profile: 37% of a bf16 step at
    the demo's shape); the projections around it keep their bf16 matrix products."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    with torch.autocast(query.device.type, enabled=False):
        return sdpa_attention_forward(module, query.float(), key.float(), value.float(), attention_mask, **kwargs)


def _hf_configs(model: torch.nn.Module) -> list:
    """The HF configs of ``model`` and what it wraps (DDP's ``module``, a LoRA ``base_model``)."""
    out = []
    for m in (model, getattr(model, "module", None), getattr(model, "base_model", None)):
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation") and all(cfg is not c for c in out):
            out.append(cfg)
    return out


def fp32_attention(model: torch.nn.Module) -> Callable[[], None]:
    """Switch ``model``'s SDPA attention to ``_sdpa_fp32``; returns the undo (the exported
    and served model keeps plain ``sdpa``)."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(SDPA_FP32, _sdpa_fp32)
    AttentionMaskInterface.register(SDPA_FP32, sdpa_mask)
    changed = [c for c in _hf_configs(model) if c._attn_implementation in ("sdpa", SDPA_FP32)]
    for c in changed:
        c._attn_implementation = SDPA_FP32

    def undo() -> None:
        for c in changed:
            c._attn_implementation = "sdpa"

    return undo


def model_width(model: torch.nn.Module) -> int:
    """Hidden width of an HF-style model (``config.hidden_size``), else the widest
    parameter's last dimension: what decides whether bf16 pays."""
    for m in (model, getattr(model, "module", None), getattr(model, "base_model", None)):
        width = getattr(getattr(m, "config", None), "hidden_size", None)
        if isinstance(width, int):
            return width
    return max((p.shape[-1] for p in model.parameters() if p.dim() >= 2), default=0)
