"""The request schemas of the serving app: one declared pydantic model per route
(``CompletionRequest``, ``ChatRequest``, ``ScoreRequest``; the ``/v1/domains`` body's is
``serving.domains.DomainRequest``), with their field types and validators. Apart from
``serving.api`` (the errors, limits, names and body validation every route shares): these
are what a route accepts, field by field.

Every OpenAI parameter of ``/v1/completions`` and ``/v1/chat/completions`` is declared:
honoured (``generation.Sampling``) or refused with a 400 naming it (``unsupported``); fields
outside OpenAI's schema are not used, and the response names them
(``IGNORED_FIELDS_HEADER``). docs/serving-api.md has the table.

The schemas give every field a type, a range and a length, so that a value which passes
validation cannot raise later (numbers beyond float or int64 range, thousand-digit
integers, lone surrogates, greedy decoding with ``n > 1``, temperatures small enough to
overflow the logits, seeds outside the generator's range).
"""

from __future__ import annotations

from typing import Annotated, Any, Callable, Union
from urllib.parse import quote

from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationInfo,
                      field_validator, model_validator)
from pydantic_core import PydanticCustomError

from slmfactory.serving.api import DEFAULT_LIMITS, ApiError, Limits, valid_name, validate


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
    strings and streaming. Each one is honoured (``generation.Sampling``) or refused (400)."""

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


def parse_completion(raw: bytes, limits: Limits) -> CompletionRequest:
    return validate(CompletionRequest, raw, limits)


def parse_chat(raw: bytes, limits: Limits) -> ChatRequest:
    return validate(ChatRequest, raw, limits)


def parse_score(raw: bytes, limits: Limits) -> ScoreRequest:
    return validate(ScoreRequest, raw, limits)
