"""``slmfactory serve``: the specialised small models of every domain behind one Ray Serve
deployment, OpenAI-compatible.

- One deployment multiplexes the per-domain models (``@serve.multiplexed``: an LRU of at
  most ``serving.max_models_per_replica`` per replica; ``serving.preload`` loads them at
  start). Scoring and non-streaming generation go through ``@serve.batch``: requests of
  one domain are scored together; greedy/sampled completions with the same settings are
  generated in one left-padded ``generate`` call. A failing request fails alone: its
  batch neighbours are answered.
- Routes: ``GET /v1/models``, ``POST /v1/completions`` and ``POST /v1/chat/completions``
  (the messages through ``serving.chat_template``; both streaming as server-sent events
  that always end in ``[DONE]``, after an error event if generation failed), ``POST
  /v1/score`` (per-token log-probs and perplexity), ``POST /v1/domains``, ``GET`` and
  ``DELETE /v1/domains/NAME``, ``GET /healthz`` (a real forward pass with a deadline, also
  the deployment's ``check_health``), ``GET /metrics`` (Prometheus text of the replica that
  answers: per-domain requests by status, latency, tokens, model load time, cache hits and
  misses, queue depth; the same metrics of every replica, tagged by replica, are in Ray's
  metrics export: ``metrics.METRICS``, docs/serving.md).
- Models: each replica resolves and downloads its start-up models itself (a folder, an
  MLflow run, a registry alias: ``catalog.resolve``, cached per node) and follows a registry
  alias as it moves (``server.DomainServer``); a response names its model version in
  ``slmfactory-model-version``.
- Every request: ``Authorization: Bearer KEY`` when keys are configured (401; an admin key
  for ``/v1/domains``, else 403), per-key request and token rates (429 with
  ``Retry-After``), a body read with its size bound enforced while reading (413), one
  pydantic schema per route (400 naming the field), and a deadline
  (``serving.request_timeout_s``: 408).
- ``model: "auto"``: the prompt is answered by the start-up domain whose own model gives it
  the lowest mean NLL per token (each model scores at most ``serving.route_tokens`` of its
  tokens, in the replica that took the request: every replica holds every start-up
  domain's model); ``serving.auto_route: cluster`` routes by the clustering instead (the
  nearest generic centroid, the domain whose in-domain histogram gives it the highest
  share). The response's ``model`` and ``slmfactory.routed_to`` name the domain.
- A model folder that fails to load answers 503 naming its domain; the others keep serving.

This module is the Serve layer only: the deployment ``DomainModels`` (the ingress: the
routes above, on ``server.DomainServer``, the replica's models and request plumbing) and
``build_app(args)``, the application builder (``serve run slmfactory.serving.app:build_app``
with ``args`` from a Serve config YAML: see ``infra/serve.yaml``). The model work is
``serving.engine``'s and ``serving.generation``'s; the ``/v1/domains`` routes' is
``serving.domains``'.
"""

# No `from __future__ import annotations` here: Ray Serve's class-based FastAPI views read
# the routes' annotations as objects (a string "Request" would become a query parameter).
import asyncio
import math
import os

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import generate_latest
from ray import serve

from slmfactory.platform.config import load_config, parse_overrides
from slmfactory.platform.errors import ConfigError
from slmfactory.serving import catalog as cat
from slmfactory.serving.api import BODY_LIMIT_ENV, ApiError, Limits
from slmfactory.serving.auth import load_keys
from slmfactory.serving.domains import DomainRequest, compared_view
from slmfactory.serving.engine import with_firsts
from slmfactory.serving.schemas import ChatRequest, CompletionRequest, ScoreRequest
from slmfactory.serving.server import AUTO, HEALTH_TIMEOUT_S, DomainServer
from slmfactory.serving.timing import mark, timer
from slmfactory.trial import experiment_name

api = FastAPI(title="slmfactory", docs_url=None, redoc_url=None, openapi_url=None)

