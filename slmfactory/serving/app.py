"""``slmfactory serve``: the specialised small models of every domain behind one Ray Serve
deployment, OpenAI-compatible.

- One deployment multiplexes the per-domain models (``@serve.multiplexed``: an LRU of at
  most ``serving.max_models_per_replica`` per replica; ``serving.preload`` loads them at
  start). Scoring and non-streaming generation go through ``@serve.batch``: requests of
  one domain are scored together; greedy/sampled completions with the same settings are
  generated in one left-padded ``generate`` call. A failing request fails alone: its
  batch neighbours are answered.
- Routes: ``GET /v1/models``, ``POST /v1/completions`` (streaming as server-sent events
  that always end in ``[DONE]``, after an error event if generation failed), ``POST
  /v1/score`` (per-token log-probs and perplexity), ``POST /v1/domains``, ``GET`` and
  ``DELETE /v1/domains/NAME``, ``GET /healthz`` (a real forward pass with a deadline, also
  the deployment's ``check_health``), ``GET /metrics`` (Prometheus text: per-domain
  requests by status, latency, tokens, model load time, cache hits and misses, queue depth).
- Every request: ``Authorization: Bearer KEY`` when keys are configured (401; an admin key
  for ``/v1/domains``, else 403), per-key request and token rates (429 with
  ``Retry-After``), a body read with its size bound enforced while reading (413), one
  pydantic schema per route (400 naming the field), and a deadline
  (``serving.request_timeout_s``: 408).
- ``model: "auto"``: the prompt is embedded with the clustering's MiniLM, assigned to the
  nearest generic centroid, and answered by the served domain whose in-domain histogram
  gives that cluster the highest share; the response names the domain.
- A model folder that fails to load answers 503 naming its domain; the others keep serving.

``build_app(args)`` is the application builder (``serve run slmfactory.serving.app:build_app``
with ``args`` from a Serve config YAML: see ``infra/serve.yaml``).
"""

# No `from __future__ import annotations` here: Ray Serve's class-based FastAPI views read
# the routes' annotations as objects (a string "Request" would become a query parameter).
import asyncio
import dataclasses
import json
import math
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

from fastapi import Request

from slmfactory.serving.api import (
    ApiError, CompletionRequest, DomainRequest, Limits, ScoreRequest, valid_name, validate)

AUTO = "auto"
LOGIT_CHUNK_ELEMENTS = 1 << 22
"""Scoring holds at most this many logits (16 MiB of float32) at a time, whatever the
vocabulary, the context and the number of inputs: windows x context x vocabulary logits
and their log-softmax copy were tens of GB at a 32k vocabulary for one allowed request."""
HEALTH_TIMEOUT_S = 10.0


class Deadline(Exception):
    """The request's deadline passed (answered 408)."""


@dataclass
class Loaded:
    model: Any
    tokenizer: Any
    context: int
    load_seconds: float = 0.0


def _load(path: str) -> Loaded:
    import torch
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from slmfactory.models.instant import CONSTRUCTION_LOCK

    t0 = time.perf_counter()
    # from_pretrained disables weight tying process-wide while it runs: no other model may
    # be built meanwhile (see CONSTRUCTION_LOCK).
    with CONSTRUCTION_LOCK:
        # use_safetensors: weights are loaded from safetensors only, never from a pickle.
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, use_safetensors=True).eval()
    tok = PreTrainedTokenizerFast.from_pretrained(path)
    return Loaded(model, tok, int(model.config.max_position_embeddings), time.perf_counter() - t0)


def _import_everything() -> None:
    """Everything a request or a background load imports, imported once before the replica
    takes a request: ``transformers`` resolves names lazily, and two threads resolving one
    at once made a cold replica answer 503 ("cannot import name 'AutoModelForCausalLM'")."""
    import safetensors.torch  # noqa: F401
    import torch  # noqa: F401
    import transformers
    from transformers import (  # noqa: F401
        AutoConfig, AutoModelForCausalLM, LlamaForCausalLM, PreTrainedTokenizerFast, StoppingCriteria)
    from transformers.generation.stopping_criteria import StopStringCriteria  # noqa: F401
    from transformers.generation.streamers import BaseStreamer  # noqa: F401
    from transformers.models.llama import modeling_llama  # noqa: F401

    import slmfactory.models.instant  # noqa: F401
    import slmfactory.models.projected  # noqa: F401
    import slmfactory.data.clusters  # noqa: F401
    import slmfactory.data.embed  # noqa: F401
    import slmfactory.serving.domains  # noqa: F401

    transformers.logging.set_verbosity_error()


def _halt(deadline: float, cancel: threading.Event | None):
    """A stopping criterion: generation stops at the next token once the deadline passed
    or the client went away (every row at once)."""
    from transformers import StoppingCriteria

    class Halt(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            import torch

            stop = time.monotonic() > deadline or (cancel is not None and cancel.is_set())
            return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)

    return Halt()


