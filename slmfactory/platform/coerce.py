"""How a recipe's plain values (YAML scalars, lists, mappings) become typed config fields:
``coerce`` checks one value against a field's type, ``build`` makes a config dataclass
from a mapping; a wrong type or an unknown key is a ``ConfigError`` naming the dotted key.

Separate from ``config.py``, which loads recipes through it, because config sections kept
below that module load through it too: the device profile (``cost.py``) reads its
throughput file's rows with it.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

from slmfactory.platform.errors import ConfigError


def coerce(value: Any, tp: Any, key: str) -> Any:
    """``value`` as the field type ``tp`` (``key``, the dotted key, names it in errors). A
    dataclass with a ``from_recipe(value, key)`` classmethod builds itself (``StrategyConfig``:
    a recipe gives it in its own shape, not as its fields)."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp) and hasattr(tp, "from_recipe"):
        return tp.from_recipe(value, key)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return build(tp, value, key + ".")
    if origin is tuple:
        (item_tp, _ellipsis) = typing.get_args(tp)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return tuple(coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)  # the owning dataclass validates its entries
    if origin in (typing.Union, types.UnionType):
        raise ConfigError(f"{key}: unions are not supported in configs")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, str):
            try:
                return float(value)  # YAML reads "1e-4" as a string
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {tp}")


def build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Dataclass ``cls`` from the mapping ``data``, each value coerced to its field's type; an
    unknown key or a failed check is a ``ConfigError`` naming the key under ``prefix``."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{prefix}{unknown[0]}: unknown key (expected one of {sorted(names)})")
    kwargs = {k: coerce(v, hints[k], prefix + k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError as e:
        msg = str(e)
        # Nested dataclasses validate with their own short names; prefix the section.
        raise ConfigError(msg if not prefix or msg.startswith(prefix) else prefix + msg) from None
