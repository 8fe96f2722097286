"""The HTTP surface of the serving app: request validation and OpenAI-style errors.

Every malformed request gets a 4xx with the body OpenAI clients understand,
``{"error": {"message", "type", "param", "code"}}``; nothing here raises anything else,
so no input can crash a replica.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class Limits:
    max_request_bytes: int = 1 << 20
    max_prompt_tokens: int = 4096
    max_tokens: int = 512
    max_n: int = 8
    max_inputs: int = 32
    max_domain_request_bytes: int = 4 << 20
    """``POST /v1/domains`` carries documents, not a prompt: its own, larger bound."""
    max_documents: int = 1000


def parse_json(raw: bytes, limits: Limits) -> dict:
    if len(raw) > limits.max_request_bytes:
        raise ApiError(413, f"request body of {len(raw)} bytes exceeds the limit of {limits.max_request_bytes}",
                       code="request_too_large")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError(400, f"request body is not UTF-8 (invalid byte at offset {e.start})", code="invalid_encoding")

    def no_constants(name: str):
        raise ApiError(400, f"{name} is not a valid JSON number", code="invalid_json")

    try:
        body = json.loads(text, parse_constant=no_constants)
    except json.JSONDecodeError as e:
        raise ApiError(400, f"request body is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})",
                       code="invalid_json")
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object", code="invalid_json")
    return body


_MISSING = object()


def _get(body: dict, name: str, kinds: tuple, default: Any = _MISSING, what: str = "") -> Any:
    value = body.get(name, default)
    if value is _MISSING:
        raise ApiError(400, f"'{name}' is required", param=name, code="missing_field")
    if value is None and default is None:
        return None
    if isinstance(value, bool) and bool not in kinds:
        raise ApiError(400, f"'{name}' must be {what}, got a boolean", param=name, code="invalid_type")
    if not isinstance(value, kinds):
        raise ApiError(400, f"'{name}' must be {what}, got {type(value).__name__}", param=name, code="invalid_type")
    return value


def _in_range(name: str, value: float, lo: float, hi: float, what: str) -> None:
    if not (math.isfinite(value) and lo <= value <= hi):
        raise ApiError(400, f"'{name}' must be {what}, got {value!r}", param=name, code="invalid_value")


def _texts(body: dict, name: str, limits: Limits) -> list[str]:
    value = _get(body, name, (str, list), what="a string or a list of strings")
    texts = [value] if isinstance(value, str) else value
    if not texts:
        raise ApiError(400, f"'{name}' must not be empty", param=name, code="empty_input")
    if len(texts) > limits.max_inputs:
        raise ApiError(400, f"'{name}' holds {len(texts)} texts; at most {limits.max_inputs}", param=name,
                       code="too_many_inputs")
    for t in texts:
        if not isinstance(t, str):
            raise ApiError(400, f"'{name}' must be a string or a list of strings", param=name, code="invalid_type")
        if not t.strip():
            raise ApiError(400, f"'{name}' must not be empty or blank", param=name, code="empty_input")
    return texts


@dataclass(frozen=True)
class Completion:
    model: str
    prompts: list[str]
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    n: int = 1
    seed: int | None = None
    echo: bool = False
    logprobs: int | None = None
    stream: bool = False


def parse_completion(body: dict, limits: Limits) -> Completion:
    model = _get(body, "model", (str,), what="a string (a domain, or \"auto\")")
    prompts = _texts(body, "prompt", limits)
    max_tokens = _get(body, "max_tokens", (int,), 16, "an integer")
    _in_range("max_tokens", max_tokens, 1, limits.max_tokens, f"an integer in 1..{limits.max_tokens}")
    temperature = float(_get(body, "temperature", (int, float), 1.0, "a number"))
    _in_range("temperature", temperature, 0.0, 2.0, "a number in [0, 2]")
    top_p = float(_get(body, "top_p", (int, float), 1.0, "a number"))
    _in_range("top_p", top_p, 1e-9, 1.0, "a number in (0, 1]")
    stop = _get(body, "stop", (str, list), None, "a string or a list of up to 4 strings")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, "'stop' must be a non-empty string or a list of up to 4 of them", param="stop",
                       code="invalid_value")
    n = _get(body, "n", (int,), 1, "an integer")
    _in_range("n", n, 1, limits.max_n, f"an integer in 1..{limits.max_n}")
    seed = _get(body, "seed", (int,), None, "an integer")
    echo = _get(body, "echo", (bool,), False, "a boolean")
    logprobs = _get(body, "logprobs", (int,), None, "an integer")
    if logprobs is not None:
        _in_range("logprobs", logprobs, 0, 5, "an integer in 0..5")
    stream = _get(body, "stream", (bool,), False, "a boolean")
    return Completion(model, prompts, max_tokens, temperature, top_p, stop, n, seed, echo, logprobs, stream)


@dataclass(frozen=True)
class Score:
    model: str
    inputs: list[str]


def parse_score(body: dict, limits: Limits) -> Score:
    model = _get(body, "model", (str,), what="a string (a domain, or \"auto\")")
    return Score(model, _texts(body, "input", limits))


MAX_REPLACEMENT_SHARE = 0.005
"""Real text holds a few U+FFFD (the corpus: at most 0.08% of a document's characters);
a text mis-decoded from another encoding holds one per non-ASCII character."""


@dataclass(frozen=True)
class NewDomain:
    name: str
    documents: list[str]
    finetune_budget: int | None = None


def parse_domain(body: dict, limits: Limits) -> NewDomain:
    """``POST /v1/domains``: ``{"name", "documents": [text, ...], "finetune_budget"?: tokens}``."""
    from slmfactory.serving.domains import NAME_PATTERN, RESERVED

    name = _get(body, "name", (str,), what="a string")
    if not NAME_PATTERN.match(name) or name in RESERVED:
        raise ApiError(400, f"'name' must be 1-64 letters, digits, '_', '.' or '-' starting with a letter or digit "
                       f"(not 'auto'), got {name[:80]!r}", param="name", code="invalid_value")
    docs = _get(body, "documents", (list,), what="a list of document texts")
    if not docs:
        raise ApiError(400, "'documents' must hold at least one document", param="documents", code="empty_input")
    if len(docs) > limits.max_documents:
        raise ApiError(400, f"'documents' holds {len(docs)} documents; at most {limits.max_documents}",
                       param="documents", code="too_many_inputs")
    for i, d in enumerate(docs):
        if not isinstance(d, str):
            raise ApiError(400, f"'documents[{i}]' must be a string, got {type(d).__name__}", param="documents",
                           code="invalid_type")
        if not d.strip():
            raise ApiError(400, f"'documents[{i}]' is empty or blank", param="documents", code="empty_input")
        if "\x00" in d or d.count("\ufffd") > MAX_REPLACEMENT_SHARE * len(d):
            # U+FFFD is what a decoder leaves for bytes it could not read: a text full of
            # them was decoded from an encoding it is not in, and would route on garbage.
            raise ApiError(400, f"'documents[{i}]' holds NUL or many U+FFFD replacement characters: it was decoded "
                           "from an unknown encoding; send the documents as UTF-8 text", param="documents",
                           code="invalid_encoding")
    budget = _get(body, "finetune_budget", (int,), None, "an integer (tokens)")
    if budget is not None:
        _in_range("finetune_budget", budget, 1, 10 ** 12, "a positive integer (tokens)")
    return NewDomain(name, docs, budget)