def _logit_chunks(loaded: Loaded, x, mask, deadline: float = math.inf):
    """(row, first position, log-sum-exp, logits) per chunk of ``x``'s positions, never
    more than ``LOGIT_CHUNK_ELEMENTS`` logits at once: the decoder's hidden states are
    computed per group of rows, the head per group of positions."""
    import torch

    model = loaded.model
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    head = model.get_output_embeddings()
    vocab = int(model.config.vocab_size)
    positions = max(1, LOGIT_CHUNK_ELEMENTS // vocab)
    rows_per = max(1, positions // max(1, x.shape[1]))
    with torch.no_grad():
        for r0 in range(0, x.shape[0], rows_per):
            if time.monotonic() > deadline:
                raise Deadline()
            xs, ms = x[r0:r0 + rows_per], mask[r0:r0 + rows_per]
            if decoder is None or head is None:
                logits_all = model(input_ids=xs, attention_mask=ms).logits.float()
                hidden = None
            else:
                hidden = decoder(input_ids=xs, attention_mask=ms).last_hidden_state
            for r in range(xs.shape[0]):
                for p0 in range(0, xs.shape[1], positions):
                    logits = (head(hidden[r, p0:p0 + positions]) if hidden is not None
                              else logits_all[r, p0:p0 + positions]).float()
                    yield r0 + r, p0, torch.logsumexp(logits, -1), logits


def score_ids(loaded: Loaded, batch: list[list[int]], deadline: float = math.inf) -> list[list[float]]:
    """Log-probability of every token after the first of each id list, in windows of the
    model's context (each window's first token has no prediction: the same convention
    as the project's evaluation, ``trainer.evaluate_nll``). The log-softmax is gathered
    at the target tokens only, chunk by chunk (bounded memory)."""
    import torch

    windows, owner = [], []
    for i, ids in enumerate(batch):
        for s in range(0, len(ids), loaded.context):
            windows.append(ids[s:s + loaded.context])
            owner.append(i)
    width = max(len(w) for w in windows)
    pad = loaded.tokenizer.pad_token_id or 0
    x = torch.full((len(windows), width), pad, dtype=torch.long)
    mask = torch.zeros_like(x)
    for j, w in enumerate(windows):  # right padding: causal attention never sees it
        x[j, :len(w)] = torch.tensor(w)
        mask[j, :len(w)] = 1
    per_window: list[list[float]] = [[] for _ in windows]
    for j, p0, lse, logits in _logit_chunks(loaded, x, mask, deadline):
        n = len(windows[j])
        hi = min(p0 + logits.shape[0], n - 1)  # predictions for positions p0..hi-1
        if hi <= p0:
            continue
        tgt = x[j, p0 + 1:hi + 1]
        got = logits[:hi - p0].gather(-1, tgt[:, None])[:, 0] - lse[:hi - p0]
        per_window[j].extend(got.tolist())
    out: list[list[float]] = [[] for _ in batch]
    for j, lp in enumerate(per_window):
        out[owner[j]].extend(lp)
    return out


def token_logprobs(loaded: Loaded, ids: list[int], start: int, top: int, deadline: float = math.inf) -> dict:
    """OpenAI ``logprobs`` of ``ids[start:]`` (the first token of a text has none),
    gathered chunk by chunk like ``score_ids``."""
    import torch

    tok = loaded.tokenizer
    x = torch.tensor([ids])
    values: list[float | None] = [None] * len(ids)
    tops: list[dict | None] = [None] * len(ids)
    for _, p0, lse, logits in _logit_chunks(loaded, x, torch.ones_like(x), deadline):
        for q in range(logits.shape[0]):
            p = p0 + q + 1  # the token this position predicts
            if p >= len(ids) or p < start:
                continue
            values[p] = float(logits[q, ids[p]] - lse[q])
            if top:
                v, i = (logits[q] - lse[q]).topk(top)
                tops[p] = {tok.decode([int(a)]): float(b) for b, a in zip(v, i)}
    tokens = [tok.decode([i]) for i in ids[start:]]
    offsets, pos = [], 0
    for t in tokens:
        offsets.append(pos)
        pos += len(t)
    return {"tokens": tokens, "token_logprobs": values[start:], "top_logprobs": tops[start:] if top else None,
            "text_offset": offsets}


def _cut_at_stop(text: str, stop: list[str]) -> tuple[str, bool]:
    cuts = [text.index(s) for s in stop if s in text]
    return (text[:min(cuts)], True) if cuts else (text, False)


class Failed:
    """One request's failure inside a batch: handed back to that request only."""

    def __init__(self, error: BaseException):
        self.error = error


def _unwrap(result):
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


def _registry_metrics():
    """This replica's Prometheus metrics (``GET /metrics``)."""
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

    reg = CollectorRegistry()
    m = {
        "requests": Counter("slmfactory_requests", "requests per domain, route and status",
                            ("domain", "route", "status"), registry=reg),
        "latency": Histogram("slmfactory_latency_seconds", "request latency per domain and route",
                             ("domain", "route"), registry=reg,
                             buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60)),
        "tokens": Counter("slmfactory_tokens", "tokens scored or generated per domain", ("domain", "route"),
                          registry=reg),
        "load": Gauge("slmfactory_model_load_seconds", "seconds the domain's model took to load", ("domain",),
                      registry=reg),
        "cache": Counter("slmfactory_model_cache", "model cache lookups per domain (hit or miss)",
                         ("domain", "result"), registry=reg),
        "queue": Gauge("slmfactory_queue_depth", "requests in flight in this replica, and domain builds and "
                       "fine-tunes queued or running", ("kind",), registry=reg),
    }
    return reg, m


def make_deployment(max_models: int, batch_wait_s: float = 0.005):
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
    from ray import serve

    api = FastAPI(title="slmfactory", docs_url=None, redoc_url=None, openapi_url=None)

    @serve.deployment
    @serve.ingress(api)
    class DomainModels:
        """Every served domain's small model, multiplexed in each replica."""

        async def __init__(self, catalog: dict[str, dict], router: dict | None, limits: dict, preload: bool,
                           instant: dict | None = None, security: dict | None = None):
            # Before anything runs in a second thread (see _import_everything).
            _import_everything()
            import torch

            from slmfactory.platform.config import from_dict
            from slmfactory.serving.auth import Auth, RateLimiter
            from slmfactory.serving.domains import DomainRegistry

            torch.set_num_threads(1)
            self.catalog, self.router, self.limits = catalog, router, Limits(**limits)
            sec = security or {}
            self.auth = Auth(sec.get("api", []), sec.get("admin", []))
            self.rates = RateLimiter(sec.get("rpm", 0.0), sec.get("tpm", 0.0))
            self.timeout = float(sec.get("timeout_s", 60.0))
            self.max_pending = int(sec.get("max_pending", 2))
            # Domains created at run time (POST /v1/domains, `slmfactory specialize`): read
            # from the workdir's registry on a miss, so every replica serves them.
            self.cfg = from_dict(instant["config"]) if instant else None
            self.registry = DomainRegistry(self.cfg.root) if self.cfg is not None else None
            self.instant: dict[str, tuple[int, dict]] = {}   # name -> (entry file mtime_ns, entry)
            self.finetunes: dict[str, Any] = {}              # name -> the queued Ray task's ref
            self.builds = 0                                  # POST /v1/domains in progress here
            # What new domains are built from (generic phases, tokenizer, MiniLM), loaded in
            # the background from the start: a new domain's first POST does not wait for it.
            self.instant_inputs = asyncio.ensure_future(asyncio.to_thread(_instant_inputs, self.cfg)) \
                if self.cfg is not None else None
            self.failed: dict[str, str] = {}
            self.lock = threading.Lock()  # one generate at a time: seeded sampling stays reproducible
            self.minilm = None
            self.in_flight = 0
            self.metrics_registry, self.m = _registry_metrics()
            self.loaded_ids: set[str] = set()
            self._probe: Loaded | None = None
            if preload:  # through the multiplexed loader, so the models sit in its LRU
                for d in list(catalog)[:max_models]:
                    try:
                        await self.get_model(d)
                    except Exception as e:  # noqa: BLE001  (answered 503 for that domain)
                        self.failed[d] = f"{type(e).__name__}: {str(e)[:200]}"

        def count_tokens(self, n: int, domain: str, route: str) -> None:
            if n > 0:
                self.m["tokens"].labels(domain, route).inc(n)

        # -- models ---------------------------------------------------------------------
        @serve.multiplexed(max_num_models_per_replica=max_models)
        async def get_model(self, model_id: str) -> Loaded:
            # A start-up domain's id is its name; a run-time domain's is "name@v<version>",
            # so a swapped model loads under a new id while the old one finishes its requests.
            if model_id in self.catalog:
                loaded = await asyncio.to_thread(_load, self.catalog[model_id]["path"])
            else:
                name, _, version = model_id.rpartition("@v")
                entry = self.instant_entry(name)
                if entry is None or str(entry["version"]) != version:
                    raise FileNotFoundError(f"domain {name!r} version {version} is no longer registered")
                loaded = await asyncio.to_thread(_load, entry["path"])
            self.m["load"].labels(model_id.rpartition("@v")[0] or model_id).set(loaded.load_seconds)
            return loaded

        def instant_entry(self, name: str) -> dict | None:
            """The registry entry of a run-time domain, re-read when its file changed.
            Only a name that passed the one name rule reaches the file system, and only
            names that exist are cached."""
            if self.registry is None or not valid_name(name):
                return None
            try:
                mtime = self.registry.entry_path(name).stat().st_mtime_ns
            except (OSError, ValueError):
                self.instant.pop(name, None)
                return None
            hit = self.instant.get(name)
            if hit is None or hit[0] != mtime:
                entry = self.registry.get(name)
                if entry is None:
                    return None
                hit = self.instant[name] = (mtime, entry)
            return hit[1]

        def served_names(self) -> list[str]:
            return sorted(set(self.catalog) | set(self.registry.names() if self.registry else []))

        async def model_for(self, name: str, text: str) -> tuple[str, Loaded, dict]:
            extra: dict = {}
            if name == AUTO:
                name, extra = await self.route(text)
            model_id = name
            if name not in self.catalog:
                # File I/O off the event loop: a slow or stuck shared filesystem delays this
                # request (until its deadline), never the replica's other requests.
                entry = await asyncio.to_thread(self.instant_entry, name)
                if entry is None:
                    raise ApiError(404, f"model '{name}' does not exist; domains served: "
                                   f"{', '.join(self.served_names())}" + (" and auto" if self.router else ""),
                                   param="model", code="model_not_found")
                model_id = f"{name}@v{entry['version']}"
            self.m["cache"].labels(name, "hit" if model_id in self.loaded_ids else "miss").inc()
            try:
                loaded = await self.get_model(model_id)
            except Exception as e:  # noqa: BLE001
                self.failed[name] = f"{type(e).__name__}: {str(e)[:200]}"
                raise ApiError(503, f"the model of domain '{name}' failed to load ({self.failed[name]}); "
                               "the other domains are served", param="model", code="model_unavailable",
                               type_="service_unavailable")
            self.loaded_ids.add(model_id)
            if len(self.loaded_ids) > 4 * max_models:  # a hint for the hit/miss metric only: bounded
                self.loaded_ids = {model_id}
            self.failed.pop(name, None)
            return name, loaded, extra

        async def route(self, text: str) -> tuple[str, dict]:
            if self.router is None:
                raise ApiError(404, "model 'auto' needs the run's clustering (run `slmfactory cluster`)",
                               param="model", code="model_not_found")
            import numpy as np

            from slmfactory.data.clusters import nearest_centroid
            from slmfactory.data.embed import encode

            if self.minilm is None:
                self.minilm = await asyncio.to_thread(_minilm)
            emb = await asyncio.to_thread(encode, self.minilm, [text], self.router["batch_size"])
            c = int(nearest_centroid(emb, np.asarray(self.router["centroids"], dtype=np.float32))[0])
            shares = {d: h[c] for d, h in self.router["histograms"].items() if d in self.catalog}
            domain = max(sorted(shares), key=lambda d: shares[d])
            return domain, {"routed_to": domain, "cluster": c, "share": shares[domain]}

        # -- batched work ---------------------------------------------------------------
        @serve.batch(max_batch_size=16, batch_wait_timeout_s=batch_wait_s)
        async def score_batch(self, items: list[tuple[str, Loaded, list[int], float]]) -> list:
            out: list = [None] * len(items)
            for domain in {d for d, _, _, _ in items}:
                idx = [i for i, (d, _, _, _) in enumerate(items) if d == domain]
                await self._isolated(out, idx, lambda ix: score_ids(
                    items[ix[0]][1], [items[i][2] for i in ix], max(items[i][3] for i in ix)))
            return out

        @serve.batch(max_batch_size=8, batch_wait_timeout_s=batch_wait_s)
        async def generate_batch(self, jobs: list[tuple[str, Loaded, list[int], CompletionRequest, float]]) -> list:
            """One left-padded ``generate`` per group of jobs with the same domain and
            settings (unseeded, n = 1); a seeded or n > 1 job runs alone."""
            groups: dict[tuple, list[int]] = {}
            for i, (domain, _, _, c, _) in enumerate(jobs):
                key = (domain, c.max_tokens, c.temperature, c.top_p, tuple(c.stop)) if c.seed is None and c.n == 1 \
                    else ("alone", i)
                groups.setdefault(key, []).append(i)
            out: list = [None] * len(jobs)
            for idx in groups.values():
                await self._isolated(out, idx, lambda ix: self._generate(
                    jobs[ix[0]][1], [jobs[i][2] for i in ix], jobs[ix[0]][3], max(jobs[i][4] for i in ix)))
            for i, (_, _, _, _, deadline) in enumerate(jobs):
                if not isinstance(out[i], Failed) and time.monotonic() > deadline:
                    out[i] = Failed(Deadline())
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

        def _generate(self, loaded: Loaded, prompts: list[list[int]], c: CompletionRequest, deadline: float,
                      streamer=None, cancel: threading.Event | None = None) -> list[list[dict]]:
            import torch
            from transformers import StoppingCriteriaList

            tok = loaded.tokenizer
            width = max(len(p) for p in prompts)
            pad = tok.pad_token_id or 0
            x = torch.full((len(prompts), width), pad, dtype=torch.long)
            mask = torch.zeros_like(x)
            for j, p in enumerate(prompts):  # left padding: generation continues every row's end
                x[j, width - len(p):] = torch.tensor(p)
                mask[j, width - len(p):] = 1
            kwargs = dict(max_new_tokens=c.max_tokens, num_return_sequences=c.n, pad_token_id=pad,
                          eos_token_id=tok.eos_token_id,
                          stopping_criteria=StoppingCriteriaList([_halt(deadline, cancel)]))
            if c.temperature > 0:
                kwargs.update(do_sample=True, temperature=c.temperature, top_p=c.top_p)
            else:
                kwargs.update(do_sample=False)
            if c.stop:
                kwargs.update(stop_strings=c.stop, tokenizer=tok)
            # The lock is waited for only until the deadline: a request never queues forever.
            if not self.lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
                raise Deadline()
            try:
                with torch.no_grad():
                    if c.seed is not None:
                        torch.manual_seed(c.seed)
                    seqs = loaded.model.generate(input_ids=x, attention_mask=mask, streamer=streamer, **kwargs)
            finally:
                self.lock.release()
            if time.monotonic() > deadline:
                raise Deadline()
            out: list[list[dict]] = [[] for _ in prompts]
            for r in range(seqs.shape[0]):
                j = r // c.n
                new = seqs[r, width:].tolist()
                ended = tok.eos_token_id in new
                if ended:
                    new = new[:new.index(tok.eos_token_id)]
                while new and new[-1] == pad:
                    new.pop()
                text, stopped = _cut_at_stop(tok.decode(new), c.stop)
                out[j].append({"ids": new, "text": text, "finish": "stop" if (ended or stopped) else "length"})
            return out

        # -- request plumbing -----------------------------------------------------------
        async def _respond(self, route: str, request: Request, schema, handler, max_bytes: int | None = None,
                           admin: bool = False):
            """Authenticate, rate-limit, read the body within its bound, validate it with
            ``schema``, run ``handler(req, caller, deadline)`` within the deadline; every
            failure is an OpenAI error body, every outcome a metric."""
            t0 = time.perf_counter()
            deadline = time.monotonic() + self.timeout
            domain, status = "-", "200"
            self.in_flight += 1
            try:
                caller = self._caller(request, admin)
                if schema is None:
                    req = None
                else:
                    raw = await asyncio.wait_for(read_body(request, max_bytes or self.limits.max_request_bytes),
                                                 self.timeout)
                    req = validate(schema, raw, self.limits)
                domain, response = await asyncio.wait_for(handler(req, caller, deadline),
                                                          max(0.0, deadline - time.monotonic()))
                return response
            except (asyncio.TimeoutError, Deadline):
                status = "408"
                return JSONResponse(ApiError(408, f"the request did not finish within its deadline of "
                                             f"{self.timeout:g}s (serving.request_timeout_s)",
                                             code="request_timeout").body(), status_code=408)
            except ApiError as e:
                status = str(e.status)
                return JSONResponse(e.body(), status_code=e.status, headers=e.headers)
            except Exception as e:  # noqa: BLE001  (a bug or a broken model: the replica keeps serving)
                status = "500"
                return JSONResponse(ApiError(500, f"internal error: {type(e).__name__}: {str(e)[:300]}",
                                             type_="server_error", code="internal_error").body(), status_code=500)
            finally:
                self.in_flight -= 1
                self.m["requests"].labels(domain, route, status).inc()
                self.m["latency"].labels(domain, route).observe(time.perf_counter() - t0)

        def _caller(self, request: Request, admin: bool):
            caller = self.auth.caller(request.headers.get("authorization"))
            if caller is None:
                raise ApiError(401, "a valid API key is required: send 'Authorization: Bearer KEY'",
                               code="invalid_api_key", type_="authentication_error",
                               headers={"WWW-Authenticate": "Bearer"})
            if admin and not caller.admin:
                raise ApiError(403, "this route needs an admin key (serving.admin_keys_file)",
                               code="admin_key_required", type_="permission_error")
            self._charge(caller, "requests", 1)
            return caller

        def _charge(self, caller, kind: str, amount: float) -> None:
            wait = self.rates.charge(caller.key, kind, amount)
            if wait:
                raise ApiError(429, f"rate limit of this key exceeded ({kind} per minute); retry after "
                               f"{wait:.0f}s", code="rate_limit_exceeded", type_="rate_limit_error",
                               headers={"Retry-After": str(int(wait))})

        # -- routes ---------------------------------------------------------------------
        @api.get("/healthz")
        async def healthz(self):
            try:
                await self.check_health()
            except Exception as e:  # noqa: BLE001
                return JSONResponse({"status": "unhealthy", "reason": str(e)[:300], "failed": self.failed},
                                    status_code=503)
            return {"status": "ok", "domains": sorted(self.catalog), "failed": self.failed}

        async def check_health(self):
            """Ray Serve's health check (and ``/healthz``): a one-token forward pass of a
            loaded model, through the same thread pool and lock as requests, within
            ``HEALTH_TIMEOUT_S``: a replica wedged on its work is reported and replaced."""
            import torch

            def forward():
                if not self.lock.acquire(timeout=HEALTH_TIMEOUT_S):
                    raise RuntimeError("the generation lock is held past the health deadline")
                try:
                    with torch.no_grad():
                        model = self._probe.model if self._probe is not None else None
                        if model is not None:
                            model(input_ids=torch.zeros((1, 1), dtype=torch.long))
                finally:
                    self.lock.release()

            if self._probe is None and self.catalog:
                try:
                    self._probe = await asyncio.wait_for(asyncio.to_thread(_load, next(iter(self.catalog.values()))
                                                                           ["path"]), HEALTH_TIMEOUT_S * 3)
                except Exception:  # noqa: BLE001  (a broken first folder: probe with no model)
                    self._probe = None
            try:
                await asyncio.wait_for(asyncio.to_thread(forward), HEALTH_TIMEOUT_S)
            except asyncio.TimeoutError:
                raise RuntimeError(f"a one-token forward pass did not finish within {HEALTH_TIMEOUT_S:g}s") from None

        @api.get("/metrics")
        async def metrics(self):
            from prometheus_client import generate_latest

            self.m["queue"].labels("requests").set(self.in_flight)
            self.m["queue"].labels("domain_jobs").set(self._pending())
            return PlainTextResponse(generate_latest(self.metrics_registry).decode(),
                                     media_type="text/plain; version=0.0.4")

        @api.get("/v1/models")
        async def models(self, request: Request):
            async def handle(_req, _caller, _deadline):
                entries = await asyncio.to_thread(
                    lambda: {d: self.catalog.get(d) or self.instant_entry(d) for d in self.served_names()})
                data = [{"id": d, "object": "model", "created": 0, "owned_by": "slmfactory",
                         "strategy": e["strategy"], "params": e["params"], "test_ppl": e["test_ppl"]}
                        for d, e in entries.items() if e is not None]
                if self.router:
                    data.append({"id": AUTO, "object": "model", "created": 0, "owned_by": "slmfactory"})
                return "-", {"object": "list", "data": data}

            return await self._respond("models", request, None, handle)

        def _pending(self) -> int:
            import ray

            done = [n for n, ref in self.finetunes.items() if ray.wait([ref], timeout=0)[0]]
            for n in done:
                self.finetunes.pop(n)
            return self.builds + len(self.finetunes)

        @api.post("/v1/domains")
        async def create_domain(self, request: Request):
            """A new domain from a handful of its documents: the instant model is served under
            ``name`` when this returns (201); ``finetune_budget`` queues a Ray Train
            fine-tuning that replaces it when done."""
            async def handle(req: DomainRequest, caller, deadline):
                from slmfactory.models.instant import GenericPhaseMissing
                from slmfactory.platform.errors import DataError
                from slmfactory.serving import domains as reg

                if self.cfg is None:
                    raise ApiError(503, "this app was started without a run config: no run-time domains",
                                   code="instant_unavailable", type_="service_unavailable")
                if req.name in self.catalog or self.registry.exists(req.name):
                    raise ApiError(409, f"domain '{req.name}' already exists", param="name", code="name_exists")
                if req.finetune_budget is not None:
                    step = self.cfg.finetune.batch_size * self.cfg.data.seq_len
                    if req.finetune_budget < step:
                        raise ApiError(400, f"'finetune_budget' must be at least one step of {step} tokens, got "
                                       f"{req.finetune_budget}", param="finetune_budget", code="invalid_value")
                if self._pending() >= self.max_pending:
                    raise ApiError(429, f"{self._pending()} domain builds and fine-tunes are queued or running "
                                   f"(serving.max_pending_builds); retry later", code="queue_full",
                                   type_="rate_limit_error", headers={"Retry-After": "30"})
                self.builds += 1
                try:
                    if self.instant_inputs.done() and self.instant_inputs.exception() is not None:
                        # Not trained at start-up (503 then): look again, they may be now.
                        self.instant_inputs = asyncio.ensure_future(asyncio.to_thread(_instant_inputs, self.cfg))
                    families, tokenizer, minilm = await asyncio.shield(self.instant_inputs)
                    self.minilm = self.minilm or minilm
                    entry, built = await asyncio.to_thread(
                        reg.create_domain, self.cfg, req.name, req.documents, families, embedder=minilm,
                        tokenizer=tokenizer, taken=lambda n: n in self.catalog, limited=True)
                except reg.NameTaken as e:
                    raise ApiError(409, str(e), param="name", code="name_exists") from None
                except reg.RegistryFull as e:
                    raise ApiError(409, str(e).split(": ", 1)[-1], param="name", code="max_domains") from None
                except GenericPhaseMissing as e:
                    raise ApiError(503, str(e), code="instant_unavailable", type_="service_unavailable") from None
                except DataError as e:
                    param = str(e).split(":", 1)[0] if str(e).split(":", 1)[0] in ("name", "documents") else None
                    raise ApiError(400, str(e), param=param or "documents", code="invalid_value") from None
                finally:
                    self.builds -= 1
                reg.register_async(self.cfg, req.name, entry)
                if req.finetune_budget is not None:
                    import ray

                    # "queued" is written before the task exists: a fast task's "running" or
                    # "failed" can only come after it, never be overwritten by it.
                    entry = self.registry.update(req.name, finetune={"status": "queued",
                                                                     "budget_tokens": req.finetune_budget})
                    task = ray.remote(num_cpus=0, max_retries=0)(reg.finetune_and_swap)
                    self.finetunes[req.name] = task.remote(self.cfg.to_tree(), req.name, req.finetune_budget)
                self.count_tokens(int(len(built.docs.train) + len(built.docs.heldout)), req.name, "domains")
                return req.name, JSONResponse(_domain_view(entry), status_code=201)

            return await self._respond("domains", request, DomainRequest, handle,
                                       max_bytes=self.limits.max_domain_request_bytes, admin=True)

        def _domain_or_404(self, name: str) -> dict:
            if not valid_name(name):
                raise ApiError(400, "'name' must be 1-64 letters, digits, '_', '.' or '-' starting with a letter or "
                               "digit", param="name", code="invalid_value")
            entry = self.instant_entry(name) if name not in self.catalog else None
            if entry is None:
                raise ApiError(404, f"'{name}' is " + ("a start-up domain, not a run-time one"
                                                       if name in self.catalog else "not a run-time domain"),
                               param="name", code="model_not_found")
            return entry

        @api.get("/v1/domains/{name}")
        async def domain_status(self, name: str, request: Request):
            async def handle(_req, _caller, _deadline):
                import ray

                from slmfactory.serving.domains import finetune_status

                entry = await asyncio.to_thread(self._domain_or_404, name)
                ref = self.finetunes.get(name)
                ft = entry.get("finetune") or {}
                if ref is not None and ft.get("status") == "queued" and ray.wait([ref], timeout=0)[0]:
                    try:
                        ray.get(ref)
                    except Exception as e:  # noqa: BLE001  (the task died before it started)
                        entry = self.registry.update(name, finetune={**ft, "status": "failed",
                                                                     "error": f"{type(e).__name__}"})
                entry = await asyncio.to_thread(finetune_status, self.registry, name, entry)
                return name, _domain_view(entry)

            return await self._respond("domains", request, None, handle)

        @api.delete("/v1/domains/{name}")
        async def delete_domain(self, name: str, request: Request):
            async def handle(_req, _caller, _deadline):
                if name in self.catalog:
                    raise ApiError(409, f"'{name}' is a start-up domain (its model folder is the run's); only "
                                   "run-time domains are deleted", param="name", code="not_deletable")
                self._domain_or_404(name)
                self._pending()  # drops finished fine-tunes from self.finetunes
                if self.registry.finetuning(name) or name in self.finetunes:
                    raise ApiError(409, f"domain '{name}' is being fine-tuned; delete it when that ends",
                                   param="name", code="busy")
                entry = await asyncio.to_thread(self.registry.delete, name)
                self.instant.pop(name, None)
                return name, {"id": name, "object": "domain", "deleted": entry is not None}

            return await self._respond("domains", request, None, handle, admin=True)

        @api.post("/v1/score")
        async def score(self, request: Request):
            async def handle(req: ScoreRequest, caller, deadline):
                domain, loaded, extra = await self.model_for(req.model, req.inputs[0])
                ids = [loaded.tokenizer(t, add_special_tokens=False)["input_ids"] for t in req.inputs]
                for i, x in enumerate(ids):
                    if len(x) < 2:
                        raise ApiError(400, f"input[{i}] has {len(x)} token(s); scoring needs at least 2",
                                       param="input", code="input_too_short")
                    if len(x) > self.limits.max_prompt_tokens:
                        raise ApiError(400, f"input[{i}] has {len(x)} tokens; at most {self.limits.max_prompt_tokens}",
                                       param="input", code="input_too_long")
                self._charge(caller, "tokens", sum(len(x) for x in ids))
                scored = [_unwrap(r) for r in
                          await asyncio.gather(*(self.score_batch((domain, loaded, x, deadline)) for x in ids))]
                data = []
                for i, (x, lp) in enumerate(zip(ids, scored)):
                    nll = -sum(lp) / len(lp)
                    data.append({"index": i, "tokens": [loaded.tokenizer.decode([t]) for t in x], "token_ids": x,
                                 "token_logprobs": _with_firsts(x, lp, loaded.context),
                                 "num_scored": len(lp), "nll": nll, "perplexity": math.exp(nll)})
                self.count_tokens(sum(len(x) for x in ids), domain, "score")
                return domain, {"object": "list", "model": domain, "data": data, **({"slmfactory": extra} if extra else {})}

            return await self._respond("score", request, ScoreRequest, handle)

        def _check_stop(self, loaded: Loaded, stop: list[str]) -> None:
            """A stop string ``generate`` cannot take (one the vocabulary cannot form) is a
            400 naming ``stop``, found before generation rather than inside it."""
            if not stop:
                return
            from transformers.generation.stopping_criteria import StopStringCriteria

            try:
                StopStringCriteria(loaded.tokenizer, stop)
            except Exception as e:  # noqa: BLE001
                raise ApiError(400, f"'stop': the model's vocabulary cannot form {stop!r} ({str(e)[:120]})",
                               param="stop", code="invalid_value") from None

        @api.post("/v1/completions")
        async def completions(self, request: Request):
            async def handle(c: CompletionRequest, caller, deadline):
                domain, loaded, extra = await self.model_for(c.model, c.prompts[0])
                ids = [loaded.tokenizer(p, add_special_tokens=False)["input_ids"] for p in c.prompts]
                for i, x in enumerate(ids):
                    if len(x) + c.max_tokens > min(loaded.context, self.limits.max_prompt_tokens + c.max_tokens):
                        raise ApiError(400, f"prompt[{i}] has {len(x)} tokens; with max_tokens={c.max_tokens} it "
                                       f"exceeds the model's context of {loaded.context} tokens",
                                       param="max_tokens", code="context_length_exceeded")
                self._check_stop(loaded, c.stop)
                self._charge(caller, "tokens", sum(len(x) for x in ids) + c.max_tokens * c.n * len(ids))
                cid = f"cmpl-{uuid.uuid4().hex[:24]}"
                if c.stream:
                    return domain, StreamingResponse(self._stream(cid, domain, loaded, ids[0], c, extra, deadline),
                                                     media_type="text/event-stream")
                results = [_unwrap(r) for r in
                           await asyncio.gather(*(self.generate_batch((domain, loaded, x, c, deadline)) for x in ids))]
                choices, completion_tokens = [], 0
                for i, (x, outs) in enumerate(zip(ids, results)):
                    for out in outs:
                        completion_tokens += len(out["ids"])
                        text = (c.prompts[i] if c.echo else "") + out["text"]
                        lp = None
                        if c.logprobs is not None:
                            full = x + out["ids"]
                            lp = await asyncio.to_thread(token_logprobs, loaded, full, 0 if c.echo else len(x),
                                                         c.logprobs, deadline)
                        choices.append({"text": text, "index": len(choices), "logprobs": lp,
                                        "finish_reason": out["finish"]})
                prompt_tokens = sum(len(x) for x in ids)
                self.count_tokens(completion_tokens, domain, "completions")
                return domain, {"id": cid, "object": "text_completion", "created": int(time.time()), "model": domain,
                                "choices": choices,
                                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                          "total_tokens": prompt_tokens + completion_tokens},
                                **({"slmfactory": extra} if extra else {})}

            return await self._respond("completions", request, CompletionRequest, handle)

        async def _stream(self, cid: str, domain: str, loaded: Loaded, ids: list[int], c: CompletionRequest,
                          extra: dict, deadline: float):
            """Server-sent events: one chunk per generated piece of text, then ``[DONE]``.
            Every stream ends: if generation raises or the deadline passes, an OpenAI error
            event comes before ``[DONE]``; a client that goes away stops its generation."""
            from transformers.generation.streamers import BaseStreamer

            loop = asyncio.get_running_loop()
            queue: asyncio.Queue = asyncio.Queue()
            cancel = threading.Event()

            class Pipe(BaseStreamer):
                first = True

                def put(self, value):
                    if self.first:  # the prompt comes first; only new tokens are streamed
                        self.first = False
                        return
                    loop.call_soon_threadsafe(queue.put_nowait, value.reshape(-1).tolist())

                def end(self):
                    loop.call_soon_threadsafe(queue.put_nowait, None)

            def chunk(text: str, finish: str | None) -> str:
                return "data: " + json.dumps({"id": cid, "object": "text_completion", "created": int(time.time()),
                                              "model": domain, "choices": [{"text": text, "index": 0, "logprobs": None,
                                                                            "finish_reason": finish}],
                                              **({"slmfactory": extra} if extra else {})}) + "\n\n"

            def error_event(e: ApiError) -> str:
                self.m["requests"].labels(domain, "completions", f"stream_{e.status}").inc()
                return "data: " + json.dumps(e.body()) + "\n\n"

            task = asyncio.ensure_future(asyncio.to_thread(self._generate, loaded, [ids], c, deadline, Pipe(), cancel))
            try:
                if c.echo:
                    yield chunk(c.prompts[0], None)
                new: list[int] = []
                sent = ""
                getter = None
                while True:
                    getter = getter or asyncio.ensure_future(queue.get())
                    done, _ = await asyncio.wait({getter, task}, timeout=max(0.0, deadline - time.monotonic()) + 1.0,
                                                 return_when=asyncio.FIRST_COMPLETED)
                    if getter in done:
                        item, getter = getter.result(), None
                        if item is None:
                            break
                        new.extend(t for t in item if t != loaded.tokenizer.eos_token_id)
                        text, _ = _cut_at_stop(loaded.tokenizer.decode(new), c.stop)
                        if len(text) > len(sent) and not text.endswith("\ufffd"):  # whole characters only
                            yield chunk(text[len(sent):], None)
                            sent = text
                        continue
                    if task in done:
                        break  # generation ended (or raised) without its end-of-stream
                    raise Deadline()  # nothing at all within the deadline
                if getter is not None:
                    getter.cancel()
                final = (await task)[0][0]
                if len(final["text"]) > len(sent):
                    yield chunk(final["text"][len(sent):], None)
                yield chunk("", final["finish"])
                self.count_tokens(len(final["ids"]), domain, "completions")
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

    return DomainModels


