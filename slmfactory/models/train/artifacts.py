"""What the phases of a strategy pass on: the weights of a stage, a generic phase's record,
a specialised model, and the context a strategy runs in. They sit below both the phase
library (``phases.py``) and the strategies (``models/strategies``), which share them."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from slmfactory.models.train.launch import Launcher
from slmfactory.platform.config import RunConfig
from slmfactory.platform.cost import CostRecord
from slmfactory.platform.runtime import say
from slmfactory.platform.stages import Stage
from slmfactory.platform.tracking import NullTracker, Tracker


@dataclass(frozen=True)
class Weights:
    """A weights file and the key of the stage that made it (what a downstream stage keys
    on: the stage key stands for the file's content)."""

    path: str
    key: str


@dataclass
class GenericArtifact:
    """The output of a generic phase: a finished stage holding weights, and what it cost
    (FLOPs and seconds stored; device-hours derived under the current device profile)."""

    strategy: str
    stage: Stage
    cost: CostRecord
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def dir(self) -> Path:
        return self.stage.dir

    def weights(self, name: str = "weights") -> Weights:
        """A weights file recorded in ``info`` (stored relative to the stage folder)."""
        return Weights(str(self.stage.path(self.info[name])), f"{self.stage.key}/{name}")

    @classmethod
    def load(cls, stage: Stage, profile) -> "GenericArtifact | None":
        if not stage.done:
            return None
        data = stage.info
        return cls(strategy=data["strategy"], stage=stage, cost=CostRecord.from_dict(data["cost"], profile),
                   info=data["info"])

    @classmethod
    def record(cls, stage: Stage, strategy: str, cost: CostRecord, info: dict[str, Any], profile,
               phase: str | None = None) -> "GenericArtifact":
        """Publish ``stage`` as the record of a finished generic phase (its files stay in
        the training runs ``info`` points at, relative to the stage folder)."""
        cost = dataclasses.replace(cost, phase=phase or f"generic/{strategy}")
        stage.write({"strategy": strategy, "cost": cost.to_dict(), "info": info})
        return cls.load(stage, profile)


@dataclass
class SpecializedModel:
    """A specialised small model: a plain HF folder plus its cost and quality."""

    strategy: str
    domain: str
    path: Path
    generic_cost: CostRecord | None
    spec_cost: CostRecord
    params: int
    inference_flops_per_token: float
    metrics: dict[str, float] = field(default_factory=dict)
    """``test_nll``/``test_ppl`` after specialisation, ``test_ppl_before`` before, …"""
    curves: dict[str, list] = field(default_factory=dict)
    """Metric name -> [(step, value)]: the fine-tune's (and generic phase's) curves."""
    serving_rates: dict | None = None
    """The exported folder's measured serving rates (``platform.cost.ServingRates.to_dict``;
    None: not measured, ``serving.cost_measure_s`` 0)."""

    def to_dict(self) -> dict[str, Any]:
        return {"strategy": self.strategy, "domain": self.domain, "path": str(self.path),
                "generic_cost": self.generic_cost.to_dict() if self.generic_cost else None,
                "spec_cost": self.spec_cost.to_dict(), "params": self.params,
                "inference_flops_per_token": self.inference_flops_per_token, "metrics": self.metrics}


@dataclass
class StrategyContext:
    cfg: RunConfig
    launcher: Launcher
    tracker: Tracker = field(default_factory=NullTracker)
    log: Callable[[str], None] | None = say

    def say(self, msg: str) -> None:
        if self.log:
            self.log(msg)
