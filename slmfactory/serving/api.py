"""The HTTP surface of the serving app: one declared pydantic schema per route (the
``/v1/domains`` body's is ``serving.domains.DomainRequest``), the request limits, and
OpenAI-style errors.

Every OpenAI parameter of ``/v1/completions`` and ``/v1/chat/completions`` is declared:
honoured (``engine.Sampling``) or refused with a 400 naming it (``unsupported``); fields
outside OpenAI's schema are not used, and the response names them
(``IGNORED_FIELDS_HEADER``). docs/serving-api.md has the table.

Every malformed request gets a 4xx with the body OpenAI clients understand,
``{"error": {"message", "type", "param", "code"}}``, ``param`` naming the offending
field. The schemas give every field a type, a range and a length, so that a value which
passes validation cannot raise later (numbers beyond float or int64 range, thousand-digit
integers, lone surrogates, greedy decoding with ``n > 1``, temperatures small enough to
overflow the logits, seeds outside the generator's range).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Annotated, Any, Callable, Literal, Union
from urllib.parse import quote

from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError, ValidationInfo, field_validator, model_validator)
from pydantic_core import PydanticCustomError

from slmfactory.platform.config import ServingConfig


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


MAX_DOCUMENTS = 1000
"""Documents one ``POST /v1/domains`` may carry."""
DOMAIN_BODY_FACTOR = 4
"""``POST /v1/domains`` carries documents, not a prompt: its body may be this many times
``serving.max_request_bytes``."""


@dataclass(frozen=True)
class Limits:
    """The bounds of every request, from the recipe's ``serving:`` section
    (``Limits.from_config``): its defaults are ``ServingConfig``'s, the only ones."""

    max_request_bytes: int
    max_prompt_tokens: int
    max_tokens: int
    max_n: int
    max_inputs: int
    max_domain_request_bytes: int
    """``POST /v1/domains`` carries documents, not a prompt: its own, larger bound."""
    max_documents: int = MAX_DOCUMENTS

    @classmethod
    def from_config(cls, serving: ServingConfig) -> Limits:
        return cls(max_request_bytes=serving.max_request_bytes, max_prompt_tokens=serving.max_prompt_tokens,
                   max_tokens=serving.max_tokens, max_n=serving.max_n, max_inputs=serving.max_inputs,
                   max_domain_request_bytes=DOMAIN_BODY_FACTOR * serving.max_request_bytes)


DEFAULT_LIMITS = Limits.from_config(ServingConfig())
"""What a schema validated without limits (no ``context``) is held to."""


# -- names ------------------------------------------------------------------------------

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
"""The one rule for domain and model names, always applied with ``fullmatch`` (``match``
with ``$`` lets a trailing newline through). A name never reaches the file system before
it passed this rule, so ``../x`` or ``a/b`` cannot name a file."""
RESERVED = frozenset({"auto"})


def valid_name(name: object) -> bool:
    return isinstance(name, str) and NAME_RE.fullmatch(name) is not None


# -- field types --------------------------------------------------------------------------

MAX_STOP_CHARS = 64
"""A stop string longer than this would be checked against every generated step's text
for nothing: no client needs one."""
SEED_MAX = 2 ** 63 - 1
"""torch.manual_seed takes any int64; larger seeds raise inside generation."""
MIN_SAMPLING_TEMPERATURE = 0.01
"""Logits divided by a smaller temperature can overflow float32 (inf - inf = NaN in the
softmax); below it a request asks for greedy decoding with ``temperature: 0``."""


def _unicode(s: str) -> str:
    # json.loads keeps lone surrogates ("\ud800"): the tokenizer (Rust) cannot take them.
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise PydanticCustomError("invalid_encoding", "holds a lone surrogate (not a Unicode character)") from None
    return s


def _not_blank(s: str) -> str:
    if not s.strip():
        raise PydanticCustomError("empty_input", "must not be empty or blank")
    return s


