"""Generation, with no Ray Serve in it: how to sample (``Sampling``: OpenAI's and vLLM's
parameters, as transformers' logits processors where it has none), ``generate`` over a
left-padded batch (seeds, streaming, a deadline, the generated tokens' log-probs from the
generation's own scores), stop strings, the chat prompt (``apply_chat_template``) and the
text of a streamed completion. Apart from ``serving.engine`` (loading, scoring, routing),
which it builds on: this is what the completion routes and the replica's
``scheduler.Scheduler`` generate with.

Every function takes a ``Loaded`` model and plain values, tested without Ray or a server
(``tests/test_engine.py``, ``tests/test_scheduler.py``).

torch and transformers are imported inside the functions, deliberately: importing this
module (the serve driver's ``build_app``, the CLI) does not load them; a replica imports
them all once before its first request (``server.import_everything``).
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from typing import Callable, Collection

from slmfactory.serving.engine import Deadline, Loaded


@dataclass(frozen=True)
class Sampling:
    """How to generate: a completion or chat request's settings (``Sampling.of(request)``).
    Each one goes to ``generate`` as transformers has it (``top_k``, ``repetition_penalty``,
    ``logit_bias`` as ``sequence_bias``, ``stop_strings``) or as a logits processor of ours
    where transformers has none (``presence_penalty``, ``frequency_penalty``)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    n: int = 1
    seed: int | None = None
    top_k: int = 0
    """0: off."""
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    """``(token id, bias)`` pairs."""
    logprobs: int | None = None
    """None: no log-probs; k: each generated token's log-prob and the k most likely ones."""

    @classmethod
    def of(cls, request, max_tokens: int | None = None) -> Sampling:
        """``request``'s settings (a ``schemas.CompletionRequest`` or ``schemas.ChatRequest``);
        ``max_tokens``: the bound when the request left it to the server."""
        return cls(max_tokens if max_tokens is not None else request.max_tokens, request.temperature,
                   request.top_p, tuple(request.stop), request.n, request.seed, request.top_k,
                   request.repetition_penalty, request.presence_penalty, request.frequency_penalty,
                   tuple(request.logit_bias), request.logprob_count)


def cut_at_stop(text: str, stop: Collection[str]) -> tuple[str, bool]:
    """``text`` up to its first stop string, and whether one was found."""
    cuts = [text.index(s) for s in stop if s in text]
    return (text[:min(cuts)], True) if cuts else (text, False)


def check_stop(tokenizer, stop: Collection[str]) -> None:
    """A ``ValueError`` for stop strings ``generate`` cannot take (ones the vocabulary
    cannot form), found before generation rather than inside it."""
    if not stop:
        return
    from transformers.generation.stopping_criteria import StopStringCriteria  # lazy (module docstring)

    try:
        StopStringCriteria(tokenizer, list(stop))
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"the model's vocabulary cannot form {list(stop)!r} ({str(e)[:120]})") from None


def halt(deadline: float, cancel: threading.Event | None):
    """A stopping criterion: generation stops at the next token once the deadline passed
    or the client went away (every row at once)."""
    from transformers import StoppingCriteria  # lazy (module docstring)

    class Halt(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            import torch

            stop = time.monotonic() > deadline or (cancel is not None and cancel.is_set())
            return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)

    return Halt()


def generated_counts(input_ids, scores, start: int):
    """How many times each vocabulary token occurs in each row's generated tokens
    (``input_ids[:, start:]``: the prompt, left-padded to ``start``, is not counted), as
    a tensor shaped like ``scores``: one scatter for the whole batch."""
    new = input_ids[:, start:]
    return scores.new_zeros(scores.shape).scatter_add_(1, new, scores.new_ones(new.shape))


class PresencePenalty:
    """OpenAI's ``presence_penalty`` as a transformers logits processor (the
    ``LogitsProcessor`` call signature; transformers has none for it): every token the
    completion holds already has ``penalty`` subtracted from its logit, once, whatever
    its count. Prompt tokens do not count (OpenAI's and vLLM's definition)."""

    def __init__(self, penalty: float, start: int):
        self.penalty, self.start = penalty, start

    def __call__(self, input_ids, scores):
        return scores - self.penalty * (generated_counts(input_ids, scores, self.start) > 0).to(scores.dtype)


class FrequencyPenalty:
    """OpenAI's ``frequency_penalty``, as ``PresencePenalty``: ``penalty`` times the
    number of times the completion holds the token is subtracted from its logit."""

    def __init__(self, penalty: float, start: int):
        self.penalty, self.start = penalty, start

    def __call__(self, input_ids, scores):
        return scores - self.penalty * generated_counts(input_ids, scores, self.start)


