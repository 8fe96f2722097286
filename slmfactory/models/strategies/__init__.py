"""Every strategy of the paper, one file each, registered under its config name.

A new strategy is one new file here with an ``@register("name", settings=...)`` class:
the registry (``slmfactory.platform.registry.strategies()``, which ``get_strategy`` and the
config use) imports every module of this package on its first lookup.
"""

from slmfactory.models.strategies.base import STRATEGIES, get_strategy, register  # noqa: F401