StrictFloat = Annotated[float, Field(strict=True)]
"""A JSON number (an integer is a number too); never a string."""
Text = Annotated[StrictStr, AfterValidator(_unicode), AfterValidator(_not_blank)]
Stop = Annotated[StrictStr, Field(min_length=1, max_length=MAX_STOP_CHARS), AfterValidator(_unicode)]
ModelName = Annotated[StrictStr, Field(max_length=64)]


def _model_name(name: str) -> str:
    if not valid_name(name):
        raise PydanticCustomError("invalid_value", "must be a served domain's name (1-64 letters, digits, '_', '.' "
                                  "or '-', starting with a letter or digit) or \"auto\"")
    return name


def limits_of(info: ValidationInfo) -> Limits:
    return (info.context or {}).get("limits") or DEFAULT_LIMITS


MAX_PROMPT_IDS = 1 << 16
"""Token ids one prompt or score input may list (``serving.max_prompt_tokens`` is the
real bound, checked once the model is known; this one only caps what is parsed)."""

TokenId = Annotated[StrictInt, Field(ge=0, le=2 ** 31 - 1)]
TokenIds = Annotated[list[TokenId], Field(min_length=1, max_length=MAX_PROMPT_IDS)]
"""A text given as its token ids (OpenAI's and vLLM's ``prompt: [int, ...]``); ids past
the served model's vocabulary are a 400 naming the field, once the model is known."""
Inputs = Union[Text, Annotated[list[Text], Field(max_length=1024)], TokenIds,
               Annotated[list[TokenIds], Field(max_length=1024)]]
"""A text, a list of texts, a text as token ids, or a list of those."""


def _texts(value, info: ValidationInfo) -> list:
    """The inputs as a list, each a text or a list of token ids."""
    texts = [value] if isinstance(value, str) or (value and isinstance(value[0], int)) else value
    if not texts:
        raise PydanticCustomError("empty_input", "must not be empty")
    cap = limits_of(info).max_inputs
    if len(texts) > cap:
        raise PydanticCustomError("too_many_inputs", "holds {n} texts; at most {cap}", {"n": len(texts), "cap": cap})
    return texts


class Schema(BaseModel):
    # Unknown fields are not used, and not refused either, as OpenAI's own server does (clients
    # send extras): they are kept aside (``model_extra``) so that the response names them, in
    # its ``x-slmfactory-ignored-fields`` header (``ignored_fields``). Every declared field
    # is strict: no "1" for 1, no 1.0 for an integer.
    model_config = ConfigDict(extra="allow", frozen=True, allow_inf_nan=False)


IGNORED_FIELDS_HEADER = "x-slmfactory-ignored-fields"
"""The response header naming a request's fields this server does not know (and so did
not use), comma-separated, each percent-encoded (any JSON key becomes header-safe ASCII)."""
MAX_NAMED_FIELDS = 32


def ignored_fields(request: BaseModel | None) -> str | None:
    """The value of ``IGNORED_FIELDS_HEADER`` for ``request`` (None: every field was known)."""
    extra = getattr(request, "model_extra", None) or {}
    if not extra:
        return None
    names = [quote(k[:64], safe="") for k in sorted(extra)]
    more = len(names) - MAX_NAMED_FIELDS
    return ",".join(names[:MAX_NAMED_FIELDS]) + (f",...+{more}" if more > 0 else "")


def unsupported(name: str, reason: str) -> ApiError:
    """The 400 of an OpenAI parameter this server does not implement (never dropped silently)."""
    return ApiError(400, f"'{name}' is not supported by this server: {reason}", param=name,
                    code="unsupported_parameter")


def _or(default):
    """An ``AfterValidator``: an explicit JSON ``null`` means the default, as in OpenAI's API."""
    return AfterValidator(lambda v: default if v is None else v)


MAX_LOGIT_BIAS = 1024
"""Tokens one ``logit_bias`` may bias."""
TOKEN_ID_MAX = 2 ** 31 - 1


