"""The ``serving`` section of a recipe (``slmfactory serve``): the Ray Serve deployment,
its request limits, keys and rate limits, the chat template, ``model: "auto"``'s routing
and the price of a served device-hour.

Separate from ``config.py`` (which composes it into ``RunConfig``) because the serving
layer reads it alone (``serving.api.Limits.from_config``) and it is the recipe's longest
section.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from slmfactory.platform.errors import ConfigError, check


DEFAULT_CHAT_TEMPLATE = ("{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant:{% endif %}")
"""``serving.chat_template``'s default: each message as a ``role: content`` line, then
``assistant:``, which the base model continues (docs/serving-api.md#chat)."""
MAX_CHAT_TEMPLATE_CHARS = 4096


def _check_chat_template(template: str) -> None:
    """``serving.chat_template``: a Jinja template that compiles in the sandbox
    ``apply_chat_template`` renders it in (the same options) and renders a one-message
    conversation to a non-empty prompt."""
    key = "serving.chat_template"
    check(isinstance(template, str) and 0 < len(template) <= MAX_CHAT_TEMPLATE_CHARS, key,
          f"a Jinja template of 1..{MAX_CHAT_TEMPLATE_CHARS} characters", template)
    import jinja2  # lazy: only a recipe that sets its own template needs it
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = raise_exception
    try:
        text = env.from_string(template).render(messages=[{"role": "user", "content": "Hello"}],
                                                add_generation_prompt=True, bos_token="", eos_token="")
    except Exception as e:  # noqa: BLE001  (any failure of the user's template is its error)
        raise ConfigError(f"{key}: not a usable Jinja chat template ({type(e).__name__}: {str(e)[:200]})") from None
    check(bool(text.strip()), key, "a template that renders a conversation to a non-empty prompt", template)


MAX_COST_MEASURE_S = 60.0
"""``serving.cost_measure_s``'s bound: measuring is spent on every model a sweep exports."""
AUTO_ROUTES = ("nll", "cluster")
"""``serving.auto_route``'s values."""


@dataclass(frozen=True, kw_only=True)
class ServingConfig:
    """``slmfactory serve``: the Ray Serve deployment of the per-domain models. Its request
    limits (``max_request_bytes`` .. ``max_inputs``) are the app's only ones
    (``serving.api.Limits.from_config``)."""

    host: str = "127.0.0.1"
    """Bind address (loopback unless told otherwise)."""
    port: int = 8000
    max_models_per_replica: int = 8
    """``@serve.multiplexed`` LRU cap: domain models held by one replica."""
    preload: bool = False
    """Load the first ``max_models_per_replica`` models when a replica starts."""
    min_replicas: int = 1
    max_replicas: int = 1
    target_ongoing_requests: float = 8.0
    """Autoscaling target per replica."""
    max_ongoing_requests: int = 64
    replica_cpus: float = 1.0
    max_request_bytes: int = 1 << 20
    """Largest request body (413 past it); a ``POST /v1/domains`` body, documents, may be 4x it."""
    max_prompt_tokens: int = 4096
    max_tokens: int = 256
    """Largest ``max_tokens`` a completion may ask for."""
    max_n: int = 8
    max_inputs: int = 32
    """Texts per request (prompts or score inputs)."""
    api_keys_file: str = ""
    """A file of API keys, one a line (also ``$SLMFACTORY_API_KEYS``, comma-separated). No key
    anywhere: keys off, which ``serve`` allows only on loopback or with ``--insecure``.
    Keys are never put in the recipe itself: it is logged (MLflow params)."""
    admin_keys_file: str = ""
    """Keys that may also create, fine-tune and delete domains (also ``$SLMFACTORY_ADMIN_KEYS``)."""
    rate_limit_rpm: float = 0.0
    """Requests per minute per key (0 = no limit); past it, 429 with ``Retry-After``."""
    rate_limit_tpm: float = 0.0
    """Tokens per minute per key (prompt + requested completion tokens; 0 = no limit)."""
    request_timeout_s: float = 60.0
    """Deadline of every request; a completion or score past it stops and answers 408."""
    batch_wait_s: float = 0.005
    """How long ``@serve.batch`` waits to fill a scoring batch (generation waits for no
    batch: a request joins the running one at the next token, ``serving/scheduler.py``)."""
    adaptive_batch_wait: bool = True
    """Wait ``batch_wait_s`` only when another scoring request is queued or running in the
    replica; a request alone runs at once."""
    access_log: bool = False
    """Ray Serve's access log line per request in the replica's log."""
    max_domains: int = 32
    """Run-time domains (``POST /v1/domains``) a workdir may hold."""
    max_domain_disk_mb: float = 4096.0
    """Disk all run-time domains' model folders may use together."""
    max_pending_builds: int = 2
    """Domain builds and fine-tunes queued or running per replica; past it, 429."""
    register_when_outscored: bool = True
    """Register a run-time domain even when a served domain has a lower perplexity on its
    documents' held-out text (the 201 says so in ``better_served_by``); off: 409."""
    chat_template: str = DEFAULT_CHAT_TEMPLATE
    """How ``/v1/chat/completions`` turns messages into the base model's prompt: a Jinja
    template, rendered by the tokenizer's ``apply_chat_template`` (``messages``,
    ``add_generation_prompt``); default: ``role: content`` lines, then ``assistant:``."""
    auto_route: str = "nll"
    """How ``model: "auto"`` picks the served domain: ``nll``, the one whose own model gives
    the prompt the lowest mean NLL per token (every start-up domain's model scores at most
    ``route_tokens`` tokens of it, in the replica that took the request); ``cluster``, the
    one whose in-domain histogram gives the prompt's nearest generic cluster the highest
    share (needs the run's clustering; less accurate: docs/serving.md#model-auto)."""
    route_tokens: int = 128
    """Tokens of a prompt ``auto_route: nll`` scores with each model: all of a shorter prompt,
    else its first and last halves (``engine.route_pieces``). What bounds the latency
    ``auto`` adds: one forward of at most this many tokens per start-up domain."""
    price_per_device_hour: float = 0.0
    """Price of one hour of the device that serves (the machine a model's rates are measured
    on, in your billing currency): ``/v1/models``, the report and ``recommend --inference-cost``
    turn each model's measured device-hours per million tokens into a price with it; 0: shown
    in device-hours only (docs/costs.md#serving-cost)."""
    cost_measure_s: float = 1.0
    """Seconds the EXPORT stage spends measuring an exported model's scoring and generation
    tokens/s on this machine (``models/train/serving_rate.py``; at least one timed pass of each,
    whatever this says); 0: not measured (no serving cost for the model)."""

    def __post_init__(self) -> None:
        check(1 <= self.port <= 65535, "serving.port", "1..65535", self.port)
        check(self.auto_route in AUTO_ROUTES, "serving.auto_route", f"one of {list(AUTO_ROUTES)}", self.auto_route)
        check(self.route_tokens >= 2, "serving.route_tokens", ">= 2 (a forward scores all but its first token)",
              self.route_tokens)
        for name in ("rate_limit_rpm", "rate_limit_tpm", "batch_wait_s"):
            check(getattr(self, name) >= 0, f"serving.{name}", ">= 0", getattr(self, name))
        for name in ("price_per_device_hour", "cost_measure_s"):
            value = getattr(self, name)
            check(isinstance(value, (int, float)) and math.isfinite(value) and value >= 0, f"serving.{name}",
                  "a number >= 0", value)
        check(self.cost_measure_s <= MAX_COST_MEASURE_S, "serving.cost_measure_s",
              f"<= {MAX_COST_MEASURE_S:g} seconds (it is spent on every exported model)", self.cost_measure_s)
        for name in ("request_timeout_s", "max_domain_disk_mb"):
            check(getattr(self, name) > 0, f"serving.{name}", "> 0", getattr(self, name))
        for name in ("max_models_per_replica", "min_replicas", "max_ongoing_requests", "max_request_bytes",
                     "max_prompt_tokens", "max_tokens", "max_n", "max_inputs", "max_domains", "max_pending_builds"):
            check(getattr(self, name) >= 1, f"serving.{name}", ">= 1", getattr(self, name))
        check(self.max_replicas >= self.min_replicas, "serving.max_replicas", ">= serving.min_replicas",
              self.max_replicas)
        check(self.target_ongoing_requests > 0, "serving.target_ongoing_requests", "> 0",
              self.target_ongoing_requests)
        check(self.replica_cpus > 0, "serving.replica_cpus", "> 0", self.replica_cpus)
        if self.chat_template != DEFAULT_CHAT_TEMPLATE:
            _check_chat_template(self.chat_template)
