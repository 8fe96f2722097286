"""How a training phase is launched: in this process, or on Ray Train workers.

A strategy never builds a loop: it hands a *trainer factory* to a launcher. The factory
is a plain (cloud-picklable) function ``factory(worker: WorkerContext) -> Trainer`` that
rebuilds model, data and trainer from the config on whatever process runs it, so the same
code runs single-process in tests and as DDP on a Ray cluster (``distributed.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import torch

from slmfactory.models.train.trainer import Trainer, TrainResult
from slmfactory.platform.runtime import say


@dataclass
class WorkerContext:
    """What a trainer factory may know about the process it runs in."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    out_dir: Path = Path(".")
    wrap: Callable[[torch.nn.Module], torch.nn.Module] = lambda m: m
    """Wraps the model for data-parallel training (DDP on Ray Train; identity here)."""
    log: Callable[[str], None] | None = say


TrainerFactory = Callable[[WorkerContext], Trainer]


@dataclass
class FitOutput:
    result: TrainResult
    checkpoint: Path
    """The final checkpoint folder (``model.safetensors`` holds the trained weights)."""
    trainer: Trainer | None = None
    """The live trainer when the phase ran in this process (None on Ray workers)."""
    stage_key: str = ""
    """The key of the stage the phase ran in (what a stage built on its weights keys on)."""

    def load_into(self, model: torch.nn.Module) -> torch.nn.Module:
        """Load the trained weights into ``model`` (built the same way as on the workers)."""
        from safetensors.torch import load_model

        load_model(model, str(self.checkpoint / "model.safetensors"), device="cpu")
        return model


class Launcher(Protocol):
    def fit(self, factory: TrainerFactory, out_dir: Path, phase: str, resources: str | None = None) -> FitOutput:
        """Train one phase; ``resources`` names its kind in ``scaling`` (``config.PHASES``:
        ``pretrain``, ``finetune``, ...), whose workers, GPUs and CPUs it runs on."""


class LocalLauncher:
    """Runs the phase in this process: tests, benchmarks and one-device runs."""

    def __init__(self, device: str | None = None, log: Callable[[str], None] | None = say):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.log = log

    def fit(self, factory: TrainerFactory, out_dir: Path, phase: str, resources: str | None = None) -> FitOutput:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        trainer = factory(WorkerContext(device=self.device, out_dir=out_dir, log=self.log))
        result = trainer.fit()
        ckpt = trainer.latest_checkpoint()
        assert ckpt is not None, "fit() always writes a final checkpoint on rank 0"
        return FitOutput(result=result, checkpoint=ckpt, trainer=trainer)