RAY_SERVE_ENV = {
    # Request-path log lines (the access log of the proxy, which `slmfactory serve` keeps)
    # buffered and written in bulk (ERROR lines at once), and not copied to stderr too.
    "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1000",
    "RAY_SERVE_LOG_TO_STDERR": "0",
}
"""Ray Serve's settings for a short request path, of those Serve's own
``RAY_SERVE_THROUGHPUT_OPTIMIZED`` sets. Left at Ray's defaults (docs/serving.md): user
code and the proxy's router on the request's own event loop
(``RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD``/``RUN_ROUTER_IN_SEPARATE_LOOP`` = 0) gave
opposite results under load in two sittings on 2 cores (requests/s at 16 clients halved
in one, up a third in the other); direct ingress moves the app off its port. Read by each Serve process when it starts: ``build_app`` puts them in
the environment of a Ray started after it (the proxy's) and of the replica (its
``runtime_env``). These are tuning knobs: a value already in the environment wins."""


def serve_env(serving) -> dict[str, str]:
    """The environment the Serve processes of an app with ``serving`` (the recipe's
    section) are to start with: ``RAY_SERVE_ENV`` and the proxy's body limit
    (``api.proxy_middlewares``). ``build_app`` sets it; a caller that starts Ray before
    building the app sets it first (the proxy starts with Ray's first Serve app).

    Precedence: Ray Serve's tuning knobs (``RAY_SERVE_ENV``) yield to a value already in
    the environment; the body limit and the middleware that enforces it are ``serving``'s
    and always come from it. ``build_app`` writes them into this process's environment, so
    letting the environment win would hand the next app built here (another test's server,
    a second ``serve_env``) the previous app's limit instead of its own."""
    tuning = {k: os.environ.get(k, v) for k, v in RAY_SERVE_ENV.items()}
    return {**tuning, "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": "slmfactory.serving.api:proxy_middlewares",
            BODY_LIMIT_ENV: str(serving.max_request_bytes)}


