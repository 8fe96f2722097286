"""Every strategy of the paper, one file each, registered under its config name.

A new strategy is one new file here with an ``@register("name", settings=...)`` class:
the registry (``slmfactory.platform.registry.strategies()``, which ``get_strategy`` and the
config use) imports every module of this package on its first lookup, and knows the names
from the file names before that (``registry.strategy_names``).
"""

from slmfactory.platform.exports import lazy_exports

EXPORTS = {
    "base": ("NoSettings", "STRATEGIES", "Strategy", "get_strategy", "register"),
}
__all__, __getattr__ = lazy_exports(__name__, EXPORTS)
