"""The HTTP surface of the serving app that every route shares: OpenAI-style errors
(``ApiError``), the request limits (``Limits``), the one rule for domain and model names,
a body read as a route's schema (``validate``; the schemas are ``serving.schemas``', the
``/v1/domains`` body's ``serving.domains.DomainRequest``), and the body limit the Serve
proxy enforces (``proxy_middlewares``).

Every malformed request gets a 4xx with the body OpenAI clients understand,
``{"error": {"message", "type", "param", "code"}}``, ``param`` naming the offending
field.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ValidationError

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


# -- a body read as its route's schema ---------------------------------------------------

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