def _logit_bias(v: dict | None) -> tuple[tuple[int, float], ...]:
    """OpenAI's ``{"token id": bias}`` as sorted ``(id, bias)`` pairs."""
    out = []
    for k, b in (v or {}).items():
        if not (k.isascii() and k.isdigit() and len(k) <= 10 and int(k) <= TOKEN_ID_MAX):
            raise PydanticCustomError("invalid_value", "keys must be token ids (decimal integers in 0..{m}); got "
                                      "{k}", {"m": TOKEN_ID_MAX, "k": repr(k[:20])})
        out.append((int(k), float(b)))
    return tuple(sorted(out))


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    include_usage: StrictBool | None = None
    """A last chunk, before ``[DONE]``, with the request's ``usage`` and no choices."""
    include_obfuscation: StrictBool | None = None
    """Random padding in each chunk against length side channels: not implemented (true is a 400)."""


class Sampled(Schema):
    """What ``/v1/completions`` and ``/v1/chat/completions`` share: the model, how to
    sample (OpenAI's parameters, and vLLM's ``top_k`` and ``repetition_penalty``), stop
    strings and streaming. Each one is honoured (``engine.Sampling``) or refused (400)."""

    model: Annotated[ModelName, AfterValidator(_model_name)]
    temperature: StrictFloat = Field(1.0, ge=0, le=2)
    top_p: StrictFloat = Field(1.0, gt=0, le=1)
    stop: Union[Stop, Annotated[list[Stop], Field(max_length=4)], None] = Field(None, validate_default=True)
    n: StrictInt = 1
    seed: Annotated[StrictInt, Field(ge=0, le=SEED_MAX)] | None = None
    presence_penalty: Annotated[Annotated[StrictFloat, Field(ge=-2, le=2)] | None, _or(0.0)] = 0.0
    frequency_penalty: Annotated[Annotated[StrictFloat, Field(ge=-2, le=2)] | None, _or(0.0)] = 0.0
    logit_bias: Annotated[Annotated[dict[StrictStr, Annotated[StrictFloat, Field(ge=-100, le=100)]],
                                    Field(max_length=MAX_LOGIT_BIAS)] | None,
                          AfterValidator(_logit_bias)] = ()
    top_k: Annotated[Annotated[StrictInt, Field(ge=-1, le=TOKEN_ID_MAX)] | None,
                     AfterValidator(lambda v: 0 if v is None or v < 0 else v)] = 0
    """vLLM's: sample from the ``top_k`` most likely tokens only (0 or -1: all)."""
    repetition_penalty: Annotated[Annotated[StrictFloat, Field(ge=0.01, le=100)] | None, _or(1.0)] = 1.0
    """vLLM's (and transformers'): a token already in the prompt or the completion has its
    logit divided by it (multiplied, when negative)."""
    stream: Annotated[StrictBool | None, _or(False)] = False
    stream_options: StreamOptions | None = None
    user: Annotated[StrictStr, Field(max_length=256)] | None = None
    """An end-user id (OpenAI's, for abuse monitoring): accepted; it changes no output."""

    @field_validator("n")
    @classmethod
    def _n(cls, v: int, info: ValidationInfo):
        cap = limits_of(info).max_n
        if not 1 <= v <= cap:
            raise PydanticCustomError("invalid_value", "must be an integer in 1..{cap}", {"cap": cap})
        return v

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, v: float):
        if 0 < v < MIN_SAMPLING_TEMPERATURE:
            raise PydanticCustomError("invalid_value", "must be 0 (greedy) or at least {t}",
                                      {"t": MIN_SAMPLING_TEMPERATURE})
        return float(v)

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        return [] if v is None else [v] if isinstance(v, str) else list(v)

    @model_validator(mode="after")
    def _sampled(self):
        if self.temperature == 0 and self.n > 1:
            # Greedy decoding has one answer: n copies of it are not n samples.
            raise ApiError(400, "'n' > 1 needs sampling (temperature > 0); greedy decoding has one answer",
                           param="n", code="invalid_value")
        if self.stream and self.n > 1:
            raise ApiError(400, "streaming takes one prompt and n = 1", param="stream", code="invalid_value")
        if self.stream_options is not None:
            if not self.stream:
                raise ApiError(400, "'stream_options' is only allowed with 'stream': true", param="stream_options",
                               code="invalid_value")
            if self.stream_options.include_obfuscation:
                raise unsupported("stream_options", "include_obfuscation (chunks are not padded)")
        return self

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


