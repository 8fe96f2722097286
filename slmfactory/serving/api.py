"""The HTTP surface of the serving app: one declared pydantic schema per route (the
``/v1/domains`` body's is ``serving.domains.DomainRequest``), the request limits, and
OpenAI-style errors.

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
from typing import Annotated, Any, Literal, Union

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
    # Unknown fields are ignored, as OpenAI's own server does (clients send extras such as
    # "user"); every declared one is strict: no "1" for 1, no 1.0 for an integer.
    model_config = ConfigDict(extra="ignore", frozen=True, allow_inf_nan=False)


class CompletionRequest(Schema):
    model: Annotated[ModelName, AfterValidator(_model_name)]
    prompt: Inputs
    max_tokens: StrictInt = 16
    temperature: StrictFloat = Field(1.0, ge=0, le=2)
    top_p: StrictFloat = Field(1.0, gt=0, le=1)
    stop: Union[Stop, Annotated[list[Stop], Field(max_length=4)], None] = Field(None, validate_default=True)
    n: StrictInt = 1
    seed: Annotated[StrictInt, Field(ge=0, le=SEED_MAX)] | None = None
    echo: StrictBool = False
    logprobs: Annotated[StrictInt, Field(ge=0, le=5)] | None = None
    stream: StrictBool = False

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v, info: ValidationInfo):
        return _texts(v, info)

    @field_validator("max_tokens")
    @classmethod
    def _max_tokens(cls, v: int, info: ValidationInfo):
        cap = limits_of(info).max_tokens
        if not 1 <= v <= cap:
            raise PydanticCustomError("invalid_value", "must be an integer in 1..{cap}", {"cap": cap})
        return v

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
    def _combinations(self):
        if self.temperature == 0 and self.n > 1:
            # Greedy decoding has one answer: n copies of it are not n samples.
            raise ApiError(400, "'n' > 1 needs sampling (temperature > 0); greedy decoding has one answer",
                           param="n", code="invalid_value")
        if self.stream and (len(self.prompt) > 1 or self.n > 1):
            raise ApiError(400, "streaming takes one prompt and n = 1", param="stream", code="invalid_value")
        return self

    @property
    def prompts(self) -> list[str | list[int]]:
        """Each prompt: a text, or a text's token ids."""
        return self.prompt


Completion = CompletionRequest


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


def parse_score(raw: bytes, limits: Limits) -> ScoreRequest:
    return validate(ScoreRequest, raw, limits)


Route = Literal["completions", "score", "domains"]


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
