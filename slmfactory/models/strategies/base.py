"""The strategy interface: its registry, its context and the artifacts its phases pass on.

A strategy has two phases (docs/paper.md#two-phases):

- ``pretrain(ctx) -> GenericArtifact | None`` — before any domain is known; its cost is
  *generic* and shared by every domain. It is a stage (``platform/stages.py``) keyed by
  everything it depends on, so every domain (and every later run) reuses it.
- ``specialize(ctx, generic, domain) -> SpecializedModel`` — per domain; its cost is the
  *specialisation* cost. The result is always a plain Hugging Face causal-LM folder
  (safetensors + config + tokenizer) plus a cost record: everything served is plain.

A strategy lives in one file: ``@register("name", settings=Settings)`` adds it to the
registry under the name configs use and gives it its own settings section
(``strategy.<name>.*``); ``requires`` declares what it needs (``clusters``, ``teacher``),
which is what the driver reads. Adding a strategy touches no other file. The phases a
strategy composes (pretrain, fine-tune, evaluate, export) are :mod:`slmfactory.models.phases`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar


from slmfactory.models.launch import Launcher
from slmfactory.platform import registry
from slmfactory.platform.config import RunConfig
from slmfactory.platform.cost import CostRecord, Work
from slmfactory.platform.errors import ConfigError
from slmfactory.platform.stages import Stage
from slmfactory.platform.tracking import NullTracker, Tracker
from slmfactory.platform.runtime import say

STRATEGIES = registry.STRATEGIES
"""The one registry (``platform.registry``): name -> strategy class."""


@dataclass(frozen=True)
class NoSettings:
    """A strategy with no knobs of its own."""


def register(name: str, settings: type | None = None) -> Callable[[type["Strategy"]], type["Strategy"]]:
    """Class decorator: make a strategy selectable as ``strategy.name: <name>``, with its
    settings dataclass under ``strategy.<name>`` in recipes."""

    def deco(cls: type[Strategy]) -> type[Strategy]:
        cls.name = name
        cls.Settings = settings or NoSettings
        registry.add(name, cls)
        return cls

    return deco


def get_strategy(name: str) -> "Strategy":
    if name not in registry.strategies():
        raise ConfigError(f"strategy.name: unknown strategy {name!r} (expected one of {sorted(STRATEGIES)})")
    return STRATEGIES[name]()


# -- artifacts ---------------------------------------------------------------------------

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


# -- context -----------------------------------------------------------------------------

@dataclass
class StrategyContext:
    cfg: RunConfig
    launcher: Launcher
    tracker: Tracker = field(default_factory=NullTracker)
    log: Callable[[str], None] | None = say

    def say(self, msg: str) -> None:
        if self.log:
            self.log(msg)


class Strategy:
    name: ClassVar[str] = ""
    requires: ClassVar[frozenset[str]] = frozenset()
    """What the strategy needs beyond the corpus: ``clusters`` (Ray Data clustering),
    ``teacher`` (a large model's generic phase)."""

    generic_family: ClassVar[str | None] = None
    """What its generic phase is shared with (a sweep trains one per family and budget);
    None: no generic phase."""

    generic_phases: ClassVar[tuple[str, ...]] = ()
    """The kinds of training phase (``config.PHASES``) its ``pretrain`` runs: what a sweep
    trains on the driver before the trials, each on ``scaling.<kind>``."""
    spec_phases: ClassVar[tuple[str, ...]] = ()
    """The kinds of training phase its ``specialize`` runs: what a sweep's trial reserves
    (``sweeps/plan.py:trial_resources``) and the trial's launcher holds."""

    def projected_work(self, cfg: RunConfig) -> tuple[list[Work], list[Work]]:
        """(generic, specialisation) work the budgets allow, one item per phase (the
        device profile prices each): the plan of a sweep's ``--dry-run``, before anything
        runs (measured costs come from the trainer's ``cost_work``)."""
        raise NotImplementedError

    def prepare(self, ctx: StrategyContext, domain: str) -> None:
        """Build, on the driver, what this strategy's trial on ``domain`` reads through Ray
        Data (clusterings, resampled data), so that a trial never starts a Ray Data job
        inside a Tune slot: with every CPU held by trials, its tasks could never run."""

    def settings(self, cfg: RunConfig) -> Any:
        """This strategy's own section of the config (``strategy.<name>``)."""
        return cfg.strategy.of(self.name)

    def pretrain(self, ctx: StrategyContext) -> GenericArtifact | None:
        raise NotImplementedError

    def specialize(self, ctx: StrategyContext, generic: GenericArtifact | None, domain: str) -> SpecializedModel:
        raise NotImplementedError
