"""The OpenAI shapes of the serving app's completion answers: ``/v1/completions`` and
``/v1/chat/completions``, whole and as stream chunks, their ``usage`` and their ``logprobs``
(the completions API's four lists; the chat API's ``content`` list with bytes). Plain
dicts from plain values: no Ray, no torch (``tests/test_engine.py`` checks them).

A generated token's log-prob entry is ``generation.generate``'s: ``(log-prob, top)``, ``top``
a list of ``(token id, log-prob)`` or None.
"""

from __future__ import annotations

import time
from typing import Literal

Kind = Literal["completions", "chat"]


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


# -- log-probs ------------------------------------------------------------------------------

def completion_logprobs(loaded, ids: list[int], entries: list, top: int, offset: int = 0) -> dict:
    """The completions API's ``logprobs`` of generated ``ids`` (``entries`` theirs), their
    ``text_offset`` counted from ``offset`` (the echoed prompt's length)."""
    tokens = loaded.texts_of(ids[:len(entries)])
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t)
    texts = loaded.token_texts
    return {"tokens": tokens, "token_logprobs": [lp for lp, _ in entries],
            "top_logprobs": [{texts[i]: v for i, v in alt} for _, alt in entries] if top else None,
            "text_offset": offsets}


def joined(first: dict, second: dict) -> dict:
    """Two completions-API ``logprobs`` one after the other (the echoed prompt's, then the
    completion's)."""
    tops = None
    if first["top_logprobs"] is not None or second["top_logprobs"] is not None:
        tops = (first["top_logprobs"] or [None] * len(first["tokens"])) + (second["top_logprobs"] or [])
    return {"tokens": first["tokens"] + second["tokens"],
            "token_logprobs": first["token_logprobs"] + second["token_logprobs"], "top_logprobs": tops,
            "text_offset": first["text_offset"] + second["text_offset"]}


def chat_logprobs(loaded, ids: list[int], entries: list) -> dict:
    """The chat API's ``logprobs``: per generated token its text, log-prob, bytes and the
    top alternatives."""
    texts, raw = loaded.token_texts, loaded.token_bytes

    def one(i: int, lp: float) -> dict:
        return {"token": texts[i], "logprob": lp, "bytes": list(raw[i])}

    return {"content": [{**one(i, lp), "top_logprobs": [one(a, v) for a, v in (alt or [])]}
                        for i, (lp, alt) in zip(ids, entries)],
            "refusal": None}


# -- whole answers and stream chunks ------------------------------------------------------

OBJECTS = {"completions": ("text_completion", "text_completion"), "chat": ("chat.completion", "chat.completion.chunk")}


def answer(kind: Kind, cid: str, model: str, choices: list[dict], use: dict, extra: dict) -> dict:
    return {"id": cid, "object": OBJECTS[kind][0], "created": int(time.time()), "model": model, "choices": choices,
            "usage": use, **({"system_fingerprint": None} if kind == "chat" else {}),
            **({"slmfactory": extra} if extra else {})}


def choice(kind: Kind, index: int, text: str, finish: str | None, logprobs: dict | None) -> dict:
    if kind == "completions":
        return {"text": text, "index": index, "logprobs": logprobs, "finish_reason": finish}
    return {"index": index, "message": {"role": "assistant", "content": text, "refusal": None},
            "logprobs": logprobs, "finish_reason": finish}


def chunk(kind: Kind, cid: str, model: str, extra: dict, text: str | None, finish: str | None = None,
          logprobs: dict | None = None, with_usage: bool = False, role: bool = False) -> dict:
    """One stream chunk of choice 0: ``text`` (chat: the delta's content; None: no
    content, as in the last chunk), ``role`` (chat's first chunk names the role);
    ``with_usage``: ``"usage": null``, as OpenAI sends in every chunk but the last when
    ``stream_options.include_usage`` is set."""
    if kind == "completions":
        c = {"text": text or "", "index": 0, "logprobs": logprobs, "finish_reason": finish}
    else:
        delta = {**({"role": "assistant"} if role else {}), **({"content": text} if text is not None else {})}
        c = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
    return {"id": cid, "object": OBJECTS[kind][1], "created": int(time.time()), "model": model, "choices": [c],
            **({"usage": None} if with_usage else {}), **({"slmfactory": extra} if extra else {})}


def usage_chunk(kind: Kind, cid: str, model: str, extra: dict, use: dict) -> dict:
    """The last chunk of a stream with ``stream_options.include_usage``: no choices, the usage."""
    return {"id": cid, "object": OBJECTS[kind][1], "created": int(time.time()), "model": model, "choices": [],
            "usage": use, **({"slmfactory": extra} if extra else {})}


def stream_logprobs(kind: Kind, loaded, ids: list[int], entries: list, top: int, offset: int) -> dict:
    """A stream chunk's ``logprobs``: of the tokens whose text it carries."""
    if kind == "completions":
        return completion_logprobs(loaded, ids, entries, top, offset)
    return chat_logprobs(loaded, ids, entries)