def _max_tokens(v: int | None, info: ValidationInfo):
    cap = limits_of(info).max_tokens
    if v is not None and not 1 <= v <= cap:
        raise PydanticCustomError("invalid_value", "must be an integer in 1..{cap}", {"cap": cap})
    return v


class CompletionRequest(Sampled):
    prompt: Inputs
    max_tokens: Annotated[StrictInt | None, _or(16)] = 16
    echo: Annotated[StrictBool | None, _or(False)] = False
    logprobs: Annotated[StrictInt, Field(ge=0, le=5)] | None = None
    best_of: Annotated[StrictInt, Field(ge=1)] | None = None
    """Honoured when it equals ``n`` (every sample is returned); a larger one is a 400."""
    suffix: Any = None
    """Text after the completion (insertion): refused unless null or empty."""

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v, info: ValidationInfo):
        return _texts(v, info)

    @field_validator("max_tokens")
    @classmethod
    def _max_tokens(cls, v: int, info: ValidationInfo):
        return _max_tokens(v, info)

    @model_validator(mode="after")
    def _completion(self):
        if self.stream and len(self.prompt) > 1:
            raise ApiError(400, "streaming takes one prompt and n = 1", param="stream", code="invalid_value")
        if self.best_of is not None and self.best_of < self.n:
            raise ApiError(400, f"'best_of' ({self.best_of}) must be at least 'n' ({self.n})", param="best_of",
                           code="invalid_value")
        if self.best_of is not None and self.best_of > self.n:
            raise unsupported("best_of", "best_of > n (ranking samples server-side); ask for n samples instead")
        if self.suffix not in (None, ""):
            raise unsupported("suffix", "text insertion (these are left-to-right base models)")
        return self

    @property
    def prompts(self) -> list[str | list[int]]:
        """Each prompt: a text, or a text's token ids."""
        return self.prompt

    @property
    def logprob_count(self) -> int | None:
        """Alternatives per token to list with its log-prob (None: no log-probs)."""
        return self.logprobs


Completion = CompletionRequest


CHAT_ROLES = ("system", "developer", "user", "assistant")
MAX_MESSAGES = 1024


class Message(BaseModel):
    """One chat message: a role, and text (a string, or a list of ``{"type": "text"}`` parts)."""

    model_config = ConfigDict(extra="allow", frozen=True, allow_inf_nan=False)
    role: StrictStr
    content: Union[Annotated[StrictStr, AfterValidator(_unicode)], list[dict[StrictStr, Any]], None] = None
    name: Annotated[StrictStr, Field(max_length=256), AfterValidator(_unicode)] | None = None


def _refuse_unless(request: BaseModel, table: dict[str, tuple[Callable[[Any], bool], str]]) -> None:
    for name, (allowed, reason) in table.items():
        if not allowed(getattr(request, name)):
            raise unsupported(name, reason)


