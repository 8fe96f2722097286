"""Cost accounting in FLOPs, measured seconds and device-hours.

Training FLOPs per token ≈ 6·N + 6·L·T·d (Kaplan et al.: N non-embedding parameters
incl. the output head, plus attention scores over context T); inference ≈ 2·N + 2·L·T·d
per token. Device-hours come two ways: measured wall seconds × workers, and FLOPs /
(peak · MFU) of the configured device profile (the paper's unit: A100 GPU-hours).
Total over N domains: C(N) = C_generic + N · C_specialisation.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field


def model_flop_terms(model) -> tuple[int, int, int]:
    """(non-embedding params incl. head, n_layers, d_model) of an HF causal LM."""
    cfg = model.config
    n = sum(p.numel() for p in model.parameters())
    emb = model.get_input_embeddings().weight.numel()
    # A tied head shares the embedding matrix but still costs a matmul per token.
    n_compute = n - emb + cfg.vocab_size * cfg.hidden_size
    return n_compute, cfg.num_hidden_layers, cfg.hidden_size


def train_flops_per_token(model, seq_len: int) -> float:
    n, layers, d = model_flop_terms(model)
    return 6.0 * n + 6.0 * layers * seq_len * d


def inference_flops_per_token(model, seq_len: int) -> float:
    n, layers, d = model_flop_terms(model)
    return 2.0 * n + 2.0 * layers * seq_len * d


@dataclass
class CostRecord:
    """What one phase (generic pretraining, specialisation, teacher inference…) cost."""

    phase: str
    tokens: int = 0
    flops: float = 0.0
    wall_seconds: float = 0.0
    workers: int = 1
    device: str = "cpu"
    device_hours: float = 0.0
    """FLOPs converted with the device profile (comparable across machines)."""
    measured_device_hours: float = 0.0
    """wall_seconds · workers / 3600 (what this machine actually spent)."""
    extra: dict = field(default_factory=dict)

    @classmethod
    def of(cls, phase: str, tokens: int, flops: float, wall_seconds: float, profile,
           workers: int = 1, **extra) -> "CostRecord":
        return cls(phase=phase, tokens=int(tokens), flops=float(flops), wall_seconds=float(wall_seconds),
                   workers=workers, device=profile.name,
                   device_hours=flops / (profile.peak_flops * profile.mfu) / 3600.0,
                   measured_device_hours=wall_seconds * workers / 3600.0, extra=dict(extra))

    def rebased(self, profile) -> "CostRecord":
        """The same work under ``profile``: device-hours are derived from the stored FLOPs
        (and measured seconds) under today's device profile, never frozen at run time."""
        return dataclasses.replace(self, device=profile.name,
                                   device_hours=self.flops / (profile.peak_flops * profile.mfu) / 3600.0,
                                   measured_device_hours=self.wall_seconds * self.workers / 3600.0)

    def __add__(self, other: "CostRecord") -> "CostRecord":
        return CostRecord(phase=f"{self.phase}+{other.phase}", tokens=self.tokens + other.tokens,
                          flops=self.flops + other.flops, wall_seconds=self.wall_seconds + other.wall_seconds,
                          workers=max(self.workers, other.workers), device=self.device,
                          device_hours=self.device_hours + other.device_hours,
                          measured_device_hours=self.measured_device_hours + other.measured_device_hours)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, profile=None) -> "CostRecord":
        """Rebuild a stored record; with ``profile``, its device-hours under that profile."""
        rec = cls(**d)
        return rec.rebased(profile) if profile is not None else rec

    def line(self) -> str:
        return (f"{self.phase:<24} tokens {self.tokens:>12,}  FLOPs {self.flops:9.3e}  "
                f"wall {self.wall_seconds:8.1f}s  {self.device} hours {self.device_hours:.4f} "
                f"(measured {self.measured_device_hours:.4f})")


def total_cost(generic_flops: float, spec_flops: float, n_domains: int) -> float:
    """C(N) = C_generic + N · C_specialisation."""
    return generic_flops + n_domains * spec_flops