def _top(logprobs, k: int) -> list[list[tuple[int, float]]]:
    """The ``k`` most likely tokens of each row of ``logprobs`` (rows x vocabulary), as
    ``(id, log-prob)``; tokens that top-k/top-p sampling excluded (-inf) are left out."""
    v, i = logprobs.topk(min(k, logprobs.shape[-1]), -1)
    return [[(int(a), float(b)) for a, b in zip(ii, vv) if math.isfinite(b)] for ii, vv in zip(i.tolist(), v.tolist())]


def step_logprobs(model, top: int, record: Callable[[list[tuple[float, list | None]]], None]):
    """A stopping criterion that never stops: at each step, each row's new token's
    log-prob (``compute_transition_scores`` on the step's scores) and its ``top`` most
    likely alternatives, handed to ``record`` (how a stream sends log-probs as it goes)."""
    from transformers import StoppingCriteria  # lazy (module docstring)

    class StepLogprobs(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            import torch

            if scores:  # the steps' processed scores so far (generate's output_scores)
                chosen = model.compute_transition_scores(input_ids, scores[-1:], normalize_logits=True)[:, 0]
                tops = _top(scores[-1].log_softmax(-1), top) if top else [None] * input_ids.shape[0]
                record(list(zip(chosen.tolist(), tops)))
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    return StepLogprobs()


def tokens_within(tokenizer, ids: list[int], text: str) -> int:
    """How many of ``ids`` the completion's ``text`` (their decoding, maybe cut at a stop
    string) holds: the least k whose decoding is as long as ``text`` (a token across the
    cut counts)."""
    if len(tokenizer.decode(ids)) <= len(text):
        return len(ids)
    lo, hi = 0, len(ids)
    while lo < hi:
        mid = (lo + hi) // 2
        if len(tokenizer.decode(ids[:mid])) >= len(text):
            hi = mid
        else:
            lo = mid + 1
    return lo


def generate(loaded: Loaded, prompts: list[list[int]], s: Sampling, deadline: float = math.inf,
             lock: threading.Lock | None = None, streamer=None,
             cancel: threading.Event | None = None) -> list[list[dict]]:
    """One left-padded ``generate`` over ``prompts`` (token ids): per prompt, ``s.n``
    completions ``{"ids", "text", "finish", "logprobs"}`` (``"stop"``: end of text or a
    stop string, the text cut before it; ``"length"``: ``s.max_tokens`` reached;
    ``"logprobs"``: with ``s.logprobs``, ``(log-prob, top alternatives)`` of each token the
    text holds, from the generation's own scores: no second forward pass). ``lock`` (the
    replica's: one generation at a time, so seeded sampling is reproducible) is waited for
    until the deadline only; a deadline that passes raises ``Deadline``. A ``streamer``
    with a ``record`` method also gets each step's log-probs (``step_logprobs``)."""
    import torch  # lazy (module docstring)
    from transformers import LogitsProcessorList, StoppingCriteriaList

    tok = loaded.tokenizer
    width = max(len(p) for p in prompts)
    pad = tok.pad_token_id or 0
    x = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(x)
    for j, p in enumerate(prompts):  # left padding: generation continues every row's end
        x[j, width - len(p):] = torch.tensor(p)
        mask[j, width - len(p):] = 1
    criteria = [halt(deadline, cancel)]
    processors = []
    if s.presence_penalty:
        processors.append(PresencePenalty(s.presence_penalty, width))
    if s.frequency_penalty:
        processors.append(FrequencyPenalty(s.frequency_penalty, width))
    kwargs = dict(max_new_tokens=s.max_tokens, num_return_sequences=s.n, pad_token_id=pad,
                  eos_token_id=tok.eos_token_id, logits_processor=LogitsProcessorList(processors))
    if s.temperature > 0:
        kwargs.update(do_sample=True, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k)
    else:
        kwargs.update(do_sample=False)
    if s.repetition_penalty != 1.0:
        kwargs.update(repetition_penalty=s.repetition_penalty)
    if s.logit_bias:
        kwargs.update(sequence_bias={(t,): b for t, b in s.logit_bias})
    if s.stop:
        kwargs.update(stop_strings=list(s.stop), tokenizer=tok)
    if s.logprobs is not None:
        kwargs.update(output_scores=True, return_dict_in_generate=True)
        if streamer is not None and hasattr(streamer, "record"):
            criteria.append(step_logprobs(loaded.model, s.logprobs, streamer.record))
    # The lock is waited for only until the deadline: a request never queues forever.
    if lock is not None and not lock.acquire(timeout=-1 if deadline == math.inf
                                             else max(0.0, deadline - time.monotonic())):
        raise Deadline()
    try:
        with torch.no_grad():
            if s.seed is not None:
                torch.manual_seed(s.seed)
            got = loaded.model.generate(input_ids=x, attention_mask=mask, streamer=streamer,
                                        stopping_criteria=StoppingCriteriaList(criteria), **kwargs)
            seqs, chosen, tops = got, None, None
            if s.logprobs is not None:
                seqs = got.sequences
                chosen = loaded.model.compute_transition_scores(seqs, got.scores, normalize_logits=True).tolist()
                if s.logprobs:
                    steps = torch.stack(got.scores, 1).log_softmax(-1)  # rows x steps x vocabulary
                    tops = [_top(steps[r], s.logprobs) for r in range(steps.shape[0])]
    finally:
        if lock is not None:
            lock.release()
    if time.monotonic() > deadline:
        raise Deadline()
    out: list[list[dict]] = [[] for _ in prompts]
    for r in range(seqs.shape[0]):
        j = r // s.n
        new = seqs[r, width:].tolist()
        ended = tok.eos_token_id in new
        if ended:
            new = new[:new.index(tok.eos_token_id)]
        while new and new[-1] == pad:
            new.pop()
        text, stopped = cut_at_stop(tok.decode(new), s.stop)
        lps = None
        if chosen is not None:
            k = tokens_within(tok, new, text) if stopped else len(new)
            lps = list(zip(chosen[r][:k], tops[r][:k] if tops is not None else [None] * k))
        out[j].append({"ids": new, "text": text, "finish": "stop" if (ended or stopped) else "length",
                       "logprobs": lps})
    return out


def chat_prompt(loaded: Loaded, messages: list[dict], template: str) -> str:
    """The prompt of a chat: ``messages`` (``{"role", "content"[, "name"]}``) rendered
    with the Jinja ``template`` (``serving.chat_template``) by the tokenizer's
    ``apply_chat_template``, the generation prompt added. A template that raises for these
    messages (one that refuses a role, say) is a ``ValueError``."""
    try:
        return loaded.tokenizer.apply_chat_template(messages, chat_template=template, add_generation_prompt=True,
                                                    tokenize=False)
    except Exception as e:  # noqa: BLE001  (the template's own error, e.g. raise_exception)
        raise ValueError(f"the chat template cannot render these messages: {type(e).__name__}: {str(e)[:200]}") \
            from None


def streamer(on_tokens: Callable[[list[int], list | None], None], on_end: Callable[[], None]):
    """A ``generate`` streamer: each step's new token ids to ``on_tokens(ids, logprobs)``
    (the prompt, which ``generate`` hands over first, is skipped), then ``on_end()``.
    ``logprobs``: the step's ``(log-prob, top alternatives)`` per row when the generation
    computes log-probs (``generate`` hands them to ``record``), else None."""
    from collections import deque

    from transformers.generation.streamers import BaseStreamer  # lazy (module docstring)

    class Pipe(BaseStreamer):
        first = True

        def __init__(self):
            # Steps recorded and not yet streamed: on a GPU, generate streams each step's
            # tokens one step late (transformers' DeferredStopCheck), so they are paired in order.
            self.steps: deque = deque()

        def record(self, rows: list) -> None:
            self.steps.append(rows)

        def put(self, value):
            if self.first:  # the prompt comes first; only new tokens are streamed
                self.first = False
                return
            on_tokens(value.reshape(-1).tolist(), self.steps.popleft() if self.steps else None)

        def end(self):
            on_end()

    return Pipe()


class TextStream:
    """The text of one streamed completion, handed out piece by piece: whole characters
    only, and nothing from the first stop string on."""

    def __init__(self, tokenizer, stop: Collection[str]):
        self.tokenizer, self.stop = tokenizer, stop
        self.ids: list[int] = []
        self.sent = ""

    def push(self, ids: list[int]) -> str:
        """The new text once ``ids`` (the next generated tokens) are added ("" if none)."""
        self.ids.extend(t for t in ids if t != self.tokenizer.eos_token_id)
        text, _ = cut_at_stop(self.tokenizer.decode(self.ids), self.stop)
        if len(text) > len(self.sent) and not text.endswith("\ufffd"):  # whole characters only
            piece, self.sent = text[len(self.sent):], text
            return piece
        return ""

    def rest(self, final_text: str) -> str:
        """What ``final_text`` (the completion's text) holds beyond what was handed out."""
        return final_text[len(self.sent):] if len(final_text) > len(self.sent) else ""