@serve.deployment
@serve.ingress(api)
class DomainModels(DomainServer):
    """The routes of every served domain's small model (the replica: ``DomainServer``)."""

    @api.get("/healthz")
    async def healthz(self):
        try:
            await self.check_health()
        except Exception as e:  # noqa: BLE001
            return JSONResponse({"status": "unhealthy", "reason": str(e)[:300], "failed": self.failed},
                                status_code=503)
        return {"status": "ok", "domains": sorted(self.catalog), "failed": self.failed}

    @api.get("/metrics")
    async def metrics(self):
        self.m["queue"].labels("requests").set(self.in_flight)
        self.m["queue"].labels("domain_jobs").set(self.domains.pending())
        return PlainTextResponse(generate_latest(self.metrics_registry).decode(),
                                 media_type="text/plain; version=0.0.4")

    @api.get("/v1/models")
    async def models(self, request: Request):
        async def handle(_req, _caller, _deadline):
            entries = await asyncio.to_thread(
                lambda: {d: self.catalog.get(d) or self.domains.entry(d) for d in self.served_names()})
            data = [{"id": d, "object": "model", "created": 0, "owned_by": "slmfactory",
                     "strategy": e["strategy"], "params": e["params"], "test_ppl": e["test_ppl"],
                     "serving_cost": e.get("serving_cost"),
                     **(compared_view(e) if "compared" in e else {})}
                    for d, e in entries.items() if e is not None]
            if self.auto_served:
                data.append({"id": AUTO, "object": "model", "created": 0, "owned_by": "slmfactory"})
            return "-", {"object": "list", "data": data}

        return await self._respond("models", request, None, handle)

    @api.post("/v1/domains")
    async def create_domain(self, request: Request):
        """A new domain from a handful of its documents (``RuntimeDomains.create``): 201."""
        async def handle(req: DomainRequest, caller, deadline):
            served, auto_pick = await self._served_for_comparison(req.documents[0])
            view, tokens = await self.domains.create(req, served, auto_pick)
            self.count_tokens(tokens, req.name, "domains")
            return req.name, JSONResponse(view, status_code=201)

        return await self._respond("domains", request, DomainRequest, handle,
                                  max_bytes=self.limits.max_domain_request_bytes, admin=True)

    async def _served_for_comparison(self, text: str) -> tuple[dict, str | None]:
        """The start-up domains' models a new domain is compared with (through the
        multiplexed cache; one that fails to load is left out), and the one ``model:
        auto`` routes ``text`` to (None when ``auto`` is not served)."""
        served = {}
        for d in list(self.catalog)[:self.max_models]:
            try:
                served[d] = (await self.startup_model(d))[1]
            except Exception:  # noqa: BLE001  (a broken folder: not compared; its requests answer 503)
                continue
        auto_pick = None
        if self.auto_served:
            try:
                auto_pick, _ = await self.route(text)
            except Exception:  # noqa: BLE001  (no MiniLM here, no model loads: compared all the same, unlabelled)
                auto_pick = None
        return served, auto_pick

    @api.get("/v1/domains/{name}")
    async def domain_status(self, name: str, request: Request):
        async def handle(_req, _caller, _deadline):
            return name, await self.domains.status(name)

        return await self._respond("domains", request, None, handle)

    @api.delete("/v1/domains/{name}")
    async def delete_domain(self, name: str, request: Request):
        async def handle(_req, _caller, _deadline):
            return name, await self.domains.delete(name)

        return await self._respond("domains", request, None, handle, admin=True)

    @api.post("/v1/score")
    async def score(self, request: Request):
        async def handle(req: ScoreRequest, caller, deadline):
            domain, loaded, extra = await self.model_for(req.model, req.inputs[0], "input", deadline)
            mark("model")
            ids = self._token_ids(loaded, req.inputs, "input")
            for i, x in enumerate(ids):
                if len(x) < 2:
                    raise ApiError(400, f"input[{i}] has {len(x)} token(s); scoring needs at least 2",
                                   param="input", code="input_too_short")
                if len(x) > self.limits.max_prompt_tokens:
                    raise ApiError(400, f"input[{i}] has {len(x)} tokens; at most {self.limits.max_prompt_tokens}",
                                   param="input", code="input_too_long")
            await self._charge(caller, "tokens", sum(len(x) for x in ids))
            mark("tokenise")
            scored = await self._batched("score", [(domain, loaded, x, deadline, timer()) for x in ids])
            data = []
            for i, (x, lp) in enumerate(zip(ids, scored)):
                nll = -sum(lp) / len(lp)
                data.append({"index": i, "tokens": loaded.texts_of(x), "token_ids": x,
                             "token_logprobs": with_firsts(x, lp, loaded.context),
                             "num_scored": len(lp), "nll": nll, "perplexity": math.exp(nll)})
            self.count_tokens(sum(len(x) for x in ids), domain, "score")
            return domain, {"object": "list", "model": domain, "data": data, **({"slmfactory": extra} if extra else {})}

        return await self._respond("score", request, ScoreRequest, handle)

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._respond("completions", request, CompletionRequest, self.complete)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self._respond("chat", request, ChatRequest, self.chat)


BUILD_ARGS = ("config", "set", "models", "from_mlflow", "from_registry", "experiment", "max_params", "model_cache",
              "registry_poll_s")
"""What ``build_app``'s ``args`` may hold (a Serve config's ``args``)."""


