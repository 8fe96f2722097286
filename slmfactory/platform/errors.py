"""Errors a user can act on. The CLI prints them as one line and exits non-zero."""


class SlmFactoryError(Exception):
    """Base class: bad input or an unmet precondition, with a message naming what is wrong."""


class ConfigError(SlmFactoryError):
    """A recipe or override is malformed; the message names the dotted key."""


class DataError(SlmFactoryError):
    """A corpus, file or split is missing, empty or malformed; the message names it."""
