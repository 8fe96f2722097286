"""A served model's tokens/s on this machine, measured once when it is exported.

What an application pays to serve a model is its tokens/s on the serving device, not its
parameter count. The EXPORT stage (``phases.finish``) loads the exported folder as
``slmfactory serve`` does (``AutoModelForCausalLM``, float32, safetensors only) and times,
with one torch thread (what every serving replica runs with: ``serving/server.py``):

- **scoring** (``/v1/score``): a forward pass and log-softmax over ``SCORE_ROWS`` rows of the
  model's context of random token ids (speed does not depend on the text);
- **generation** (``/v1/completions``): one greedy stream of ``GENERATE_TOKENS`` new tokens
  after a ``PROMPT_TOKENS``-token prompt (``min_new_tokens`` set, so an end-of-text never
  cuts a pass short), with the KV cache, as ``generation.generate`` runs it for one request.

Each is warmed up once (untimed), then the two are timed in turn, a pass of each per round,
until ``serving.cost_measure_s`` is spent (at least one round); each rate is its fastest pass's
(other work on the machine only slows a pass down). The rates record the machine
(``platform.machine.this_machine``) beside them; ``platform.cost.ServingRates`` prices them.

Why at export and not when a replica loads the model: measured once per model, the number is
logged to the model's MLflow run, where the report and ``recommend`` read it beside the
model's perplexity, and serving starts no slower. The price of that choice: the rate is the
exporting machine's (under whatever else ran there), which is why the machine is recorded.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from slmfactory.platform.cost import ServingRates
from slmfactory.platform.machine import this_machine

SCORE_ROWS = 4
"""Rows of a timed scoring pass (``/v1/score`` batches requests of one domain)."""
PROMPT_TOKENS = 16
GENERATE_TOKENS = 32
"""New tokens of a timed generation pass (fewer when the context is shorter)."""


def _timed(fns: dict, budget_s: float) -> dict[str, list[float]]:
    """The seconds of each pass of each of ``fns`` (name -> callable), run in turn, one pass
    of each per round, until ``budget_s`` is spent (at least one round): interleaved, a burst
    of other load slows some passes of every task instead of all of one task's."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    t0 = time.perf_counter()
    while True:
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
        if time.perf_counter() - t0 >= budget_s:
            return times


def measure_folder(path: str | Path, budget_s: float = 1.0, seed: int = 0) -> ServingRates:
    """Scoring and generation tokens/s of the exported model folder ``path`` on this
    machine, in about ``budget_s`` seconds (plus one untimed warm-up pass of each)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, use_safetensors=True).eval()
    return measure_model(model, budget_s, seed)


def measure_model(model, budget_s: float = 1.0, seed: int = 0) -> ServingRates:
    """:func:`measure_folder` of a loaded causal LM (float32, CPU, eval mode)."""
    import torch

    cfg = model.config
    context = int(cfg.max_position_embeddings)
    vocab = int(cfg.vocab_size)
    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, vocab, (SCORE_ROWS, context), generator=g)
    prompt_len = max(1, min(PROMPT_TOKENS, context // 2))
    new = max(1, min(GENERATE_TOKENS, context - prompt_len))
    prompt = torch.randint(0, vocab, (1, prompt_len), generator=g)
    mask = torch.ones_like(prompt)
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else 0

    def score() -> None:
        model(input_ids=rows).logits.float().log_softmax(-1)

    def generate(n: int = new) -> None:
        model.generate(input_ids=prompt, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                       pad_token_id=pad)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a serving replica's setting (server.DomainServer)
    try:
        machine = this_machine()
        with torch.no_grad():
            score()
            generate(2)
            timed = _timed({"score": score, "generate": generate}, budget_s)
            score_times, gen_times = timed["score"], timed["generate"]
    finally:
        torch.set_num_threads(threads)
    how = {"score_rows": SCORE_ROWS, "score_context": context, "score_passes": len(score_times),
           "score_best_seconds": min(score_times), "score_median_seconds": statistics.median(score_times),
           "prompt_tokens": prompt_len, "generate_tokens": new, "generate_passes": len(gen_times),
           "generate_best_seconds": min(gen_times), "generate_median_seconds": statistics.median(gen_times),
           "budget_s": budget_s}
    # The fastest pass: the rate the model runs at with a core to itself. Other work on the
    # machine (a sweep's concurrent trials) only ever slows a pass, so the fastest is the
    # one it disturbed least; the median is kept beside it.
    return ServingRates(generate_tokens_per_s=new / min(gen_times),
                        score_tokens_per_s=SCORE_ROWS * context / min(score_times), machine=machine, how=how)
