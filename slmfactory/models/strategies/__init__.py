"""Every strategy of the paper, one file each, registered under its config name."""

from slmfactory.models.strategies.base import STRATEGIES, get_strategy, register  # noqa: F401
from slmfactory.models.strategies import llm, slm, slm_nopt  # noqa: F401,E402
