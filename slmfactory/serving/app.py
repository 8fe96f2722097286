"""``slmfactory serve``: the specialised small models of every domain behind one Ray Serve
deployment, OpenAI-compatible.

- One deployment multiplexes the per-domain models (``@serve.multiplexed``: an LRU of at
  most ``serving.max_models_per_replica`` per replica; ``serving.preload`` loads them at
  start). Scoring and non-streaming generation go through ``@serve.batch``: requests of
  one domain are scored in one padded forward pass; greedy/sampled completions with the
  same settings are generated in one left-padded ``generate`` call.
- Routes: ``GET /v1/models``, ``POST /v1/completions`` (streaming as server-sent events
  ending in ``[DONE]``), ``POST /v1/score`` (per-token log-probs and perplexity),
  ``GET /healthz``; request counts, latency and tokens per domain as Ray Serve metrics
  (Prometheus).
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
import json
import math
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

from fastapi import Request

from slmfactory.serving.api import (
    ApiError, Completion, Limits, parse_completion, parse_domain, parse_json, parse_score)

AUTO = "auto"


@dataclass
class Loaded:
    model: Any
    tokenizer: Any
    context: int


def _load(path: str) -> Loaded:
    import torch
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = PreTrainedTokenizerFast.from_pretrained(path)
    return Loaded(model, tok, int(model.config.max_position_embeddings))


def score_ids(loaded: Loaded, batch: list[list[int]]) -> list[list[float]]:
    """Log-probability of every token after the first of each id list, in windows of the
    model's context (each window's first token has no prediction: the same convention
    as the project's evaluation, ``trainer.evaluate_nll``). One padded forward pass."""
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
    with torch.no_grad():
        logp = torch.log_softmax(loaded.model(input_ids=x, attention_mask=mask).logits.float(), -1)  # (W, T, V)
    out: list[list[float]] = [[] for _ in batch]
    for j, w in enumerate(windows):
        got = logp[j, torch.arange(len(w) - 1), x[j, 1:len(w)]]
        out[owner[j]].extend(got.tolist())
    return out


def token_logprobs(loaded: Loaded, ids: list[int], start: int, top: int) -> dict:
    """OpenAI ``logprobs`` of ``ids[start:]`` (the first token of a text has none)."""
    import torch

    with torch.no_grad():
        logp = torch.log_softmax(loaded.model(input_ids=torch.tensor([ids])).logits[0].float(), -1)  # (T, V)
    tok = loaded.tokenizer
    tokens = [tok.decode([i]) for i in ids[start:]]
    values = [None if p == 0 else float(logp[p - 1, ids[p]]) for p in range(start, len(ids))]
    tops = None
    if top:
        tops = [None if p == 0 else {tok.decode([int(i)]): float(v) for v, i in zip(*logp[p - 1].topk(top))}
                for p in range(start, len(ids))]
    offsets, pos = [], 0
    for t in tokens:
        offsets.append(pos)
        pos += len(t)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


def _cut_at_stop(text: str, stop: list[str]) -> tuple[str, bool]:
    cuts = [text.index(s) for s in stop if s in text]
    return (text[:min(cuts)], True) if cuts else (text, False)


