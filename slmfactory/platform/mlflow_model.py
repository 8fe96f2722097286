"""An exported model folder as an MLflow ``pyfunc`` model that completes text.

This file is the model's code (MLflow's *models from code*): :func:`slmfactory.platform.
tracking.log_hf_model` copies it into every logged model, and ``mlflow.pyfunc.load_model``
and ``mlflow models serve`` run that copy. So it imports nothing from slmfactory: torch,
transformers and mlflow (pandas through mlflow) are all a model needs to answer, in any
environment MLflow builds from the model's ``requirements.txt``. It sits in the platform
layer because a trial's run (:mod:`slmfactory.trial`, which stands on the platform only)
logs it; Ray plays no part.

Why a ``pyfunc`` wrapper and not MLflow's ``transformers`` flavor, for the same folder
(``models/phases.export_hf``: safetensors, config, tokenizer files, ``slmfactory.json``):

- **One copy of the weights.** The flavor stores a checkpoint in its own layout (weights
  under ``model/``, the tokenizer under ``components/``), or with ``save_pretrained=False``
  only a hub repository and commit to fetch at load; here
  the exported folder *is* the MLflow model's root: its files sit beside ``MLmodel`` and
  this file, and the pyfunc artifact ``model`` points at that root (``path: .``). So the
  run's ``model`` artifact, ``models:/<name>@champion`` and ``serve --from-registry`` read
  one folder that ``AutoModelForCausalLM.from_pretrained`` loads as before, and what
  read a run's ``model/`` (``from_mlflow``, ``model/test_seq_nll.npy``) still finds it.
- **No hub at load.** Everything is loaded from the folder with ``local_files_only``;
  the flavor records a hub repository and commit, which a model trained here has not.
- **Safetensors only.** ``use_safetensors=True``: no pickled weights are ever read (and the
  model's code is this file, not a cloudpickle, which MLflow 3 refuses to load by default).
- **The completion contract the serving API has.** Input: a column ``prompt`` (string);
  params ``max_tokens`` (default 16, at most 256 and the context), ``temperature`` (0: greedy) and
  ``top_p``; output: the completion text of each prompt (the prompt not repeated, cut at
  the end-of-text token), as ``/v1/completions`` answers it. The flavor's text-generation
  pipeline takes generate()'s own keyword arguments and returns the prompt with its
  continuation unless told otherwise.
- **Logging loads nothing.** Signature, example and requirements are given, so logging a
  trial's model neither loads its weights nor infers its environment.
"""

from __future__ import annotations

import threading
from typing import Any

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel

ARTIFACT = "model"
"""The pyfunc artifact naming the exported folder (the model's root: ``path: .``)."""
PROMPT = "prompt"
MAX_TOKENS_DEFAULT = 16
MAX_TOKENS_LIMIT = 256
"""``max_tokens`` above this is cut to it: one request never holds a replica for long."""
PARAMS = {"max_tokens": ("long", MAX_TOKENS_DEFAULT), "temperature": ("double", 0.0), "top_p": ("double", 1.0)}
"""The signature's params schema: name -> (MLflow type, default)."""
EXAMPLE_PROMPT = "The"


def signature():
    """Input: a ``prompt`` column (string); params :data:`PARAMS`; output: the completion."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(inputs=Schema([ColSpec("string", PROMPT)]), outputs=Schema([ColSpec("string")]),
                          params=ParamSchema([ParamSpec(k, t, d) for k, (t, d) in PARAMS.items()]))


def input_example():
    """The logged example: one prompt and a short greedy completion."""
    return pd.DataFrame({PROMPT: [EXAMPLE_PROMPT]}), {"max_tokens": 8, "temperature": 0.0}


def _prompts(model_input: Any) -> list[str]:
    """The prompts of a request: a DataFrame's ``prompt`` column (what the signature gives),
    a dict of columns, a list of strings or one string."""
    if hasattr(model_input, "columns"):
        column = model_input[PROMPT] if PROMPT in model_input.columns else model_input.iloc[:, 0]
        return ["" if v is None else str(v) for v in column.tolist()]
    if isinstance(model_input, dict):
        value = model_input[PROMPT]
        return [value] if isinstance(value, str) else [str(v) for v in value]
    if isinstance(model_input, str):
        return [model_input]
    return [str(v) for v in model_input]


def settings(params: dict | None) -> tuple[int, float, float]:
    """``(max_tokens, temperature, top_p)`` of a request's params, defaults filled in and
    each bounded: 1 <= max_tokens <= 256, temperature >= 0, 0 < top_p <= 1."""
    p = {k: d for k, (_, d) in PARAMS.items()} | {k: v for k, v in (params or {}).items() if v is not None}
    max_tokens = min(max(int(p["max_tokens"]), 1), MAX_TOKENS_LIMIT)
    top_p = float(p["top_p"])
    return max_tokens, max(float(p["temperature"]), 0.0), top_p if 0.0 < top_p <= 1.0 else 1.0


class Completion(PythonModel):
    """A causal LM folder that completes prompts (plain ``generate``, one request at a time)."""

    def load_context(self, context) -> None:
        import torch
        from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

        path = context.artifacts[ARTIFACT]
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, use_safetensors=True,
                                                          local_files_only=True).eval()
        self.tokenizer = PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True)
        self.context_len = int(self.model.config.max_position_embeddings)
        self.lock = threading.Lock()  # a scoring server may call predict from several threads

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> list[str]:
        """The completion of each prompt (``model_input``: the signature's ``prompt`` column;
        a DataFrame type hint, so MLflow validates against the logged signature)."""
        import torch

        max_tokens, temperature, top_p = settings(params)
        max_tokens = min(max_tokens, max(self.context_len - 1, 1))  # prompt and completion fit the context
        tok = self.tokenizer
        eos, pad = tok.eos_token_id, tok.pad_token_id if tok.pad_token_id is not None else 0
        keep = max(self.context_len - max_tokens, 1)
        ids = [tok(p, add_special_tokens=False)["input_ids"][-keep:] or [eos] for p in _prompts(model_input)]
        if not ids:
            return []
        width = max(len(i) for i in ids)
        x = torch.full((len(ids), width), pad, dtype=torch.long)
        mask = torch.zeros_like(x)
        for row, i in enumerate(ids):  # left padding: every row continues from its own end
            x[row, width - len(i):] = torch.tensor(i)
            mask[row, width - len(i):] = 1
        sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if temperature > 0 else \
            dict(do_sample=False)
        with self.lock, torch.inference_mode():
            out = self.model.generate(input_ids=x, attention_mask=mask, max_new_tokens=max_tokens,
                                      pad_token_id=pad, eos_token_id=eos, **sampling)
        texts = []
        for row in out[:, width:].tolist():
            if eos in row:
                row = row[:row.index(eos)]
            texts.append(tok.decode(row, skip_special_tokens=True))
        return texts


if __name__ != "slmfactory.platform.mlflow_model":
    # Run by MLflow as the model's code (not imported as slmfactory's module): this is the model.
    mlflow.models.set_model(Completion())
