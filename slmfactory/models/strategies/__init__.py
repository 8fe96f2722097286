"""Every strategy of the paper, one file each, registered under its config name."""

from slmfactory.models.strategies.base import STRATEGIES, get_strategy, register  # noqa: F401
from slmfactory.models.strategies import llm, slm, slm_nopt  # noqa: F401,E402
from slmfactory.models.strategies import llm_lora, slm_d, slm_is, slm_mix, slm_pn  # noqa: F401,E402