_NO_TOOLS = "tool and function calling (base models)"
CHAT_REFUSED: dict[str, tuple[Callable[[Any], bool], str]] = {
    "tools": (lambda v: v in (None, []), _NO_TOOLS),
    "tool_choice": (lambda v: v in (None, "none"), _NO_TOOLS),
    "parallel_tool_calls": (lambda v: v in (None, False), _NO_TOOLS),
    "functions": (lambda v: v in (None, []), _NO_TOOLS),
    "function_call": (lambda v: v in (None, "none"), _NO_TOOLS),
    "response_format": (lambda v: v is None or v == {"type": "text"}, "structured output (only {\"type\": \"text\"})"),
    "audio": (lambda v: v is None, "audio output"),
    "modalities": (lambda v: v in (None, ["text"]), "output other than text"),
    "prediction": (lambda v: v is None, "predicted outputs"),
    "reasoning_effort": (lambda v: v is None, "reasoning (these are base models)"),
    "verbosity": (lambda v: v is None, "verbosity (these are base models)"),
    "web_search_options": (lambda v: v is None, "web search"),
    "store": (lambda v: v in (None, False), "storing completions"),
    "service_tier": (lambda v: v in (None, "auto", "default"), "service tiers other than 'auto' and 'default'"),
}
"""Chat parameters of OpenAI's API this server does not implement: a request that sets
one (to anything but its "off" value) is a 400 naming it."""


class ChatRequest(Sampled):
    messages: Annotated[list[Message], Field(min_length=1, max_length=MAX_MESSAGES)]
    max_tokens: StrictInt | None = None
    """Deprecated by OpenAI for ``max_completion_tokens``; either bounds the completion.
    Neither: as much as the context leaves, at most ``serving.max_tokens``."""
    max_completion_tokens: StrictInt | None = None
    logprobs: Annotated[StrictBool | None, _or(False)] = False
    top_logprobs: Annotated[StrictInt, Field(ge=0, le=20)] | None = None
    metadata: dict[StrictStr, StrictStr] | None = None
    """Accepted; it changes no output (nothing is stored)."""
    prompt_cache_key: StrictStr | None = None
    """Accepted; it changes no output."""
    safety_identifier: StrictStr | None = None
    """Accepted; it changes no output."""
    tools: Any = None
    tool_choice: Any = None
    parallel_tool_calls: Any = None
    functions: Any = None
    function_call: Any = None
    response_format: Any = None
    audio: Any = None
    modalities: Any = None
    prediction: Any = None
    reasoning_effort: Any = None
    verbosity: Any = None
    web_search_options: Any = None
    store: Any = None
    service_tier: Any = None

    @field_validator("max_tokens", "max_completion_tokens")
    @classmethod
    def _max_tokens(cls, v: int | None, info: ValidationInfo):
        return _max_tokens(v, info)

    @field_validator("messages")
    @classmethod
    def _messages(cls, v: list[Message]) -> list[dict]:
        """The messages as the template sees them: ``{"role", "content"[, "name"]}``, the
        content as one text (text parts joined by newlines)."""
        out = []
        for i, m in enumerate(v):
            where = f"'messages[{i}]'"
            if m.role in ("tool", "function"):
                raise ApiError(400, f"{where}: role {m.role!r} is not supported by this server: {_NO_TOOLS}",
                               param="messages", code="unsupported_parameter")
            if m.role not in CHAT_ROLES:
                raise ApiError(400, f"{where}: role must be one of {', '.join(CHAT_ROLES)}; got {m.role[:32]!r}",
                               param="messages", code="invalid_value")
            for field in ("tool_calls", "function_call", "audio"):
                if (m.model_extra or {}).get(field) is not None:
                    raise ApiError(400, f"{where}: '{field}' is not supported by this server: {_NO_TOOLS}",
                                   param="messages", code="unsupported_parameter")
            content = m.content
            if isinstance(content, list):
                texts = []
                for part in content:
                    if part.get("type") != "text" or not isinstance(part.get("text"), str):
                        raise ApiError(400, f"{where}: content parts of type {str(part.get('type'))[:32]!r} are not "
                                       "supported by this server (text only)", param="messages",
                                       code="unsupported_parameter")
                    texts.append(_unicode(part["text"]))
                content = "\n".join(texts)
            if content is None:
                raise ApiError(400, f"{where}: 'content' must be text", param="messages", code="invalid_value")
            out.append({"role": m.role, "content": content, **({"name": m.name} if m.name is not None else {})})
        return out

    @model_validator(mode="after")
    def _chat(self):
        _refuse_unless(self, CHAT_REFUSED)
        if self.top_logprobs is not None and not self.logprobs:
            raise ApiError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs", code="invalid_value")
        return self

    @property
    def completion_cap(self) -> int | None:
        """The completion's bound the request set (``max_completion_tokens``, else ``max_tokens``)."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def text(self) -> str:
        """The messages' text (what ``model: "auto"`` routes by)."""
        return "\n".join(m["content"] for m in self.messages)

    @property
    def logprob_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