def make_deployment(max_models: int):
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, StreamingResponse
    from ray import serve
    from ray.serve import metrics

    api = FastAPI(title="slmfactory", docs_url=None, redoc_url=None)

    @serve.deployment
    @serve.ingress(api)
    class DomainModels:
        """Every served domain's small model, multiplexed in each replica."""

        async def __init__(self, catalog: dict[str, dict], router: dict | None, limits: dict, preload: bool,
                           instant: dict | None = None):
            import torch

            from slmfactory.platform.config import from_dict
            from slmfactory.serving.domains import DomainRegistry

            torch.set_num_threads(1)
            self.catalog, self.router, self.limits = catalog, router, Limits(**limits)
            # Domains created at run time (POST /v1/domains, `slmfactory specialize`): read
            # from the workdir's registry on a miss, so every replica serves them.
            self.cfg = from_dict(instant["config"]) if instant else None
            self.registry = DomainRegistry(self.cfg.root) if self.cfg is not None else None
            self.instant: dict[str, tuple[int, dict]] = {}   # name -> (entry file mtime_ns, entry)
            self.finetunes: dict[str, Any] = {}              # name -> the queued Ray task's ref
            # What new domains are built from (generic phases, tokenizer, MiniLM), loaded in
            # the background from the start: a new domain's first POST does not wait for it.
            self.instant_inputs = asyncio.ensure_future(asyncio.to_thread(_instant_inputs, self.cfg)) \
                if self.cfg is not None else None
            self.failed: dict[str, str] = {}
            self.lock = threading.Lock()  # one generate at a time: seeded sampling stays reproducible
            self.minilm = None
            self.requests = metrics.Counter("slmfactory_requests", "requests per domain, route and status",
                                            tag_keys=("domain", "route", "status"))
            self.latency = metrics.Histogram("slmfactory_latency_ms", "request latency per domain",
                                             boundaries=[5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000],
                                             tag_keys=("domain", "route"))
            self.tokens = metrics.Counter("slmfactory_tokens", "tokens scored or generated per domain",
                                          tag_keys=("domain", "route"))
            if preload:  # through the multiplexed loader, so the models sit in its LRU
                for d in list(catalog)[:max_models]:
                    try:
                        await self.get_model(d)
                    except Exception as e:  # noqa: BLE001  (answered 503 for that domain)
                        self.failed[d] = f"{type(e).__name__}: {str(e)[:200]}"

        def count_tokens(self, n: int, domain: str, route: str) -> None:
            # Ray's Counter.inc rejects 0, and a completion may be empty (eos first): an
            # empty answer is a 200, not a 500 from the metrics.
            if n > 0:
                self.tokens.inc(n, tags={"domain": domain, "route": route})

        # -- models ---------------------------------------------------------------------
        @serve.multiplexed(max_num_models_per_replica=max_models)
        async def get_model(self, model_id: str) -> Loaded:
            # A start-up domain's id is its name; a run-time domain's is "name@v<version>",
            # so a swapped model loads under a new id while the old one finishes its requests.
            if model_id in self.catalog:
                return await asyncio.to_thread(_load, self.catalog[model_id]["path"])
            name, _, version = model_id.rpartition("@v")
            entry = self.instant_entry(name)
            if entry is None or str(entry["version"]) != version:
                raise FileNotFoundError(f"domain {name!r} version {version} is no longer registered")
            return await asyncio.to_thread(_load, entry["path"])

        def instant_entry(self, name: str) -> dict | None:
            """The registry entry of a run-time domain, re-read when its file changed."""
            if self.registry is None:
                return None
            try:
                mtime = self.registry.entry_path(name).stat().st_mtime_ns
            except (OSError, ValueError):
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
                entry = self.instant_entry(name)
                if entry is None:
                    raise ApiError(404, f"model '{name}' does not exist; domains served: "
                                   f"{', '.join(self.served_names())}" + (" and auto" if self.router else ""),
                                   param="model", code="model_not_found")
                model_id = f"{name}@v{entry['version']}"
            try:
                loaded = await self.get_model(model_id)
            except Exception as e:  # noqa: BLE001
                self.failed[name] = f"{type(e).__name__}: {str(e)[:200]}"
                raise ApiError(503, f"the model of domain '{name}' failed to load ({self.failed[name]}); "
                               "the other domains are served", param="model", code="model_unavailable",
                               type_="service_unavailable")
            self.failed.pop(name, None)
            return name, loaded, extra

        async def route(self, text: str) -> tuple[str, dict]:
            if self.router is None:
                raise ApiError(404, "model 'auto' needs the run's clustering (run `slmfactory cluster`)",
                               param="model", code="model_not_found")
            import numpy as np

            from slmfactory.platform.clusters import nearest_centroid
            from slmfactory.platform.embed import encode, load_minilm

            if self.minilm is None:
                self.minilm = await asyncio.to_thread(load_minilm, "cpu")
            emb = await asyncio.to_thread(encode, self.minilm, [text], self.router["batch_size"])
            c = int(nearest_centroid(emb, np.asarray(self.router["centroids"], dtype=np.float32))[0])
            shares = {d: h[c] for d, h in self.router["histograms"].items() if d in self.catalog}
            domain = max(sorted(shares), key=lambda d: shares[d])
            return domain, {"routed_to": domain, "cluster": c, "share": shares[domain]}

        # -- batched work ---------------------------------------------------------------
        @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
        async def score_batch(self, items: list[tuple[str, Loaded, list[int]]]) -> list[list[float]]:
            out: list[list[float] | None] = [None] * len(items)
            for domain in {d for d, _, _ in items}:
                idx = [i for i, (d, _, _) in enumerate(items) if d == domain]
                got = await asyncio.to_thread(score_ids, items[idx[0]][1], [items[i][2] for i in idx])
                for i, g in zip(idx, got):
                    out[i] = g
            return out

        @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
        async def generate_batch(self, jobs: list[tuple[str, Loaded, list[int], Completion]]) -> list[list[dict]]:
            """One left-padded ``generate`` per group of jobs with the same domain and
            settings (unseeded, n = 1); a seeded or n > 1 job runs alone."""
            groups: dict[tuple, list[int]] = {}
            for i, (domain, _, _, c) in enumerate(jobs):
                key = (domain, c.max_tokens, c.temperature, c.top_p, tuple(c.stop)) if c.seed is None and c.n == 1 \
                    else ("alone", i)
                groups.setdefault(key, []).append(i)
            out: list[list[dict]] = [[] for _ in jobs]
            for idx in groups.values():
                got = await asyncio.to_thread(self._generate, jobs[idx[0]][1], [jobs[i][2] for i in idx],
                                              jobs[idx[0]][3])
                for i, g in zip(idx, got):
                    out[i] = g
            return out

        def _generate(self, loaded: Loaded, prompts: list[list[int]], c: Completion, streamer=None) -> list[list[dict]]:
            import torch

            tok = loaded.tokenizer
            width = max(len(p) for p in prompts)
            pad = tok.pad_token_id or 0
            x = torch.full((len(prompts), width), pad, dtype=torch.long)
            mask = torch.zeros_like(x)
            for j, p in enumerate(prompts):  # left padding: generation continues every row's end
                x[j, width - len(p):] = torch.tensor(p)
                mask[j, width - len(p):] = 1
            kwargs = dict(max_new_tokens=c.max_tokens, num_return_sequences=c.n, pad_token_id=pad,
                          eos_token_id=tok.eos_token_id)
            if c.temperature > 0:
                kwargs.update(do_sample=True, temperature=c.temperature, top_p=c.top_p)
            else:
                kwargs.update(do_sample=False)
            if c.stop:
                kwargs.update(stop_strings=c.stop, tokenizer=tok)
            with self.lock, torch.no_grad():
                if c.seed is not None:
                    torch.manual_seed(c.seed)
                seqs = loaded.model.generate(input_ids=x, attention_mask=mask, streamer=streamer, **kwargs)
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

        # -- routes ---------------------------------------------------------------------
        async def _respond(self, route: str, request: Request, handler, max_bytes: int | None = None):
            t0 = time.perf_counter()
            domain, status = "-", "200"
            limits = self.limits if max_bytes is None else Limits(**{**self.limits.__dict__,
                                                                     "max_request_bytes": max_bytes})
            try:
                declared = int(request.headers.get("content-length") or 0)
                if declared > limits.max_request_bytes:
                    raise ApiError(413, f"request body of {declared} bytes exceeds the limit of "
                                   f"{limits.max_request_bytes}", code="request_too_large")
                body = parse_json(await request.body(), limits)
                domain, response = await handler(body)
                return response
            except ApiError as e:
                status = str(e.status)
                return JSONResponse(e.body(), status_code=e.status)
            except Exception as e:  # noqa: BLE001  (a bug: the replica keeps serving)
                status = "500"
                return JSONResponse(ApiError(500, f"internal error: {type(e).__name__}: {str(e)[:300]}",
                                             type_="server_error").body(), status_code=500)
            finally:
                self.requests.inc(tags={"domain": domain, "route": route, "status": status})
                self.latency.observe((time.perf_counter() - t0) * 1000.0, tags={"domain": domain, "route": route})

        @api.get("/healthz")
        async def healthz(self):
            return {"status": "ok", "domains": sorted(self.catalog), "failed": self.failed}

        @api.get("/v1/models")
        async def models(self):
            entries = {d: self.catalog.get(d) or self.instant_entry(d) for d in self.served_names()}
            data = [{"id": d, "object": "model", "created": 0, "owned_by": "slmfactory",
                     "strategy": e["strategy"], "params": e["params"], "test_ppl": e["test_ppl"]}
                    for d, e in entries.items() if e is not None]
            if self.router:
                data.append({"id": AUTO, "object": "model", "created": 0, "owned_by": "slmfactory"})
            return {"object": "list", "data": data}

        @api.post("/v1/domains")
        async def create_domain(self, request: Request):
            """A new domain from a handful of its documents: the instant model is served under
            ``name`` when this returns (201); ``finetune_budget`` queues a Ray Train
            fine-tuning that replaces it when done."""
            async def handle(body):
                from slmfactory.models.instant import GenericPhaseMissing
                from slmfactory.platform.errors import DataError
                from slmfactory.serving import domains as reg

                req = parse_domain(body, self.limits)
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
                try:
                    if self.instant_inputs.done() and self.instant_inputs.exception() is not None:
                        # Not trained at start-up (503 then): look again, they may be now.
                        self.instant_inputs = asyncio.ensure_future(asyncio.to_thread(_instant_inputs, self.cfg))
                    families, tokenizer, minilm = await self.instant_inputs
                    self.minilm = self.minilm or minilm
                    entry, built = await asyncio.to_thread(
                        reg.create_domain, self.cfg, req.name, req.documents, families, embedder=minilm,
                        tokenizer=tokenizer, taken=lambda n: n in self.catalog)
                except reg.NameTaken as e:
                    raise ApiError(409, str(e), param="name", code="name_exists") from None
                except GenericPhaseMissing as e:
                    raise ApiError(503, str(e), code="instant_unavailable", type_="service_unavailable") from None
                except DataError as e:
                    param = str(e).split(":", 1)[0] if str(e).split(":", 1)[0] in ("name", "documents") else None
                    raise ApiError(400, str(e), param=param or "documents", code="invalid_value") from None
                reg.register_async(self.cfg, req.name, entry)
                if req.finetune_budget is not None:
                    import ray

                    task = ray.remote(num_cpus=0, max_retries=0)(reg.finetune_and_swap)
                    self.finetunes[req.name] = task.remote(self.cfg.to_tree(), req.name, req.finetune_budget)
                    entry = self.registry.update(req.name, finetune={"status": "queued",
                                                                     "budget_tokens": req.finetune_budget})
                self.count_tokens(int(len(built.docs.train) + len(built.docs.heldout)), req.name, "domains")
                return req.name, JSONResponse(_domain_view(entry), status_code=201)

            return await self._respond("domains", request, handle, max_bytes=self.limits.max_domain_request_bytes)

        @api.get("/v1/domains/{name}")
        async def domain_status(self, name: str):
            entry = self.instant_entry(name) if name not in self.catalog else None
            if entry is None:
                known = name in self.catalog
                return JSONResponse(ApiError(404, f"'{name}' is " + ("a start-up domain, not a run-time one"
                                                                      if known else "not a run-time domain"),
                                             param="name", code="model_not_found").body(), status_code=404)
            return _domain_view(entry)

        @api.post("/v1/score")
        async def score(self, request: Request):
            async def handle(body):
                req = parse_score(body, self.limits)
                domain, loaded, extra = await self.model_for(req.model, req.inputs[0])
                ids = [loaded.tokenizer(t, add_special_tokens=False)["input_ids"] for t in req.inputs]
                for i, x in enumerate(ids):
                    if len(x) < 2:
                        raise ApiError(400, f"input[{i}] has {len(x)} token(s); scoring needs at least 2",
                                       param="input", code="input_too_short")
                    if len(x) > self.limits.max_prompt_tokens:
                        raise ApiError(400, f"input[{i}] has {len(x)} tokens; at most {self.limits.max_prompt_tokens}",
                                       param="input", code="input_too_long")
                scored = await asyncio.gather(*(self.score_batch((domain, loaded, x)) for x in ids))
                data = []
                for i, (x, lp) in enumerate(zip(ids, scored)):
                    nll = -sum(lp) / len(lp)
                    data.append({"index": i, "tokens": [loaded.tokenizer.decode([t]) for t in x], "token_ids": x,
                                 "token_logprobs": _with_firsts(x, lp, loaded.context),
                                 "num_scored": len(lp), "nll": nll, "perplexity": math.exp(nll)})
                self.count_tokens(sum(len(x) for x in ids), domain, "score")
                return domain, {"object": "list", "model": domain, "data": data, **({"slmfactory": extra} if extra else {})}

            return await self._respond("score", request, handle)

        @api.post("/v1/completions")
        async def completions(self, request: Request):
            async def handle(body):
                c = parse_completion(body, self.limits)
                if c.stream and (len(c.prompts) > 1 or c.n > 1):
                    raise ApiError(400, "streaming takes one prompt and n = 1", param="stream", code="invalid_value")
                domain, loaded, extra = await self.model_for(c.model, c.prompts[0])
                ids = [loaded.tokenizer(p, add_special_tokens=False)["input_ids"] for p in c.prompts]
                for i, x in enumerate(ids):
                    if len(x) + c.max_tokens > min(loaded.context, self.limits.max_prompt_tokens + c.max_tokens):
                        raise ApiError(400, f"prompt[{i}] has {len(x)} tokens; with max_tokens={c.max_tokens} it "
                                       f"exceeds the model's context of {loaded.context} tokens",
                                       param="max_tokens", code="context_length_exceeded")
                cid = f"cmpl-{uuid.uuid4().hex[:24]}"
                if c.stream:
                    return domain, StreamingResponse(self._stream(cid, domain, loaded, ids[0], c, extra),
                                                     media_type="text/event-stream")
                results = await asyncio.gather(*(self.generate_batch((domain, loaded, x, c)) for x in ids))
                choices, completion_tokens = [], 0
                for i, (x, outs) in enumerate(zip(ids, results)):
                    for out in outs:
                        completion_tokens += len(out["ids"])
                        text = (c.prompts[i] if c.echo else "") + out["text"]
                        lp = None
                        if c.logprobs is not None:
                            full = x + out["ids"]
                            lp = await asyncio.to_thread(token_logprobs, loaded, full, 0 if c.echo else len(x),
                                                         c.logprobs)
                        choices.append({"text": text, "index": len(choices), "logprobs": lp,
                                        "finish_reason": out["finish"]})
                prompt_tokens = sum(len(x) for x in ids)
                self.count_tokens(completion_tokens, domain, "completions")
                return domain, {"id": cid, "object": "text_completion", "created": int(time.time()), "model": domain,
                                "choices": choices,
                                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                          "total_tokens": prompt_tokens + completion_tokens},
                                **({"slmfactory": extra} if extra else {})}

            return await self._respond("completions", request, handle)

        async def _stream(self, cid: str, domain: str, loaded: Loaded, ids: list[int], c: Completion, extra: dict):
            """Server-sent events: one chunk per generated piece of text, then ``[DONE]``."""
            from transformers.generation.streamers import BaseStreamer

            loop = asyncio.get_running_loop()
            queue: asyncio.Queue = asyncio.Queue()

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

            task = asyncio.ensure_future(asyncio.to_thread(self._generate, loaded, [ids], c, Pipe()))
            if c.echo:
                yield chunk(c.prompts[0], None)
            new: list[int] = []
            sent = ""
            while True:
                item = await queue.get()
                if item is None:
                    break
                new.extend(t for t in item if t != loaded.tokenizer.eos_token_id)
                text, stopped = _cut_at_stop(loaded.tokenizer.decode(new), c.stop)
                if len(text) > len(sent) and not text.endswith("\ufffd"):  # whole characters only
                    yield chunk(text[len(sent):], None)
                    sent = text
            final = (await task)[0][0]
            if len(final["text"]) > len(sent):
                yield chunk(final["text"][len(sent):], None)
            yield chunk("", final["finish"])
            self.count_tokens(len(final["ids"]), domain, "completions")
            yield "data: [DONE]\n\n"

    return DomainModels


