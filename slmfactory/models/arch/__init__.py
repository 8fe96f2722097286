"""The model architectures, single-device, each returning its loss: the decoder-only LM on
``transformers``' Llama (``lm.py``) and the projected network of slm-pn (``projected.py``).
What serving may import of the models: no training code."""

from slmfactory.platform.exports import lazy_exports

EXPORTS = {
    "lm": ("CONSTRUCTION_LOCK", "build_model", "count_params", "llama_config"),
    "projected": ("ProjectedLlama", "build_projected"),
}
MODULES = ("projected",)
__all__, __getattr__ = lazy_exports(__name__, EXPORTS, MODULES)
