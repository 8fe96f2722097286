"""Every strategy of the paper, one file each, registered under its config name.

Importing this package imports every module in it, so a new strategy is one new file
with an ``@register("name", settings=...)`` class (the package is the
``slmfactory.strategies`` entry point the platform loads).
"""

import importlib
import pkgutil

from slmfactory.models.strategies.base import STRATEGIES, get_strategy, register  # noqa: F401

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")