def _instant_inputs(cfg):
    """What a replica builds new domains from: the trained generic phases (never trained
    here), the run's tokenizer and MiniLM."""
    from slmfactory.models.instant import generic_families
    from slmfactory.platform.embed import load_minilm
    from slmfactory.platform.tokenizer import ensure_tokenizer, load_tokenizer

    families = generic_families(cfg, train=False)
    return families, load_tokenizer(ensure_tokenizer(cfg)), load_minilm("cpu")


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
    experiment), optionally ``max_params`` (inference-size cap)."""
    from slmfactory.platform.config import load_config, parse_overrides
    from slmfactory.platform.errors import ConfigError
    from slmfactory.serving import catalog as cat

    cfg = load_config(args.get("config"), parse_overrides(list(args.get("set") or [])))
    s = cfg.serving
    cap = float(args.get("max_params") or math.inf)
    if args.get("models") and args.get("from_mlflow"):
        raise ConfigError("serve: give --models or --from-mlflow, not both")
    if args.get("models"):
        entries = cat.from_folder(args["models"], cap)
    else:
        from slmfactory.sweeps.plan import experiment_name

        experiment = args.get("from_mlflow") or experiment_name(cfg)
        entries = cat.from_mlflow(cfg.tracking_uri, experiment, cap)
    catalog = {d: {"path": e.path, "strategy": e.strategy, "params": e.params, "test_ppl": e.test_ppl}
               for d, e in entries.items()}
    router = cat.router_data(cfg, list(catalog))
    limits = {"max_request_bytes": s.max_request_bytes, "max_prompt_tokens": s.max_prompt_tokens,
              "max_tokens": s.max_tokens, "max_n": s.max_n, "max_inputs": s.max_inputs,
              # POST /v1/domains carries documents, not a prompt: four request bounds.
              "max_domain_request_bytes": 4 * s.max_request_bytes}
    deployment = make_deployment(s.max_models_per_replica).options(
        ray_actor_options={"num_cpus": s.replica_cpus},
        autoscaling_config={"min_replicas": s.min_replicas, "max_replicas": s.max_replicas,
                            "target_ongoing_requests": s.target_ongoing_requests},
        max_ongoing_requests=s.max_ongoing_requests)
    return deployment.bind(catalog, router, limits, s.preload, {"config": cfg.to_tree()})