Chat = ChatRequest


class ScoreRequest(Schema):
    model: Annotated[ModelName, AfterValidator(_model_name)]
    input: Inputs

    @field_validator("input")
    @classmethod
    def _input(cls, v, info: ValidationInfo):
        return _texts(v, info)

    @property
    def inputs(self) -> list[str | list[int]]:
        """Each input: a text, or a text's token ids."""
        return self.input


_CODES = {"missing": "missing_field", "json_invalid": "invalid_json", "recursion_loop": "invalid_json"}


def _error(e: ValidationError) -> ApiError:
    """The first error of a validation, as the OpenAI body: ``param`` the top-level field."""
    errors = e.errors(include_url=False)
    # A union (a text or a list of texts) reports one error per branch: the branch the
    # value's type matched, which failed on the value itself, says what is wrong.
    err = sorted(errors, key=lambda x: x["type"].endswith("_type"))[0]
    loc = [p for p in err["loc"] if isinstance(p, str)]
    # A union reports each branch's error under the branch's type name ("str", "list[...]"):
    # the field is the first element, the rest is pydantic's bookkeeping.
    param = loc[0] if loc else None
    kind = err["type"]
    if kind in _CODES:
        code = _CODES[kind]
    elif kind in ("empty_input", "too_many_inputs", "invalid_encoding"):
        code = kind
    elif kind == "string_unicode":
        code = "invalid_encoding"
    elif kind.endswith("_type"):
        code = "invalid_type"
    else:
        code = "invalid_value"
    where = f"'{param}'" if param else "the request body"
    idx = [p for p in err["loc"][1:] if isinstance(p, int)]
    if param and idx:
        where = f"'{param}[{idx[0]}]'"
    if param is None and kind in ("model_type", "dict_type"):
        return ApiError(400, "request body must be a JSON object", code="invalid_json")
    return ApiError(400, f"{where}: {err['msg']}"[:500], param=param, code=code)


def _json_fallback(raw: bytes) -> Any:
    """The body as Python objects, for naming the field an invalid value sits in when the
    fast parser rejected the whole body (a thousand-digit integer, a lone surrogate)."""
    def parse_int(s: str):
        # Beyond int64 no field accepts it; as an infinite float it fails its field's
        # type or range check (named), instead of the parser's digit limit (unnamed).
        return int(s) if len(s) <= 20 else float("inf")

    def no_constants(name: str):
        raise ValueError(f"{name} is not a valid JSON number")

    text = raw.decode("utf-8")  # the fast parser accepted the encoding or failed on it first
    return json.loads(text, parse_int=parse_int, parse_constant=no_constants)


