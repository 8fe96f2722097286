"""Decoder-only language models built on ``transformers``' Llama.

The model is single-device and returns its loss (nanoGPT's ``forward(idx, targets)``):
``model(input_ids=x, labels=x).loss`` is the mean next-token NLL. DDP, Ray and MLflow wrap
it from outside. Presets follow the paper (docs/paper.md#model-sizes: paper-slm = 126M, paper-llm = 771M at a 32k
vocabulary) plus CPU-sized ones for tests and the demo.
"""

from __future__ import annotations

import threading

import torch

from slmfactory.platform.config import Preset
from slmfactory.platform.errors import ConfigError

CONSTRUCTION_LOCK = threading.RLock()
"""Held while a model is constructed or loaded in a process that does both in several
threads (a serving replica). ``transformers``' ``from_pretrained`` swaps
``PreTrainedModel.tie_weights``, ``init_weights`` and ``torch.nn.init``'s functions for no-ops
process-wide while it loads: a ``ProjectedLlama`` built in another thread meanwhile came out
with an untied head and failed to load its tied weights ("Missing key(s) in state_dict:
base.model.embed_tokens.weight", 14 of 30 builds next to a loading thread). Every model
construction of the replica (its loads, the instant builder's candidates, the generic phases,
MiniLM) takes this lock."""


def resolve(model_cfg) -> Preset:
    """The preset named by ``model_cfg.preset`` with any non-zero explicit dims applied."""
    return model_cfg.dims()


def llama_config(model_cfg, vocab_size: int, seq_len: int):
    from transformers import LlamaConfig

    p = resolve(model_cfg)
    if p.d_model % p.n_heads:
        raise ConfigError(f"d_model: {p.d_model} is not a multiple of n_heads {p.n_heads}")
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=p.d_model,
        intermediate_size=p.d_mlp,
        num_hidden_layers=p.n_layers,
        num_attention_heads=p.n_heads,
        num_key_value_heads=p.n_heads,
        max_position_embeddings=seq_len,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=1,
        attn_implementation="sdpa",
    )


def build_model(model_cfg, vocab_size: int, seq_len: int, seed: int = 0):
    """A freshly initialised ``LlamaForCausalLM`` (fp32; the trainer picks the autocast)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama_config(model_cfg, vocab_size, seq_len))
    return model


def count_params(model, non_embedding: bool = False) -> int:
    n = sum(p.numel() for p in model.parameters())
    if non_embedding:
        n -= model.get_input_embeddings().weight.numel()
    return n


def lm_loss(model, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL of ``input_ids`` (B, T): HF shifts the labels internally."""
    return model(input_ids=input_ids, labels=input_ids).loss