def build_app(args: dict):
    """The Serve application. ``args``: ``config`` (a recipe), ``set`` (overrides), and one
    model source: ``models`` (a folder of exported models, on storage every node reads),
    ``from_mlflow`` (a sweep's experiment: each domain's best run) or ``from_registry`` (an
    alias, e.g. ``champion``: ``models:/<experiment>-<domain>@ALIAS`` of every domain that
    has it, ``experiment`` defaulting to the recipe's; the replicas follow the alias, looking
    it up every ``registry_poll_s`` seconds, default 30, 0 = never); optionally
    ``max_params`` (inference-size cap; not with ``from_registry``: the alias decides),
    ``model_cache`` (the folder, on each replica's node, that MLflow models are downloaded
    into; default ``$SLMFACTORY_MODEL_CACHE`` there, else ``<temp dir>/slmfactory-models``).
    Only which model serves each domain is looked up here: each replica resolves and
    downloads its models itself. API keys are read here (files, environment) and only
    their digests reach the replicas."""
    unknown = sorted(set(args) - set(BUILD_ARGS))
    if unknown:
        raise ConfigError(f"serve args: unknown {', '.join(map(repr, unknown))}; expected some of "
                          f"{', '.join(BUILD_ARGS)}")
    cfg = load_config(args.get("config"), parse_overrides(list(args.get("set") or [])))
    s = cfg.serving
    cap = float(args.get("max_params") or math.inf)
    given = [k for k in ("models", "from_mlflow", "from_registry") if args.get(k)]
    if len(given) > 1:
        raise ConfigError(f"serve: give one model source of models, from_mlflow, from_registry, not "
                          f"{' and '.join(given)}")
    try:
        poll_s = float(args.get("registry_poll_s", 30.0))
    except (TypeError, ValueError):
        poll_s = math.nan
    if not (math.isfinite(poll_s) and poll_s >= 0):
        raise ConfigError(f"serve args: registry_poll_s must be a number of seconds >= 0 (0: never look again), "
                          f"got {args.get('registry_poll_s')!r}")
    if args.get("models"):
        entries = cat.from_folder(args["models"], cap)
    elif args.get("from_registry"):
        if math.isfinite(cap):
            raise ConfigError("serve: max_params does not apply to from_registry (the alias names the model served)")
        entries = cat.registry_sources(cfg.tracking_uri, args.get("experiment") or experiment_name(cfg),
                                       str(args["from_registry"]))
    else:
        experiment = args.get("from_mlflow") or args.get("experiment") or experiment_name(cfg)
        entries = cat.from_mlflow(cfg.tracking_uri, experiment, cap)
    catalog = {d: {"source": e.source, "strategy": e.strategy, "params": e.params, "test_ppl": e.test_ppl,
                   "serving_cost": e.serving_cost(s.price_per_device_hour)} for d, e in entries.items()}
    if s.auto_route == "nll" and len(catalog) > s.max_models_per_replica:
        # auto scores a prompt with every start-up domain's model, each replica with its own:
        # more models than its cache holds would reload models on every auto request.
        raise ConfigError(f"serving.auto_route 'nll' scores each auto prompt with every served domain's model: "
                          f"{len(catalog)} domains need serving.max_models_per_replica >= {len(catalog)} (it is "
                          f"{s.max_models_per_replica}), or serving.auto_route 'cluster'")
    router = cat.router_data(cfg, list(catalog)) if s.auto_route == "cluster" else None
    api_keys, admin_keys = load_keys(cfg)
    security = {"api": api_keys, "admin": admin_keys, "rpm": s.rate_limit_rpm, "tpm": s.rate_limit_tpm,
                "timeout_s": s.request_timeout_s, "max_pending": s.max_pending_builds,
                "shared_rates": s.max_replicas > 1}
    env = serve_env(s)
    os.environ.update(env)
    deployment = DomainModels.options(
        ray_actor_options={"num_cpus": s.replica_cpus, "runtime_env": {"env_vars": env}},
        logging_config={"enable_access_log": s.access_log},
        autoscaling_config={"min_replicas": s.min_replicas, "max_replicas": s.max_replicas,
                            "target_ongoing_requests": s.target_ongoing_requests},
        max_ongoing_requests=s.max_ongoing_requests,
        # check_health runs a forward pass with its own deadline; Ray's must be longer.
        health_check_period_s=10, health_check_timeout_s=3 * HEALTH_TIMEOUT_S)
    return deployment.bind(catalog, router, Limits.from_config(s), s.preload, {"config": cfg.to_tree(resolved=False)},
                           security,
                           s.max_models_per_replica, s.batch_wait_s, s.adaptive_batch_wait,
                           chat_template=s.chat_template, auto_route=s.auto_route, route_tokens=s.route_tokens,
                           model_cache=args.get("model_cache"), registry_poll_s=poll_s)
