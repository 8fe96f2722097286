"""The strategy interface and its registry. The context a strategy runs in and the artifacts
its phases pass on (``GenericArtifact``, ``SpecializedModel``, ``StrategyContext``,
``Weights``) are the training engine's (``models/train/artifacts.py``), below both the phase
library and the strategies; they are re-exported here for the strategies' files.

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
strategy composes (pretrain, fine-tune, evaluate, export) are :mod:`slmfactory.models.train.phases`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar

from slmfactory.models.train import GenericArtifact, SpecializedModel, StrategyContext, Weights
from slmfactory.platform import registry
from slmfactory.platform.config import RunConfig
from slmfactory.platform.cost import Work
from slmfactory.platform.errors import ConfigError

__all__ = ["GenericArtifact", "NoSettings", "SpecializedModel", "Strategy", "StrategyContext", "Weights",
           "get_strategy", "register"]

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
