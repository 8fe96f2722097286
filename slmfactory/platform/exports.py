"""A subsystem's public face: the names its package exports, imported on first use.

A subsystem is a package (``data/corpus``, ``models/train``, ...) whose ``__init__`` holds
``EXPORTS``, a literal mapping of its modules to the names other layers may use, and gets
its ``__all__`` and a module ``__getattr__`` (PEP 562) from :func:`lazy_exports`:
``from slmfactory.data.clustering import nearest_centroid`` imports ``clusters.py`` alone,
not the Ray Data pipeline beside it (a serving replica reads centroids and must not import
Ray Data). A module exported whole (used as a namespace) is in ``MODULES``. No exported name
may be a submodule's name: once that submodule is imported, Python binds its name on the
package, and the module would shadow the export.
``tests/test_layers.py`` reads ``EXPORTS`` from the source: a module outside a subsystem
imports from its package, and only names ``EXPORTS`` lists.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable


def lazy_exports(package: str, exports: dict[str, tuple[str, ...]], modules: tuple[str, ...] = ()
                 ) -> tuple[list[str], Callable[[str], Any]]:
    """``(__all__, __getattr__)`` for ``package`` from its ``EXPORTS`` (and ``MODULES``)."""
    where = {name: module for module, names in exports.items() for name in names}
    if len(where) != sum(len(names) for names in exports.values()):
        raise ValueError(f"{package}.EXPORTS: a name is exported by two modules")
    shadowed = sorted(set(where) & (set(exports) | set(modules)))
    if shadowed:
        raise ValueError(f"{package}.EXPORTS: {shadowed} are also module names (the module would shadow them)")

    def __getattr__(name: str) -> Any:
        if name in modules:
            return importlib.import_module(f"{package}.{name}")
        module = where.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{module}"), name)

    return sorted(where) + sorted(modules), __getattr__
