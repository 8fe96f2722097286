"""The one strategy registry: config name -> strategy class.

A strategy is one file under ``slmfactory/models/strategies/`` with an
``@register("name", settings=...)`` class; registering puts the class here, and the class
carries what the layers below need to know about it: ``Settings`` (its frozen settings
dataclass, validated under ``strategy.<name>`` in recipes) and ``generic_family`` (its
shared generic phase, or None). The config validates recipes and the trial keys runs with
these, so the platform reads the registry; the strategies live above it. The first lookup
therefore imports every module of :data:`STRATEGY_PACKAGE` by name: the platform has no
static import of the layers above (``tests/test_layers.py``), and it works from a plain
checkout as from an installed wheel. The discovery is here rather than in the package's
``__init__`` so that importing one strategy module (or the phase library) never drags in
the others half-initialised.

Which strategies exist is known without importing them: :func:`strategy_names` reads the
file names (``slm_nopt.py`` is ``slm-nopt``). A recipe's strategy sections therefore stay
data until something needs their settings (``config.StrategyConfig.settings``), and building
a ``RunConfig`` (a Serve replica does) imports no training code; ``tests/test_strategies.py``
checks that every file registers the strategy its name says.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import pkgutil
from pathlib import Path

STRATEGY_PACKAGE = "slmfactory.models.strategies"
"""Every module in it is imported on the first lookup (each registers its strategy)."""

NOT_STRATEGIES = ("base",)
"""Modules of the strategy package that hold no strategy (the shared interface)."""

STRATEGIES: dict[str, type] = {}
"""Strategy name -> its class (``Settings``, ``generic_family`` on the class)."""


def add(name: str, cls: type) -> None:
    """Register ``cls`` under ``name`` (``models.strategies.base.register`` calls this)."""
    if not dataclasses.is_dataclass(getattr(cls, "Settings", None)):
        raise TypeError(f"strategy {name!r}: Settings must be a dataclass, got {getattr(cls, 'Settings', None)!r}")
    STRATEGIES[name] = cls


@functools.cache
def strategy_names() -> tuple[str, ...]:
    """Every strategy's config name, from the strategy package's file names, importing none."""
    folder = Path(__file__).resolve().parents[1] / "models" / "strategies"
    return tuple(sorted(m.name.replace("_", "-") for m in pkgutil.iter_modules([str(folder)])
                        if m.name not in NOT_STRATEGIES))


def strategies() -> dict[str, type]:
    """Every registered strategy, importing the strategy modules on the first call."""
    global _LOADED
    if not _LOADED:
        _LOADED = True
        package = importlib.import_module(STRATEGY_PACKAGE)
        for module in pkgutil.iter_modules(package.__path__):
            importlib.import_module(f"{STRATEGY_PACKAGE}.{module.name}")
    return STRATEGIES


_LOADED = False