def validate(schema: type[BaseModel], raw: bytes, limits: Limits) -> Any:
    """``raw`` (the whole body) as ``schema``, or an ``ApiError`` (400) naming the field."""
    ctx = {"limits": limits}
    try:
        return schema.model_validate_json(raw, context=ctx)
    except ApiError:
        raise
    except ValidationError as e:
        first = e.errors(include_url=False)[0]
        if first["type"] != "json_invalid":
            raise _error(e) from None
        reason = first["msg"]
    try:
        body = _json_fallback(raw)
    except UnicodeDecodeError as e:
        raise ApiError(400, f"request body is not UTF-8 (invalid byte at offset {e.start})",
                       code="invalid_encoding") from None
    except RecursionError:
        raise ApiError(400, "request body nests JSON deeper than any field of this route allows",
                       code="invalid_json") from None
    except ValueError:
        raise ApiError(400, f"request body is not valid JSON ({reason})", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object", code="invalid_json")
    try:
        return schema.model_validate(body, context=ctx)
    except ApiError:
        raise
    except ValidationError as e:
        raise _error(e) from None
    except RecursionError:
        raise ApiError(400, "request body nests JSON deeper than any field of this route allows",
                       code="invalid_json") from None


def parse_completion(raw: bytes, limits: Limits) -> CompletionRequest:
    return validate(CompletionRequest, raw, limits)


def parse_chat(raw: bytes, limits: Limits) -> ChatRequest:
    return validate(ChatRequest, raw, limits)


def parse_score(raw: bytes, limits: Limits) -> ScoreRequest:
    return validate(ScoreRequest, raw, limits)


Route = Literal["completions", "chat", "score", "domains"]


# -- the body limit, in the Serve proxy ---------------------------------------------------

DRAIN_FACTOR = 16
"""A declared body up to this many times the limit is read (and dropped) before its 413, so
that a client writing it whole reads the answer; a larger one is refused unread."""

BODY_LIMIT_ENV = "SLMFACTORY_MAX_REQUEST_BYTES"
"""``serving.max_request_bytes``, for the Serve proxy (set by ``app.serve_env``)."""


class BodyLimit:
    """An ASGI middleware of the Serve proxy (``proxy_middlewares``): a request body past
    its route's limit is answered 413 with ``Connection: close``: a chunked one as soon as the
    limit is passed, no more of it read; a declared one at once, after reading and dropping
    it when it is at most ``DRAIN_FACTOR`` x the limit (so that its client sees the 413, not a
    reset). Without it the proxy reads the
    whole body into memory (it reads ahead of the replica, which enforces the same limit
    only on what the proxy hands it): a 64 MiB chunked body was read whole before its 413."""

    def __init__(self, app, limit: int, domains_limit: int):
        self.app, self.limit, self.domains_limit = app, limit, domains_limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.domains_limit if scope.get("path", "").startswith("/v1/domains") else self.limit
        declared = dict(scope.get("headers") or ()).get(b"content-length")
        if declared is not None and declared.strip().isdigit() and int(declared) > limit:
            if int(declared) <= DRAIN_FACTOR * limit:
                # A client that sends its whole body before reading (most do: urllib, requests)
                # would see a connection reset, not the 413, if the proxy closed with its body
                # unread; a body of a few times the limit is read and dropped first, chunk by chunk.
                await self._drain(receive)
            return await self._refuse(send, f"request body of {int(declared)} bytes exceeds the limit of {limit}")
        state = {"read": 0, "started": False, "refused": False}

        async def guarded_send(message):
            if state["refused"]:
                return  # this request was answered 413 already
            if message["type"] == "http.response.start":
                state["started"] = True
            await send(message)

        async def limited_receive():
            if state["refused"]:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                state["read"] += len(message.get("body", b""))
                if state["read"] > limit:
                    if not state["started"]:
                        await self._refuse(send, f"request body exceeds the limit of {limit} bytes")
                    state["refused"] = True
                    # Stop reading: the proxy takes the client as gone and cancels the request.
                    return {"type": "http.disconnect"}
            return message

        return await self.app(scope, limited_receive, guarded_send)

    @staticmethod
    async def _drain(receive) -> None:
        while True:
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                return

    @staticmethod
    async def _refuse(send, message: str) -> None:
        body = json.dumps(ApiError(413, message, code="request_too_large").body()).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


def proxy_middlewares() -> list:
    """What the Serve proxy wraps every request in (its
    ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``): the body limit of ``$SLMFACTORY_MAX_REQUEST_BYTES``."""
    from starlette.middleware import Middleware  # lazy: only the proxy needs it

    limit = os.environ.get(BODY_LIMIT_ENV, "")
    if not limit.isdigit():
        return []
    return [Middleware(BodyLimit, limit=int(limit), domains_limit=DOMAIN_BODY_FACTOR * int(limit))]
