"""The serving replica: every served domain's small model, and the request plumbing all
routes share. ``DomainServer`` holds no route: the Ray Serve deployment is
``app.DomainModels``, this class with the HTTP routes on top (the ingress / server split
of Ray Serve LLM, in one deployment). The model work is ``serving.engine``'s, the run-time
domains' ``serving.domains``'.

- Models: ``get_model`` is ``@serve.multiplexed`` (an LRU of ``max_models`` per replica),
  wired in ``__init__`` because the cap comes from the recipe. A start-up domain's model
  id is its name; a run-time domain's ``name@v<version>``, so a swapped model loads under
  a new id while the old one finishes its requests. A folder that fails to load answers
  503 naming its domain; the others keep serving.
- Batches (``@serve.batch``, wired the same way): requests of one domain are scored
  together; greedy/sampled completions with the same settings are generated in one
  left-padded ``generate`` call. A failing request fails alone: its neighbours are answered.
- Every request (``_respond``): API key (401, 403 for an admin route), per-key rates (429),
  a body read within its bound (413), one schema (400), a deadline (408), a metric, and a
  ``Server-Timing`` header saying where its time in the replica went (``Timer``).
- No wait for a batch that cannot fill (``_batched``): a request with no other request of
  its kind in the replica runs at once; ``serving.batch_wait_s`` is waited only when
  another one is queued or running, so that batches form under load.
- Start-up models come from their sources (``catalog.resolve``), resolved and downloaded by
  the replica itself into the node's cache; a registry alias (``models:/NAME@champion``)
  is looked up again every ``registry_poll_s`` seconds, and when it names another version
  the replica downloads and loads it (model id ``domain@r<version>``) before new requests
  go to it: requests in flight finish on the old one, none waits or fails. Each answer
  names the version it came from (``slmfactory-model-version``) and the replica
  (``slmfactory-replica``).
- Metrics go to the replica's own registry (``GET /metrics``: this replica's) and through
  ``ray.serve.metrics`` to Ray's metrics export (every replica in one scrape, tagged with
  its deployment and replica).
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import math
import threading
import time
import uuid

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from ray import serve

from slmfactory.platform.config import DEFAULT_CHAT_TEMPLATE, from_dict
from slmfactory.platform.cost import ServingRates
from slmfactory.serving import catalog as cat
from slmfactory.serving import replies
from slmfactory.serving.api import (IGNORED_FIELDS_HEADER, ApiError, ChatRequest, CompletionRequest, Limits,
                                    ignored_fields, validate)
from slmfactory.serving.auth import Auth, RateLimiter, SharedRateLimiter
from slmfactory.serving.domains import RuntimeDomains
from slmfactory.serving.engine import (Deadline, Loaded, Sampling, TextStream, chat_prompt, check_stop, generate,
                                       load, load_minilm, one_token_forward, pick_by_nll, pick_domain,
                                       route_embedding, route_entry, route_ids, score_ids, streamer, token_logprobs,
                                       uses_minilm)

AUTO = "auto"
MODEL_VERSION_HEADER = "slmfactory-model-version"
"""Names the model version a response came from (``models:/NAME/VERSION``, ``runs:/ID/model``;
absent for a model folder): how a client sees a registry alias move."""
REPLICA_HEADER = "slmfactory-replica"
"""Names the replica that answered (Ray Serve's replica id)."""
HEALTH_TIMEOUT_S = 10.0
AUTO_RETRY_S = 30.0
"""A start-up domain whose model failed to load is no ``auto`` candidate for this long
before ``auto`` tries to load it again (each try would delay every ``auto`` request)."""


def import_everything() -> None:
    """Everything a request or a background load imports, imported once before the replica
    takes a request: ``transformers`` resolves names lazily, and two threads resolving one
    at once made a cold replica answer 503 ("cannot import name 'AutoModelForCausalLM'")."""
    # The point of this function: the engine's lazy imports, made here, in one thread.
    import jinja2  # noqa: F401  (apply_chat_template's)
    import safetensors.torch  # noqa: F401
    import torch  # noqa: F401
    import transformers
    from transformers import (  # noqa: F401
        AutoConfig, AutoModelForCausalLM, LlamaForCausalLM, LogitsProcessorList, PreTrainedTokenizerFast,
        StoppingCriteria, StoppingCriteriaList)
    from transformers.convert_slow_tokenizer import bytes_to_unicode  # noqa: F401
    from transformers.generation.stopping_criteria import StopStringCriteria  # noqa: F401
    from transformers.generation.streamers import BaseStreamer  # noqa: F401
    from transformers.models.llama import modeling_llama  # noqa: F401
    from transformers.utils import chat_template_utils  # noqa: F401

    import slmfactory.models.instant  # noqa: F401
    import slmfactory.models.projected  # noqa: F401

    transformers.logging.set_verbosity_error()


class Timer:
    """Where one request's time in the replica went, part by part (milliseconds), sent
    back as its ``Server-Timing`` header: what a client, or ``bench/serve_bench.py``,
    reads to split a request's latency between the replica and the proxy in front of it."""

    __slots__ = ("start", "last", "parts", "notes", "headers")

    def __init__(self):
        self.start = self.last = time.perf_counter()
        self.parts: dict[str, float] = {}
        self.notes: dict[str, str] = {}
        self.headers: dict[str, str] = {}  # response headers a handler adds (the model version)

    def note(self, name: str, value) -> None:
        """A fact about the request (``batch``: how many requests its batch held)."""
        self.notes[name] = str(value)

    def mark(self, part: str, now: float | None = None) -> None:
        """The time since the previous mark belongs to ``part``."""
        now = time.perf_counter() if now is None else now
        self.parts[part] = self.parts.get(part, 0.0) + (now - self.last) * 1e3
        self.last = now

    def header(self) -> str:
        total = (time.perf_counter() - self.start) * 1e3
        return ", ".join([f"{k};dur={v:.3f}" for k, v in self.parts.items()] + [f"total;dur={total:.3f}"]
                         + [f'{k};desc="{v}"' for k, v in self.notes.items()])


TIMER: contextvars.ContextVar[Timer | None] = contextvars.ContextVar("slmfactory_timer", default=None)
"""The request's ``Timer`` (set by ``_respond``; the handlers' tasks inherit it)."""


def timer() -> Timer | None:
    return TIMER.get()


def mark(part: str) -> None:
    t = TIMER.get()
    if t is not None:
        t.mark(part)


class Failed:
    """One request's failure inside a batch: handed back to that request only."""

    def __init__(self, error: BaseException):
        self.error = error


def unwrap(result):
    if isinstance(result, Failed):
        raise result.error
    return result


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused (413) as soon as it exceeds ``limit``, declared or chunked: never
    buffered whole first."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            raise ApiError(400, "Content-Length is not a number", code="invalid_request")
        if int(declared) > limit:
            raise ApiError(413, f"request body of {int(declared)} bytes exceeds the limit of {limit}",
                           code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"request body exceeds the limit of {limit} bytes", code="request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


LATENCY_BUCKETS = (.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60)

METRICS = {
    # key: (kind, name, description, label names)
    "requests": ("counter", "slmfactory_requests", "requests per domain, route and status",
                 ("domain", "route", "status")),
    "latency": ("histogram", "slmfactory_latency_seconds", "request latency per domain and route",
                ("domain", "route")),
    "tokens": ("counter", "slmfactory_tokens", "tokens scored or generated per domain", ("domain", "route")),
    "load": ("gauge", "slmfactory_model_load_seconds", "seconds the domain's model took to load", ("domain",)),
    "cache": ("counter", "slmfactory_model_cache", "model cache lookups per domain (hit or miss)",
              ("domain", "result")),
    "queue": ("gauge", "slmfactory_queue_depth", "requests in flight in this replica, and domain builds and "
              "fine-tunes queued or running", ("kind",)),
}
"""The serving metrics. Each is recorded twice: in the replica's own Prometheus registry
(``GET /metrics``, this replica's alone) and through ``ray.serve.metrics`` (Ray's metrics
export on each node, tagged with application, deployment and replica: one scrape of the
cluster sees every replica; Ray prefixes the names with ``ray_``)."""


class _Metric:
    """One metric in both places; ``labels(...)`` then ``inc``/``set``/``observe``, as
    ``prometheus_client``'s."""

    __slots__ = ("own", "ray", "keys", "kind")

    def __init__(self, own, ray_metric, keys: tuple[str, ...], kind: str):
        self.own, self.ray, self.keys, self.kind = own, ray_metric, keys, kind

    def labels(self, *values) -> "_Bound":
        return _Bound(self, values)


class _Bound:
    __slots__ = ("metric", "values")

    def __init__(self, metric: _Metric, values: tuple):
        self.metric, self.values = metric, values

    def _tags(self) -> dict[str, str]:
        return {k: str(v) for k, v in zip(self.metric.keys, self.values)}

    def inc(self, amount: float = 1) -> None:
        self.metric.own.labels(*self.values).inc(amount)
        if self.metric.ray is not None:
            self.metric.ray.inc(amount, tags=self._tags())

    def set(self, value: float) -> None:
        self.metric.own.labels(*self.values).set(value)
        if self.metric.ray is not None:
            self.metric.ray.set(value, tags=self._tags())

    def observe(self, value: float) -> None:
        self.metric.own.labels(*self.values).observe(value)
        if self.metric.ray is not None:
            self.metric.ray.observe(value, tags=self._tags())


def registry_metrics(cluster: bool = True):
    """The replica's metrics (``METRICS``): its own Prometheus registry (``GET /metrics``)
    and the metrics dict the replica records to; ``cluster``: through ``ray.serve.metrics``
    too (in a Serve replica)."""
    reg = CollectorRegistry()
    if cluster:
        from ray.serve import metrics as ray_metrics
    m = {}
    for key, (kind, name, doc, keys) in METRICS.items():
        if kind == "counter":
            own = Counter(name, doc, keys, registry=reg)
            theirs = ray_metrics.Counter(name, doc, tag_keys=keys) if cluster else None
        elif kind == "gauge":
            own = Gauge(name, doc, keys, registry=reg)
            theirs = ray_metrics.Gauge(name, doc, tag_keys=keys) if cluster else None
        else:
            own = Histogram(name, doc, keys, registry=reg, buckets=LATENCY_BUCKETS)
            theirs = ray_metrics.Histogram(name, doc, boundaries=list(LATENCY_BUCKETS), tag_keys=keys) \
                if cluster else None
        m[key] = _Metric(own, theirs, keys, kind)
    return reg, m


class DomainServer:
    """Every served domain's small model, multiplexed in each replica."""

    async def __init__(self, catalog: dict[str, dict], router: dict | None, limits: Limits, preload: bool,
                       instant: dict | None = None, security: dict | None = None, max_models: int = 8,
                       batch_wait_s: float = 0.005, adaptive_batch_wait: bool = True,
                       chat_template: str = DEFAULT_CHAT_TEMPLATE, auto_route: str = "nll", route_tokens: int = 128,
                       model_cache: str | None = None, registry_poll_s: float = 30.0):
        # Before anything runs in a second thread (see import_everything).
        import_everything()
        import torch  # lazy: imported by import_everything just above

        torch.set_num_threads(1)
        self.catalog, self.router, self.limits, self.max_models = catalog, router, limits, max_models
        self.chat_template = chat_template
        self.auto_route, self.route_tokens = auto_route, route_tokens
        self.auto_failed: dict[str, float] = {}  # domain -> when its model last failed to load for auto
        sec = security or {}
        self.auth = Auth(sec.get("api", []), sec.get("admin", []))
        self.rates = RateLimiter(sec.get("rpm", 0.0), sec.get("tpm", 0.0))
        # More than one replica: one set of buckets for all of them (a key gets its limit
        # however many replicas its requests reach).
        app = serve.get_replica_context().app_name or "default"
        self.shared_rates = (SharedRateLimiter(sec.get("rpm", 0.0), sec.get("tpm", 0.0),
                                               f"slmfactory-rate-limits-{app}", self.rates)
                             if sec.get("shared_rates") and (sec.get("rpm") or sec.get("tpm")) else None)
        self.timeout = float(sec.get("timeout_s", 60.0))
        # Domains created at run time (POST /v1/domains, `slmfactory specialize`): read
        # from the workdir's registry on a miss, so every replica serves them.
        self.domains = RuntimeDomains(from_dict(instant["config"]) if instant else None, catalog,
                                      int(sec.get("max_pending", 2)))
        self.failed: dict[str, str] = {}
        self.lock = threading.Lock()  # one generate at a time: seeded sampling stays reproducible
        self.minilm = None
        self.in_flight = 0
        self.metrics_registry, self.m = registry_metrics()
        self.loaded_ids: set[str] = set()
        self._probe: Loaded | None = None
        # The start-up models' sources, resolved here (catalog.resolve): the folder each
        # domain is served from now, and every model id's folder and version.
        self.cache = cat.cache_root(model_cache)
        self.current: dict[str, cat.Resolved] = {}
        self.resolved_ids: dict[str, cat.Resolved] = {}
        self.registry_poll_s = float(registry_poll_s)
        self.replica_id = serve.get_replica_context().replica_id.unique_id

        # Serve's multiplexing and batching, sized by the recipe (hence wired here, per
        # replica, as Ray Serve LLM wires its multiplexed loader).
        async def load_model(model_id: str) -> Loaded:
            return await self._load_model(model_id)

        async def score_batch(items: list) -> list:
            return await self._score_batch(items)

        async def generate_batch(jobs: list) -> list:
            return await self._generate_batch(jobs)

        # Requests of each kind queued for or running in a batch (``_batched``).
        self.active = {"score": 0, "generate": 0}
        self.adaptive = adaptive_batch_wait
        self.get_model = serve.multiplexed(max_num_models_per_replica=max_models)(load_model)
        self.score_batch = serve.batch(max_batch_size=16, batch_wait_timeout_s=batch_wait_s)(score_batch)
        self.generate_batch = serve.batch(max_batch_size=8, batch_wait_timeout_s=batch_wait_s)(generate_batch)
        if preload:  # through the multiplexed loader, so the models sit in its LRU
            for d in list(catalog)[:max_models]:
                try:
                    await self.startup_model(d)
                except Exception as e:  # noqa: BLE001  (answered 503 for that domain)
                    self.failed[d] = f"{type(e).__name__}: {str(e)[:200]}"
        followed = [d for d, e in catalog.items() if e["source"].get("kind") == "registry"]
        self.follower = (asyncio.ensure_future(self._follow_registry(followed))
                         if followed and self.registry_poll_s > 0 else None)

    def count_tokens(self, n: int, domain: str, route: str) -> None:
        if n > 0:
            self.m["tokens"].labels(domain, route).inc(n)

    # -- models ---------------------------------------------------------------------------
    @staticmethod
    def _startup_id(domain: str, r: cat.Resolved) -> str:
        # A registry version loads under its own id: a moved alias's new version loads
        # beside the old one, which finishes its requests.
        return f"{domain}@r{r.version}" if r.label.startswith("models:/") else domain

    async def _resolve(self, domain: str, version=None) -> cat.Resolved:
        """``domain``'s source as a local folder (downloaded into the node's cache if need
        be); ``version``: a registry version already looked up. Off the event loop."""
        r = await asyncio.to_thread(cat.resolve, self.catalog[domain]["source"], self.cache, version)
        self.resolved_ids[self._startup_id(domain, r)] = r
        return r

    async def startup_model(self, domain: str) -> tuple[str, Loaded]:
        """(model id, model) of the start-up domain ``domain``: the version it is served
        from now, resolved on first use."""
        r = self.current.get(domain)
        if r is None:
            r = self.current.setdefault(domain, await self._resolve(domain))
        model_id = self._startup_id(domain, r)
        return model_id, await self.get_model(model_id)

    async def _follow_registry(self, domains: list[str]) -> None:
        """Every ``registry_poll_s`` seconds: each followed domain's alias looked up again;
        a new version is downloaded and loaded, then served (``_swap``). A lookup or
        download that fails keeps the version served now, and is tried next period."""
        log = logging.getLogger("ray.serve")
        while True:
            await asyncio.sleep(self.registry_poll_s)
            for d in domains:
                try:
                    await self._swap(d)
                except Exception as e:  # noqa: BLE001  (the current version keeps serving)
                    log.warning("slmfactory: following %s failed (%s: %s); serving %s still", d,
                                type(e).__name__, str(e)[:300], getattr(self.current.get(d), "label", "nothing"))

    async def _swap(self, domain: str) -> bool:
        """Serve the version ``domain``'s alias names now, if it is another: downloaded and
        loaded into the multiplexed cache first, so no request waits for it; requests in
        flight keep the model they hold. True when it swapped."""
        mv = await asyncio.to_thread(cat.registry_version, self.catalog[domain]["source"])
        now = self.current.get(domain)
        if now is not None and now.version == str(mv.version):
            return False
        r = await self._resolve(domain, mv)
        await self.get_model(self._startup_id(domain, r))
        self.current[domain] = r
        if r.meta:  # what /v1/models shows of the domain: the new version's run
            meta = dict(r.meta)
            rates = ServingRates.of(meta.pop("serving_rates", None))
            price = (self.catalog[domain].get("serving_cost") or {}).get("price_per_device_hour") or 0.0
            self.catalog[domain] = {**self.catalog[domain], **meta,
                                    "serving_cost": rates.view(price) if rates is not None else None}
        self.failed.pop(domain, None)
        logging.getLogger("ray.serve").info("slmfactory: %s now served from %s (was %s)", domain, r.label,
                                            getattr(now, "label", "nothing"))
        return True

    async def _load_model(self, model_id: str) -> Loaded:
        # A start-up domain's id is its name, or "name@r<version>" for a registry version;
        # a run-time domain's is "name@v<version>": a swapped model loads under a new id
        # while the old one finishes its requests.
        if model_id in self.resolved_ids:
            loaded = await asyncio.to_thread(load, self.resolved_ids[model_id].path)
        elif model_id in self.catalog:  # resolved by another path first (startup_model resolves)
            loaded = await asyncio.to_thread(load, (await self._resolve(model_id)).path)
        else:
            name, _, version = model_id.rpartition("@v")
            entry = self.domains.entry(name)
            if entry is None or str(entry["version"]) != version:
                raise FileNotFoundError(f"domain {name!r} version {version} is no longer registered")
            loaded = await asyncio.to_thread(load, entry["path"])
        self.m["load"].labels(model_id.split("@")[0]).set(loaded.load_seconds)
        return loaded

    def served_names(self) -> list[str]:
        return sorted(set(self.catalog) | set(self.domains.names()))

    @property
    def auto_served(self) -> bool:
        """Whether ``model: "auto"`` is answered: by the models' scores, whenever start-up
        domains are served; by the clustering, when the run's clustering exists."""
        return bool(self.catalog) if self.auto_route == "nll" else self.router is not None

    async def model_for(self, name: str, text: str | list[int], field: str, deadline: float = math.inf
                        ) -> tuple[str, Loaded, dict]:
        """The served domain ``name`` (``auto``: the one ``text`` routes to) and its model."""
        extra: dict = {}
        if name == AUTO:
            if not isinstance(text, str):
                raise ApiError(400, f"model 'auto' routes by the text: send '{field}' as text, not token ids",
                               param=field, code="invalid_value")
            name, extra = await self.route(text, deadline)
            mark("route")
        model_id = name
        if name in self.catalog:
            r = self.current.get(name)
            model_id = self._startup_id(name, r) if r is not None else name
        else:
            # File I/O off the event loop: a slow or stuck shared filesystem delays this
            # request (until its deadline), never the replica's other requests.
            entry = await asyncio.to_thread(self.domains.entry, name)
            if entry is None:
                raise ApiError(404, f"model '{name}' does not exist; domains served: "
                               f"{', '.join(self.served_names())}" + (" and auto" if self.auto_served else ""),
                               param="model", code="model_not_found")
            model_id = f"{name}@v{entry['version']}"
        self.m["cache"].labels(name, "hit" if model_id in self.loaded_ids else "miss").inc()
        try:
            if name in self.catalog:  # the version served now (resolved on first use)
                model_id, loaded = await self.startup_model(name)
            else:
                loaded = await self.get_model(model_id)
        except Exception as e:  # noqa: BLE001
            self.failed[name] = f"{type(e).__name__}: {str(e)[:200]}"
            raise ApiError(503, f"the model of domain '{name}' failed to load ({self.failed[name]}); "
                           "the other domains are served", param="model", code="model_unavailable",
                           type_="service_unavailable")
        self.loaded_ids.add(model_id)
        served_from = self.resolved_ids.get(model_id)
        t = timer()
        if served_from is not None and served_from.label and t is not None:
            t.headers[MODEL_VERSION_HEADER] = served_from.label
        if len(self.loaded_ids) > 4 * self.max_models:  # a hint for the hit/miss metric only: bounded
            self.loaded_ids = {model_id}
        self.failed.pop(name, None)
        return name, loaded, extra

    async def route(self, text: str, deadline: float = math.inf) -> tuple[str, dict]:
        """``model: "auto"``: the start-up domain ``text`` is routed to (``serving.auto_route``),
        and what the response tells about the choice (``slmfactory``)."""
        if self.auto_route == "nll":
            return await self._route_by_nll(text, deadline)
        if self.router is None:
            raise ApiError(404, "model 'auto' with serving.auto_route 'cluster' needs the run's clustering (run "
                           "`slmfactory cluster`, or route by the models' scores: serving.auto_route 'nll')",
                           param="model", code="model_not_found")
        if uses_minilm(self.router) and self.minilm is None:  # the one a domain build loaded, else its own
            self.minilm = self.domains.minilm or await asyncio.to_thread(load_minilm)
        emb = await asyncio.to_thread(route_embedding, self.router, [text], self.minilm)
        return pick_domain(self.router, self.catalog, emb)

    async def _route_by_nll(self, text: str, deadline: float) -> tuple[str, dict]:
        """The start-up domain whose own model gives ``text`` the lowest mean NLL per token
        (``engine.pick_by_nll``), each model scoring at most ``serving.route_tokens`` tokens
        of it (``engine.route_ids``). The models are this replica's (the multiplexed cache:
        every replica holds every start-up domain's model, ``build_app`` checks they fit);
        their forwards go through the replica's scoring batches, so the routing of
        concurrent requests is batched per domain like ``/v1/score``. A model that fails to
        load is left out (its own requests answer 503), and not tried again for
        ``AUTO_RETRY_S``."""
        if not self.catalog:
            raise ApiError(404, "model 'auto' routes among the start-up domains: none is served", param="model",
                           code="model_not_found")
        models: dict[str, Loaded] = {}
        for d in self.catalog:
            if time.monotonic() - self.auto_failed.get(d, -math.inf) < AUTO_RETRY_S:
                continue
            try:
                models[d] = (await self.startup_model(d))[1]
            except Exception as e:  # noqa: BLE001  (not a candidate; its own requests answer 503)
                self.failed[d] = f"{type(e).__name__}: {str(e)[:200]}"
                self.auto_failed[d] = time.monotonic()
            else:
                self.auto_failed.pop(d, None)
        if not models:
            raise ApiError(503, "model 'auto': no served domain's model loads", param="model",
                           code="model_unavailable", type_="service_unavailable")
        pieces = await asyncio.to_thread(lambda: {d: route_ids(m, text, self.route_tokens) for d, m in models.items()})
        items = [(d, models[d], p, deadline, None) for d in models for p in pieces[d]]
        scored = iter(await self._batched("score", items, failures=True))
        entries = {}
        for d in models:
            got = [next(scored) for _ in pieces[d]]
            bad = next((g.error for g in got if isinstance(g, Failed)), None)
            if isinstance(bad, Deadline):
                raise bad
            if bad is None:  # a model whose forward raises is no candidate
                entries[d] = route_entry(models[d], pieces[d], got)
        if not entries:
            raise ApiError(503, "model 'auto': no served domain's model could score the prompt", param="model",
                           code="model_unavailable", type_="service_unavailable")
        return pick_by_nll(entries)

    # -- batched work ---------------------------------------------------------------------
    async def _batched(self, kind: str, items: list[tuple], failures: bool = False) -> list:
        """The results of ``items`` (one request's), each through Serve's batch queue of
        ``kind`` when another request of that kind is queued or running in this replica;
        else all at once, without the queue: with nothing else in the replica a batch could
        only fill by waiting ``serving.batch_wait_s`` for requests that are not coming.
        An item that failed raises its error, or with ``failures`` is handed back as its
        ``Failed``."""
        done = (lambda r: r) if failures else unwrap
        direct, queued = ((self._score_batch, self.score_batch) if kind == "score"
                          else (self._generate_batch, self.generate_batch))
        alone = self.adaptive and self.active[kind] == 0
        self.active[kind] += len(items)
        try:
            if alone:
                return [done(r) for r in await direct(items)]
            return [done(r) for r in await asyncio.gather(*(queued(item) for item in items))]
        finally:
            self.active[kind] -= len(items)

    @staticmethod
    def _marks(items: list[tuple], part: str) -> None:
        """``part`` for each request of a batch (the last field of an item is its Timer)."""
        now = time.perf_counter()
        for item in items:
            if item[-1] is not None:
                item[-1].mark(part, now)
                item[-1].note("batch", len(items))

    async def _score_batch(self, items: list[tuple[str, Loaded, list[int], float, Timer | None]]) -> list:
        self._marks(items, "batch_wait")
        out: list = [None] * len(items)
        for domain in {it[0] for it in items}:
            idx = [i for i, it in enumerate(items) if it[0] == domain]
            await self._isolated(out, idx, lambda ix: score_ids(
                items[ix[0]][1], [items[i][2] for i in ix], max(items[i][3] for i in ix)))
        self._marks(items, "forward")
        return out

    async def _generate_batch(self, jobs: list[tuple[str, Loaded, list[int], Sampling, float, Timer | None]]
                              ) -> list:
        """One left-padded ``generate`` per group of jobs with the same domain and
        settings (unseeded, n = 1); a seeded or n > 1 job runs alone."""
        self._marks(jobs, "batch_wait")
        groups: dict[tuple, list[int]] = {}
        for i, (domain, _, _, s, _, _) in enumerate(jobs):
            key = (domain, s) if s.seed is None and s.n == 1 else ("alone", i)
            groups.setdefault(key, []).append(i)
        out: list = [None] * len(jobs)
        for idx in groups.values():
            await self._isolated(out, idx, lambda ix: generate(
                jobs[ix[0]][1], [jobs[i][2] for i in ix], jobs[ix[0]][3],
                max(jobs[i][4] for i in ix), self.lock))
        for i, (_, _, _, _, deadline, _) in enumerate(jobs):
            if not isinstance(out[i], Failed) and time.monotonic() > deadline:
                out[i] = Failed(Deadline())
        self._marks(jobs, "generate")
        return out

    async def _isolated(self, out: list, idx: list[int], work) -> None:
        """Run ``work`` on the requests ``idx`` of a batch; if it raises, run each alone,
        so that one bad request fails itself and not its neighbours."""
        try:
            got = await asyncio.to_thread(work, idx)
            for i, g in zip(idx, got):
                out[i] = g
            return
        except Exception as e:  # noqa: BLE001  (handed to the requests it belongs to)
            if len(idx) == 1:
                out[idx[0]] = Failed(e)
                return
        for i in idx:
            try:
                out[i] = (await asyncio.to_thread(work, [i]))[0]
            except Exception as e:  # noqa: BLE001
                out[i] = Failed(e)

    @staticmethod
    def _token_ids(loaded: Loaded, items: list[str | list[int]], field: str) -> list[list[int]]:
        """Each input's token ids: texts tokenised (in one call), id lists checked against
        the model's vocabulary (an id past it is a 400 naming ``field``)."""
        texts = [(i, x) for i, x in enumerate(items) if isinstance(x, str)]
        out: list = list(items)
        for (i, _), ids in zip(texts, loaded.encode([t for _, t in texts])):
            out[i] = ids
        for i, x in enumerate(items):
            if not isinstance(x, str):
                bad = next((t for t in x if t >= loaded.vocab), None)
                if bad is not None:
                    raise ApiError(400, f"'{field}[{i}]' holds token id {bad}, outside the model's vocabulary "
                                   f"(ids 0..{loaded.vocab - 1})", param=field, code="invalid_value")
        return out

    def _check_sampling(self, loaded: Loaded, s: Sampling) -> None:
        """What only the model can tell, found before generation rather than inside it: a
        stop string the vocabulary cannot form, a ``logit_bias`` token past the vocabulary
        (400s naming the field)."""
        try:
            check_stop(loaded.tokenizer, s.stop)
        except ValueError as e:
            raise ApiError(400, f"'stop': {e}", param="stop", code="invalid_value") from None
        bad = [t for t, _ in s.logit_bias if t >= loaded.vocab]
        if bad:
            raise ApiError(400, f"'logit_bias' holds token id {bad[0]}, outside the model's vocabulary "
                           f"(ids 0..{loaded.vocab - 1})", param="logit_bias", code="invalid_value")

    # -- request plumbing -----------------------------------------------------------------
    async def _respond(self, route: str, request: Request, schema, handler, max_bytes: int | None = None,
                      admin: bool = False):
        """Authenticate, rate-limit, read the body within its bound, validate it with
        ``schema``, run ``handler(req, caller, deadline)`` within the deadline; every
        failure is an OpenAI error body, every outcome a metric."""
        timer = Timer()
        TIMER.set(timer)
        deadline = time.monotonic() + self.timeout
        domain, status = "-", "200"
        self.in_flight += 1
        try:
            caller = await self._caller(request, admin)
            timer.mark("auth")
            if schema is None:
                req = None
            else:
                raw = await asyncio.wait_for(read_body(request, max_bytes or self.limits.max_request_bytes),
                                             self.timeout)
                timer.mark("body")
                req = validate(schema, raw, self.limits)
                timer.mark("parse")
            domain, response = await asyncio.wait_for(handler(req, caller, deadline),
                                                      max(0.0, deadline - time.monotonic()))
            if not isinstance(response, Response):
                # Serialised here, once, by the C JSON encoder: FastAPI would first walk a
                # returned dict through jsonable_encoder, a Python call per value (a score
                # response holds three per token).
                response = JSONResponse(response)
            ignored = ignored_fields(req)
            if ignored:
                response.headers[IGNORED_FIELDS_HEADER] = ignored
            timer.mark("respond")
        except (asyncio.TimeoutError, Deadline):
            status = "408"
            response = JSONResponse(ApiError(408, f"the request did not finish within its deadline of "
                                             f"{self.timeout:g}s (serving.request_timeout_s)",
                                             code="request_timeout").body(), status_code=408)
        except ApiError as e:
            status = str(e.status)
            response = JSONResponse(e.body(), status_code=e.status, headers=e.headers)
        except Exception as e:  # noqa: BLE001  (a bug or a broken model: the replica keeps serving)
            status = "500"
            response = JSONResponse(ApiError(500, f"internal error: {type(e).__name__}: {str(e)[:300]}",
                                             type_="server_error", code="internal_error").body(), status_code=500)
        finally:
            self.in_flight -= 1
            self.m["requests"].labels(domain, route, status).inc()
            self.m["latency"].labels(domain, route).observe(time.perf_counter() - timer.start)
            self.m["queue"].labels("requests").set(self.in_flight)
        response.headers["server-timing"] = timer.header()
        response.headers[REPLICA_HEADER] = self.replica_id
        for k, v in timer.headers.items():
            response.headers[k] = v
        return response

    async def _caller(self, request: Request, admin: bool):
        caller = self.auth.caller(request.headers.get("authorization"))
        if caller is None:
            raise ApiError(401, "a valid API key is required: send 'Authorization: Bearer KEY'",
                           code="invalid_api_key", type_="authentication_error",
                           headers={"WWW-Authenticate": "Bearer"})
        if admin and not caller.admin:
            raise ApiError(403, "this route needs an admin key (serving.admin_keys_file)",
                           code="admin_key_required", type_="permission_error")
        await self._charge(caller, "requests", 1)
        return caller

    async def _charge(self, caller, kind: str, amount: float) -> None:
        wait = (await self.shared_rates.charge(caller.key, kind, amount) if self.shared_rates is not None
                else self.rates.charge(caller.key, kind, amount))
        if wait:
            raise ApiError(429, f"rate limit of this key exceeded ({kind} per minute); retry after "
                           f"{wait:.0f}s", code="rate_limit_exceeded", type_="rate_limit_error",
                           headers={"Retry-After": str(int(wait))})

    async def check_health(self):
        """Ray Serve's health check (and ``/healthz``): a one-token forward pass of a
        loaded model, through the same thread pool and lock as requests, within
        ``HEALTH_TIMEOUT_S``: a replica wedged on its work is reported and replaced."""
        if self._probe is None and self.current:
            try:
                self._probe = await asyncio.wait_for(asyncio.to_thread(load, next(iter(self.current.values())).path),
                                                     HEALTH_TIMEOUT_S * 3)
            except Exception:  # noqa: BLE001  (a broken first folder: probe with no model)
                self._probe = None
        try:
            await asyncio.wait_for(asyncio.to_thread(
                lambda: one_token_forward(self._probe.model if self._probe is not None else None, self.lock,
                                          HEALTH_TIMEOUT_S)), HEALTH_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise RuntimeError(f"a one-token forward pass did not finish within {HEALTH_TIMEOUT_S:g}s") from None

    # -- completions and chat completions ---------------------------------------------------
    async def complete(self, c: CompletionRequest, caller, deadline: float):
        """``POST /v1/completions``: (domain, the answer or its stream)."""
        domain, loaded, extra = await self.model_for(c.model, c.prompts[0], "prompt", deadline)
        mark("model")
        ids = self._token_ids(loaded, c.prompts, "prompt")
        for i, x in enumerate(ids):
            if len(x) + c.max_tokens > min(loaded.context, self.limits.max_prompt_tokens + c.max_tokens):
                raise ApiError(400, f"prompt[{i}] has {len(x)} tokens; with max_tokens={c.max_tokens} it "
                               f"exceeds the model's context of {loaded.context} tokens",
                               param="max_tokens", code="context_length_exceeded")
        return await self._complete("completions", c, domain, loaded, extra, ids, Sampling.of(c), caller, deadline)

    async def chat(self, c: ChatRequest, caller, deadline: float):
        """``POST /v1/chat/completions``: the messages rendered with ``serving.chat_template``
        into one prompt, completed as ``complete`` does."""
        domain, loaded, extra = await self.model_for(c.model, c.text, "messages", deadline)
        mark("model")
        try:
            prompt = chat_prompt(loaded, c.messages, self.chat_template)
        except ValueError as e:
            raise ApiError(400, f"'messages': {e}", param="messages", code="invalid_value") from None
        ids = loaded.encode([prompt])[0]
        room = loaded.context - len(ids)
        if len(ids) > self.limits.max_prompt_tokens or room < 1:
            raise ApiError(400, f"the messages make a prompt of {len(ids)} tokens; at most "
                           f"{min(self.limits.max_prompt_tokens, loaded.context - 1)} leave room for a completion "
                           f"in the model's context of {loaded.context}", param="messages",
                           code="context_length_exceeded")
        cap = c.completion_cap
        if cap is not None and cap > room:
            field = "max_completion_tokens" if c.max_completion_tokens is not None else "max_tokens"
            raise ApiError(400, f"the messages make a prompt of {len(ids)} tokens; with {field}={cap} it exceeds "
                           f"the model's context of {loaded.context} tokens", param=field,
                           code="context_length_exceeded")
        sampling = Sampling.of(c, max_tokens=cap if cap is not None else min(self.limits.max_tokens, room))
        return await self._complete("chat", c, domain, loaded, extra, [ids], sampling, caller, deadline)

    async def _complete(self, kind: str, c, domain: str, loaded: Loaded, extra: dict, ids: list[list[int]],
                        s: Sampling, caller, deadline: float):
        self._check_sampling(loaded, s)
        await self._charge(caller, "tokens", sum(len(x) for x in ids) + s.max_tokens * s.n * len(ids))
        mark("tokenise")
        cid = f"{'cmpl' if kind == 'completions' else 'chatcmpl'}-{uuid.uuid4().hex[:24]}"
        if c.stream:
            return domain, StreamingResponse(self._stream(kind, cid, domain, loaded, ids[0], s, c, extra, deadline),
                                             media_type="text/event-stream")
        results = await self._batched("generate", [(domain, loaded, x, s, deadline, timer()) for x in ids])
        choices, completion_tokens = [], 0
        for i, (x, outs) in enumerate(zip(ids, results)):
            for out in outs:
                completion_tokens += len(out["ids"])
                text, lp = out["text"], None
                if kind == "chat":
                    if s.logprobs is not None:
                        lp = replies.chat_logprobs(loaded, out["ids"], out["logprobs"])
                    choices.append(replies.choice(kind, len(choices), text, out["finish"], lp))
                    continue
                echoed = (c.prompts[i] if isinstance(c.prompts[i], str) else loaded.tokenizer.decode(x)) \
                    if c.echo else ""
                if s.logprobs is not None:
                    lp = replies.completion_logprobs(loaded, out["ids"], out["logprobs"], s.logprobs, len(echoed))
                    if c.echo:  # the prompt's own log-probs: a forward pass over the prompt
                        lp = replies.joined(await asyncio.to_thread(token_logprobs, loaded, x, 0, s.logprobs,
                                                                    deadline), lp)
                choices.append(replies.choice(kind, len(choices), echoed + text, out["finish"], lp))
        prompt_tokens = sum(len(x) for x in ids)
        self.count_tokens(completion_tokens, domain, kind)
        return domain, replies.answer(kind, cid, domain, choices, replies.usage(prompt_tokens, completion_tokens),
                                      extra)

    # -- streaming ------------------------------------------------------------------------
    async def _stream(self, kind: str, cid: str, domain: str, loaded: Loaded, ids: list[int], s: Sampling, c,
                      extra: dict, deadline: float):
        """Server-sent events: one chunk per generated piece of text (with its tokens'
        log-probs when asked), then the finish reason, the usage when asked
        (``stream_options.include_usage``), and ``[DONE]``. Every stream ends: if generation
        raises or the deadline passes, an OpenAI error event comes before ``[DONE]``; a
        client that goes away stops its generation."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()
        pipe = streamer(lambda new, steps: loop.call_soon_threadsafe(queue.put_nowait, (new, steps)),
                        lambda: loop.call_soon_threadsafe(queue.put_nowait, None))
        with_usage = c.include_usage
        eos = loaded.tokenizer.eos_token_id

        def event(text: str | None, finish: str | None = None, entries: list | None = None, offset: int = 0,
                  role: bool = False) -> str:
            lp = None
            if entries is not None and s.logprobs is not None:
                lp = replies.stream_logprobs(kind, loaded, [t for t, _ in entries], [e for _, e in entries],
                                             s.logprobs, offset)
            return "data: " + json.dumps(replies.chunk(kind, cid, domain, extra, text, finish, lp, with_usage,
                                                       role)) + "\n\n"

        def error_event(e: ApiError) -> str:
            self.m["requests"].labels(domain, kind, f"stream_{e.status}").inc()
            return "data: " + json.dumps(e.body()) + "\n\n"

        task = asyncio.ensure_future(asyncio.to_thread(generate, loaded, [ids], s, deadline, self.lock, pipe, cancel))
        try:
            offset = 0
            if kind == "chat":
                yield event("", role=True)
            elif c.echo:
                echoed = c.prompts[0] if isinstance(c.prompts[0], str) else loaded.tokenizer.decode(ids)
                if s.logprobs is not None:  # the prompt's own log-probs: a forward pass over the prompt
                    lp = await asyncio.to_thread(token_logprobs, loaded, ids, 0, s.logprobs, deadline)
                    yield "data: " + json.dumps(replies.chunk(kind, cid, domain, extra, echoed, None, lp,
                                                              with_usage)) + "\n\n"
                else:
                    yield event(echoed)
                offset = len(echoed)
            text = TextStream(loaded.tokenizer, s.stop)
            pending: list = []  # (token, log-prob entry) of tokens whose text is not sent yet
            sent = 0
            getter = None
            while True:
                getter = getter or asyncio.ensure_future(queue.get())
                done, _ = await asyncio.wait({getter, task}, timeout=max(0.0, deadline - time.monotonic()) + 1.0,
                                             return_when=asyncio.FIRST_COMPLETED)
                if getter in done:
                    item, getter = getter.result(), None
                    if item is None:
                        break
                    new, steps = item
                    if steps is not None:
                        pending.extend((t, e) for t, e in zip(new, steps) if t != eos)
                    piece = text.push(new)
                    if piece:
                        yield event(piece, entries=pending, offset=offset)
                        sent, offset, pending = sent + len(pending), offset + len(piece), []
                    continue
                if task in done:
                    break  # generation ended (or raised) without its end-of-stream
                raise Deadline()  # nothing at all within the deadline
            if getter is not None:
                getter.cancel()
            final = (await task)[0][0]
            rest = text.rest(final["text"])
            # Tokens past a stop string are not sent, nor their log-probs.
            pending = pending[:max(0, len(final["logprobs"]) - sent)] if final["logprobs"] is not None else []
            if rest or pending:
                yield event(rest, entries=pending, offset=offset)
            yield event(None if kind == "chat" else "", final["finish"])
            if with_usage:
                yield "data: " + json.dumps(replies.usage_chunk(kind, cid, domain, extra, replies.usage(
                    len(ids), len(final["ids"])))) + "\n\n"
            self.count_tokens(len(final["ids"]), domain, kind)
        except Deadline:
            cancel.set()
            yield error_event(ApiError(408, f"generation did not finish within the deadline of {self.timeout:g}s",
                                       code="request_timeout"))
        except Exception as e:  # noqa: BLE001  (a failed generation ends its stream, with the reason)
            cancel.set()
            yield error_event(ApiError(500, f"generation failed: {type(e).__name__}: {str(e)[:300]}",
                                       type_="server_error", code="generation_failed"))
        finally:
            # The client went away (GeneratorExit / cancellation) or the stream ended:
            # either way the generation thread stops at its next token.
            cancel.set()
        yield "data: [DONE]\n\n"
