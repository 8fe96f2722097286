"""The ``sweep`` section of a recipe: the budget grid ``slmfactory sweep`` runs (strategies
x budgets x in-domain sizes x domains, plus any ``sweep.grid`` keys) and its per-strategy
restrictions (``sweep.only``), each checked against the axes it names.

Separate from ``config.py`` (which composes it into ``RunConfig``) because the grid's
rules are the sweep planner's (``sweeps/plan.py``) and are long enough to read alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from slmfactory.platform.errors import check
from slmfactory.platform.registry import strategy_names


ONLY_AXES = ("domains", "generic_tokens", "generic_flops", "spec_tokens", "spec_flops", "in_domain_tokens")
"""The sweep axes ``sweep.only`` may restrict per strategy."""

GRID_AXES = {"strategy.name": "sweep.strategies", "data.domain": "sweep.domains",
             "pretrain.max_tokens": "sweep.generic_tokens", "pretrain.max_flops": "sweep.generic_flops",
             "finetune.max_tokens": "sweep.spec_tokens", "finetune.max_flops": "sweep.spec_flops",
             "data.domain_train_tokens": "sweep.in_domain_tokens"}
"""Keys a sweep varies through its own axes (``sweep.grid`` may not set them)."""


@dataclass(frozen=True, kw_only=True)
class SweepConfig:
    """The budget grid ``slmfactory sweep`` runs: every combination of strategies x
    generic budgets x specialisation budgets x in-domain sizes x domains is one trial.
    Budgets are given in tokens or in FLOPs (to compare strategies at equal cost); an
    empty axis takes the recipe's own value."""

    name: str = ""
    """Sweep name (MLflow experiment ``<tracking.experiment>-<name>``); empty = the run's ``name``."""
    strategies: tuple[str, ...] = ()
    domains: tuple[str, ...] = ()
    """Empty = ``data.domain``."""
    generic_tokens: tuple[int, ...] = ()
    """Generic pretraining budgets in tokens (``pretrain.max_tokens``)."""
    generic_flops: tuple[float, ...] = ()
    """Generic pretraining budgets in FLOPs (``pretrain.max_flops``; max_tokens stays a cap)."""
    spec_tokens: tuple[int, ...] = ()
    """Specialisation budgets in tokens (``finetune.max_tokens``)."""
    spec_flops: tuple[float, ...] = ()
    """Specialisation budgets in FLOPs (``finetune.max_flops``)."""
    in_domain_tokens: tuple[int, ...] = ()
    """In-domain training set sizes (``data.domain_train_tokens``)."""
    inference_caps: tuple[int, ...] = ()
    """Served-parameter caps: the inference-budget axis of the report's Figure 1."""
    max_concurrent: int = 0
    """Trials at once (0 = as many as the cluster's CPUs allow)."""
    max_failures: int = 1
    """Times Ray Tune retries a failed trial (its ``FailureConfig.max_failures``; -1 = without
    end, 0 = never): a worker that died (killed, out of memory) or a trial that raised runs
    again, and resumes from its phases' last checkpoints (finished stages are kept); its
    MLflow run stays one run."""
    grid: dict[str, Any] = field(default_factory=dict)
    """Any other config keys to vary, each a list of values, e.g. ``{cluster.k: [16, 64],
    finetune.seed: [0, 1, 2]}``: every combination is crossed with the axes above. Trials
    are keyed by every setting that differs, and the report shows them in its rows (keys
    ending in ``seed`` are replicates: their spread is reported)."""
    only: dict[str, Any] = field(default_factory=dict)
    """Per-strategy restrictions of the grid: strategy -> {axis or grid key: [values]},
    e.g. ``{llm: {generic_tokens: [12000000]}, slm-d: {generic_tokens: [3000000]}}``.
    That strategy's trials keep only the listed values (each one a value the axis has).
    A list of such mappings keeps a trial that any one of them keeps (``slm: [{pretrain.seed:
    [0]}, {pretrain.seed: [1], generic_tokens: [12000000]}]``: a second seed at one budget);
    axes: ``domains``, ``generic_tokens``, ``generic_flops``, ``spec_tokens``,
    ``spec_flops``, ``in_domain_tokens`` and any ``sweep.grid`` key. A study crosses
    what each claim needs, not everything with everything."""

    def __post_init__(self) -> None:
        for name in ("generic_tokens", "generic_flops", "spec_tokens", "spec_flops", "in_domain_tokens",
                     "inference_caps"):
            for i, v in enumerate(getattr(self, name)):
                check(v > 0, f"sweep.{name}[{i}]", "a positive budget", v)
        grid = {}
        for key, values in self.grid.items():
            check(isinstance(key, str) and bool(key), "sweep.grid", "config keys such as finetune.seed", key)
            check(key not in GRID_AXES, f"sweep.grid.{key}", f"a key other than the sweep's own axes "
                  f"({GRID_AXES[key] if key in GRID_AXES else ''})", key)
            if not isinstance(values, (list, tuple)):
                values = [values]
            check(len(values) >= 1, f"sweep.grid.{key}", "a non-empty list of values", values)
            for i, v in enumerate(values):
                check(isinstance(v, (bool, int, float, str)), f"sweep.grid.{key}[{i}]", "a scalar", v)
            check(len(set(map(repr, values))) == len(values), f"sweep.grid.{key}", "distinct values", values)
            grid[key] = tuple(values)
        object.__setattr__(self, "grid", grid)
        check(self.max_concurrent >= 0, "sweep.max_concurrent", ">= 0", self.max_concurrent)
        check(self.max_failures >= -1, "sweep.max_failures", ">= -1 (-1: retry without end, 0: never)",
              self.max_failures)
        for i, s in enumerate(self.strategies):
            check(s in strategy_names(), f"sweep.strategies[{i}]", f"one of {sorted(strategy_names())}", s)
        only = {}
        for strategy, alternatives in self.only.items():
            check(strategy in self.strategies, f"sweep.only.{strategy}", "a strategy listed in sweep.strategies",
                  strategy)
            many = isinstance(alternatives, (list, tuple))
            only[strategy] = tuple(self._restriction(grid, f"sweep.only.{strategy}" + (f"[{i}]" if many else ""), axes)
                                   for i, axes in enumerate(alternatives if many else [alternatives]))
            check(len(only[strategy]) >= 1, f"sweep.only.{strategy}", "at least one restriction", alternatives)
        object.__setattr__(self, "only", only)

    def _restriction(self, grid: dict, at: str, axes: Any) -> dict:
        """One ``sweep.only`` restriction: axis -> the values kept, each checked against the axis."""
        check(isinstance(axes, dict) and bool(axes), at, "a mapping of axes to value lists", axes)
        kept = {}
        for axis, values in axes.items():
            where = f"{at}.{axis}"
            if axis in ONLY_AXES:
                allowed = tuple(getattr(self, axis))
            else:
                check(axis in grid, where, f"one of {', '.join(ONLY_AXES)} or a sweep.grid key", axis)
                allowed = grid[axis]
            if not isinstance(values, (list, tuple)):
                values = [values]
            check(len(values) >= 1, where, "a non-empty list of values", values)
            for i, v in enumerate(values):
                check(v in allowed, f"{where}[{i}]", f"one of the axis' own values {list(allowed)}", v)
            kept[axis] = tuple(values)
        return kept