def _instant_inputs(cfg):
    """What a replica builds new domains from: the trained generic phases (never trained
    here), the run's tokenizer and MiniLM."""
    from slmfactory.models.instant import generic_families
    from slmfactory.data.tokenizer import ensure_tokenizer, load_tokenizer

    families = generic_families(cfg, train=False)
    return families, load_tokenizer(ensure_tokenizer(cfg)), _minilm()


def _minilm():
    from slmfactory.models.instant import CONSTRUCTION_LOCK
    from slmfactory.data.embed import load_minilm

    with CONSTRUCTION_LOCK:  # a from_pretrained inside (see CONSTRUCTION_LOCK)
        return load_minilm("cpu")


def _domain_view(entry: dict) -> dict:
    """A run-time domain as the API shows it (no file paths beyond the served folder)."""
    inst = entry.get("instant") or {}
    return {"id": entry["name"], "object": "domain", "version": entry["version"], "strategy": entry["strategy"],
            "params": entry["params"], "heldout_ppl": entry["test_ppl"], "documents": inst.get("documents"),
            "chosen": inst.get("chosen"), "histogram": inst.get("histogram"),
            "candidates": {r: {"heldout_ppl": c["heldout_ppl"], "seconds": c["seconds"], "flops": c["flops"]}
                           for r, c in (inst.get("candidates") or {}).items()},
            "timings": inst.get("timings"), "finetune": entry.get("finetune"), "mlflow": entry.get("mlflow")}


