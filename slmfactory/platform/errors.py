"""Errors a user can act on. The CLI prints them as one line and exits non-zero."""

from typing import Any


class SlmFactoryError(Exception):
    """Base class: bad input or an unmet precondition, with a message naming what is wrong."""


class ConfigError(SlmFactoryError):
    """A recipe or override is malformed; the message names the dotted key."""


class DataError(SlmFactoryError):
    """A corpus, file or split is missing, empty or malformed; the message names it."""


def check(cond: bool, key: str, expected: str, value: Any) -> None:
    """Raise ``ConfigError("<key>: expected <expected>, got <value>")`` unless ``cond``: how
    every config dataclass validates its fields, one rule a line."""
    if not cond:
        raise ConfigError(f"{key}: expected {expected}, got {value!r}")