def _with_firsts(ids: list[int], logprobs: list[float], context: int) -> list[float | None]:
    """Per-token log-probs aligned with ``ids``: None where a context window starts."""
    out: list[float | None] = []
    it = iter(logprobs)
    for p in range(len(ids)):
        out.append(None if p % context == 0 else next(it))
    return out


def build_app(args: dict):
    """The Serve application. ``args``: ``config`` (a recipe), ``set`` (overrides), and
    either ``models`` (a folder of exported models) or ``from_mlflow`` (a sweep's
    experiment), optionally ``max_params`` (inference-size cap). API keys are read here
    (files, environment) and only their digests reach the replicas."""
    from slmfactory.platform.config import load_config, parse_overrides
    from slmfactory.platform.errors import ConfigError
    from slmfactory.serving import catalog as cat
    from slmfactory.serving.auth import load_keys

    cfg = load_config(args.get("config"), parse_overrides(list(args.get("set") or [])))
    s = cfg.serving
    cap = float(args.get("max_params") or math.inf)
    if args.get("models") and args.get("from_mlflow"):
        raise ConfigError("serve: give --models or --from-mlflow, not both")
    if args.get("models"):
        entries = cat.from_folder(args["models"], cap)
    else:
        from slmfactory.trial import experiment_name

        experiment = args.get("from_mlflow") or experiment_name(cfg)
        entries = cat.from_mlflow(cfg.tracking_uri, experiment, cap)
    catalog = {d: {"path": e.path, "strategy": e.strategy, "params": e.params, "test_ppl": e.test_ppl}
               for d, e in entries.items()}
    router = cat.router_data(cfg, list(catalog))
    limits = dataclasses.asdict(Limits.from_config(s))
    api_keys, admin_keys = load_keys(cfg)
    security = {"api": api_keys, "admin": admin_keys, "rpm": s.rate_limit_rpm, "tpm": s.rate_limit_tpm,
                "timeout_s": s.request_timeout_s, "max_pending": s.max_pending_builds}
    deployment = make_deployment(s.max_models_per_replica, s.batch_wait_s).options(
        ray_actor_options={"num_cpus": s.replica_cpus},
        autoscaling_config={"min_replicas": s.min_replicas, "max_replicas": s.max_replicas,
                            "target_ongoing_requests": s.target_ongoing_requests},
        max_ongoing_requests=s.max_ongoing_requests,
        # check_health runs a forward pass with its own deadline; Ray's must be longer.
        health_check_period_s=10, health_check_timeout_s=3 * HEALTH_TIMEOUT_S)
    return deployment.bind(catalog, router, limits, s.preload, {"config": cfg.to_tree()}, security)
