"""Domains created at run time (``slmfactory specialize``, ``POST /v1/domains``): their build
by the instant builder (``create_domain``), scored against the served domains
(``compare_served``), their optional Ray Train fine-tune and the swap to it
(``finetune_and_swap``), and their MLflow run. The entries these write, which every replica
reads, are ``store.DomainStore``'s.

The ``/v1/domains`` routes are here too: their request body (``DomainRequest``) and their
handlers (``RuntimeDomains``: what a serving replica knows of the run-time domains, the
builds and fine-tunes it started). The serving app only routes to them: the handlers are a
thin HTTP face of the builders above them, and read best next to them.

``slmfactory.models.instant`` (torch and the training stack) and ``ray`` are imported inside
the functions that build, fine-tune or queue: reading the store (the CLI, the serve
driver) loads neither.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Annotated, Any, Callable, Collection

from pydantic import AfterValidator, Field, StrictInt, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from slmfactory.data.tokens import ensure_tokenizer, load_tokenizer
from slmfactory.platform.config import from_dict
from slmfactory.platform.errors import DataError
from slmfactory.platform.tracking import MlflowTracker, register_model
from slmfactory.serving.api import ApiError
from slmfactory.serving.api import RESERVED, valid_name  # the one name rule
from slmfactory.serving.domains.store import DomainStore, NameTaken, StoreFull, finetune_status
from slmfactory.serving.engine import load_minilm
from slmfactory.serving.schemas import ModelName, Schema, Text, limits_of

LOG = logging.getLogger("ray.serve")


class Outscored(DataError):
    """An existing served domain scores the new domain's held-out text better, and
    ``serving.register_when_outscored`` is off: the new domain is not registered."""

    def __init__(self, message: str, comparison: dict):
        super().__init__(message)
        self.comparison = comparison


def compare_served(built, served: dict[str, Any], tokenizer, seq_len: int, batch_size: int,
                   auto_pick: str | None = None) -> dict:
    """The held-out perplexity of each served domain's model (``served``: name ->
    ``engine.Loaded``) on the new domain's held-out split, the one its candidates were
    chosen on, beside the new domain's own: ``{"heldout_tokens", "new_ppl", "served":
    {name: {"heldout_ppl", "auto"}}, "better_served_by"}`` (the served domain with the
    lowest perplexity, if it is lower than the new domain's; else None). A served model
    with another vocabulary cannot read these token ids: it is listed with the reason."""
    import math

    from slmfactory.models.instant import MAX_HELDOUT_TOKENS, tokens_nll  # lazy (module docstring)

    held = built.docs.heldout[:MAX_HELDOUT_TOKENS]
    vocab = tokenizer.get_vocab()
    out: dict[str, dict] = {}
    for name, loaded in sorted(served.items()):
        row: dict[str, Any] = {"auto": name == auto_pick}
        if loaded.tokenizer.get_vocab() != vocab:
            row.update(heldout_ppl=None, reason="another tokenizer: its perplexity is not comparable")
        else:
            s, n = tokens_nll(loaded.model, held, min(seq_len, loaded.context), batch_size)
            row["heldout_ppl"] = math.exp(s / n)
        out[name] = row
    new_ppl = built.best.heldout_ppl
    scored = {n: r["heldout_ppl"] for n, r in out.items() if r["heldout_ppl"] is not None}
    best = min(scored, key=scored.get) if scored else None
    return {"heldout_tokens": int(len(held)), "new_ppl": new_ppl, "served": out,
            "better_served_by": best if best is not None and scored[best] < new_ppl else None}


# -- the request body of POST /v1/domains -------------------------------------------------

MAX_REPLACEMENT_SHARE = 0.005
"""Real text holds a few U+FFFD (the corpus: at most 0.08% of a document's characters);
a text mis-decoded from another encoding holds one per non-ASCII character."""


def _document(d: str) -> str:
    if "\x00" in d or d.count("\ufffd") > MAX_REPLACEMENT_SHARE * len(d):
        # U+FFFD is what a decoder leaves for bytes it could not read: a text full of
        # them was decoded from an encoding it is not in, and would route on garbage.
        raise PydanticCustomError("invalid_encoding", "holds NUL or many U+FFFD replacement characters: it was "
                                  "decoded from an unknown encoding; send the documents as UTF-8 text")
    return d


def _domain_name(name: str) -> str:
    if not valid_name(name) or name in RESERVED:
        raise PydanticCustomError("invalid_value", "must be 1-64 letters, digits, '_', '.' or '-' starting with a "
                                  "letter or digit (not 'auto')")
    return name


class DomainRequest(Schema):
    """``POST /v1/domains``: ``{"name", "documents": [text, ...], "finetune_budget"?: tokens}``."""

    name: Annotated[ModelName, AfterValidator(_domain_name)]
    documents: list[Annotated[Text, AfterValidator(_document)]]
    finetune_budget: Annotated[StrictInt, Field(ge=1, le=10 ** 12)] | None = None

    @field_validator("documents")
    @classmethod
    def _documents(cls, v: list[str], info: ValidationInfo):
        if not v:
            raise PydanticCustomError("empty_input", "must hold at least one document")
        cap = limits_of(info).max_documents
        if len(v) > cap:
            raise PydanticCustomError("too_many_inputs", "holds {n} documents; at most {cap}",
                                      {"n": len(v), "cap": cap})
        return v


def register_in_mlflow(cfg, name: str, entry: dict, metrics: dict[str, float]) -> dict:
    """One MLflow run per served instant model (experiment ``<tracking.experiment>-instant``),
    its folder as the ``model`` artifact, registered as a version of ``<experiment>-<name>``."""
    experiment = f"{cfg.tracking.experiment}-instant"
    tracker = MlflowTracker(cfg.tracking_uri, experiment, f"{name}-v{entry['version']}")
    tracker.set_tags({"domain": name, "strategy": entry["strategy"], "phase": "instant",
                      "docs": entry.get("docs", "")})
    tracker.log_metrics({k: float(v) for k, v in metrics.items()})
    tracker.log_artifact(Path(entry["path"]), "model")
    register_model(tracker, f"{experiment}-{name}", "model")
    tracker.close()
    return {"experiment": experiment, "run_id": tracker.run_id, "registered_model": f"{experiment}-{name}"}


def create_domain(cfg, name: str, texts: list[str], families, *, embedder=None, tokenizer=None,
                  taken: Callable[[str], bool] = lambda _n: False, log=None, limited: bool = False,
                  compare: Callable[[Any], dict] | None = None) -> tuple[dict, Any]:
    """Build the instant candidates of ``texts`` and publish the chosen one under ``name``;
    returns (entry, the ``InstantDomain``). ``compare(built)``: the served domains scored
    on the same held-out split (``compare_served``), recorded in the entry; when one of
    them is better and ``serving.register_when_outscored`` is off, ``Outscored`` is
    raised and nothing is published."""
    from slmfactory.models.instant import build_instant  # lazy (module docstring)

    store = DomainStore(cfg.root)
    caps = dict(max_domains=cfg.serving.max_domains, max_bytes=cfg.serving.max_domain_disk_mb * 2 ** 20) \
        if limited else {}
    with store.claim(name, taken, **caps):
        built = build_instant(cfg, texts, families, embedder=embedder, tokenizer=tokenizer, log=log)
        best = built.best
        compared = compare(built) if compare is not None else None
        if compared and compared["better_served_by"] and not cfg.serving.register_when_outscored:
            better = compared["better_served_by"]
            raise Outscored(f"name: the served domain '{better}' scores these documents' held-out text better "
                            f"(perplexity {compared['served'][better]['heldout_ppl']:.2f} against the new domain's "
                            f"{best.heldout_ppl:.2f}); not registered (serving.register_when_outscored is off)",
                            compared)
        entry = store.publish(name, {
            "path": str(best.path), "strategy": f"instant/{best.rule}", "params": _params(best.path),
            "test_ppl": best.heldout_ppl, "docs": built.docs.digest, "instant": built.summary(),
            "compared": compared, "finetune": None, "mlflow": None})
    return entry, built


def _params(path: Path) -> int:
    try:
        return int(json.loads((Path(path) / "slmfactory.json").read_text())["params"])
    except (OSError, ValueError, KeyError):
        return 0


def register_async(cfg, name: str, entry: dict) -> threading.Thread | None:
    """Register the served model in MLflow off the request path (the domain is served
    already); the outcome is recorded in the entry's ``mlflow`` field."""
    if not cfg.tracking.enabled:
        return None

    def run() -> None:
        try:
            info = register_in_mlflow(cfg, name, entry, {"heldout_ppl": entry["test_ppl"], "params": entry["params"]})
        except Exception as e:  # noqa: BLE001  (recorded; serving is unaffected)
            info = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        try:
            DomainStore(cfg.root).update(name, mlflow=info)
        except DataError:
            pass  # deleted meanwhile

    t = threading.Thread(target=run, name=f"mlflow-{name}", daemon=True)
    t.start()
    return t


def finetune_and_swap(cfg_tree: dict, name: str, budget_tokens: int) -> dict:
    """Fine-tune the domain's served instant model within ``budget_tokens`` (Ray Train),
    then swap the served model. Runs as a Ray task queued by the serving app, or inline by
    ``slmfactory specialize``; progress and outcome are recorded in the entry."""
    import numpy as np

    from slmfactory.models.instant import Candidate, finetune_instant, split_documents  # lazy (module docstring)

    cfg = from_dict(cfg_tree)
    store = DomainStore(cfg.root)
    entry = store.get(name)
    if entry is None:
        raise DataError(f"name: no domain {name!r}")
    # The lease is held while "running" is true: a reader that finds "running" and no
    # lease knows the worker died (see ``finetune_status``).
    with store.lease(name, "finetune"):
        store.update(name, finetune={"status": "running", "budget_tokens": budget_tokens, "started": time.time(),
                                        "pid": os.getpid()})
        try:
            inst = entry["instant"]
            rule = inst["chosen"]
            cand = inst["candidates"][rule]
            texts = json.loads(Path(inst["documents_path"]).read_text())
            docs = split_documents(cfg, texts)
            init = Candidate(rule, Path(cand["path"]), cand["stage"], cand["heldout_nll"], cand["heldout_ppl"], 0.0,
                             0.0)
            work = cfg.root / "instant" / "data" / docs.digest
            out = finetune_instant(cfg, np.asarray(docs.train), np.asarray(docs.heldout), init, budget_tokens, work,
                                   log=None)
            status = {"status": "done", "budget_tokens": budget_tokens, **{k: out[k] for k in
                      ("heldout_ppl", "steps", "flops", "seconds", "path")}, "before_ppl": cand["heldout_ppl"]}
            # Swap only if fine-tuning did not make the held-out slice worse (early stopping
            # keeps the best step, but a handful of documents can still overfit).
            if out["heldout_ppl"] <= cand["heldout_ppl"]:
                new = store.update(name, path=out["path"], strategy=f"instant/{rule}+finetune",
                                      test_ppl=out["heldout_ppl"], finetune=status)
                register_async(cfg, name, new)
            else:
                status["status"] = "kept-instant"
                new = store.update(name, finetune=status)
            return new
        except Exception as e:  # noqa: BLE001  (recorded in the entry; the instant model keeps serving)
            try:
                store.update(name, finetune={"status": "failed", "budget_tokens": budget_tokens,
                                                "error": f"{type(e).__name__}: {str(e)[:300]}"})
            except DataError:
                pass  # the domain was deleted meanwhile
            raise


# -- the /v1/domains handlers of a serving replica ------------------------------------------

def instant_inputs(cfg):
    """What a replica builds new domains from: the trained generic phases (never trained
    here), the run's tokenizer and MiniLM (None when no family's clustering embedded with it)."""
    from slmfactory.models.instant import generic_families  # lazy (module docstring)

    families = generic_families(cfg, train=False)
    minilm = any(f.clusters.embedder_path is None for f in families.values())
    return families, load_tokenizer(ensure_tokenizer(cfg)), load_minilm() if minilm else None


def domain_view(entry: dict) -> dict:
    """A run-time domain as the API shows it (no file paths beyond the served folder)."""
    inst = entry.get("instant") or {}
    return {"id": entry["name"], "object": "domain", "version": entry["version"], "strategy": entry["strategy"],
            "params": entry["params"], "heldout_ppl": entry["test_ppl"], "documents": inst.get("documents"),
            "chosen": inst.get("chosen"), "histogram": inst.get("histogram"),
            "candidates": {r: {"heldout_ppl": c["heldout_ppl"], "seconds": c["seconds"], "flops": c["flops"]}
                           for r, c in (inst.get("candidates") or {}).items()},
            "timings": inst.get("timings"), **compared_view(entry), "finetune": entry.get("finetune"),
            "mlflow": entry.get("mlflow")}


def compared_view(entry: dict) -> dict:
    """What the API shows of a run-time domain's comparison with the served domains:
    ``served_domains`` (each one's held-out perplexity on the new domain's held-out split,
    ``auto``: the one ``model: auto`` routes the documents to) and ``better_served_by``."""
    compared = entry.get("compared") or {}
    return {"served_domains": compared.get("served"), "better_served_by": compared.get("better_served_by")}


class RuntimeDomains:
    """A serving replica's run-time domains: store entries read on a miss (re-read when
    their file changed), so every replica serves them; the builds and fine-tunes this
    replica started; and the ``/v1/domains`` handlers, which raise ``ApiError``.
    ``cfg`` None: an app started without a run config, with no run-time domains.
    ``startup``: the start-up catalog's domains (never run-time ones). What new domains are
    built from (generic phases, tokenizer, MiniLM) and the instant builder with the training
    stack it imports are loaded on the first POST, once: a replica that is never asked for a
    new domain imports no training code (``tests/test_layers.py`` checks it in a fresh process)."""

    def __init__(self, cfg, startup: Collection[str], max_pending: int):
        self.cfg, self.startup, self.max_pending = cfg, startup, max_pending
        self.store = DomainStore(cfg.root) if cfg is not None else None
        self.entries: dict[str, tuple[int, dict]] = {}  # name -> (entry file mtime_ns, entry)
        self.finetunes: dict[str, Any] = {}              # name -> the queued Ray task's ref
        self.builds = 0                                  # POST /v1/domains in progress here
        self.minilm = None                               # the builds' MiniLM, once loaded
        self.inputs: asyncio.Future | None = None        # instant_inputs, from the first POST on

    def entry(self, name: str) -> dict | None:
        """The store entry of a run-time domain, re-read when its file changed.
        Only a name that passed the one name rule reaches the file system, and only
        names that exist are cached."""
        if self.store is None or not valid_name(name):
            return None
        try:
            mtime = self.store.entry_path(name).stat().st_mtime_ns
        except (OSError, ValueError):
            self.entries.pop(name, None)
            return None
        hit = self.entries.get(name)
        if hit is None or hit[0] != mtime:
            entry = self.store.get(name)
            if entry is None:
                return None
            hit = self.entries[name] = (mtime, entry)
        return hit[1]

    def names(self) -> list[str]:
        return self.store.names() if self.store else []

    def pending(self) -> int:
        """Domain builds and fine-tunes queued or running here (finished fine-tunes dropped)."""
        import ray  # lazy (module docstring)

        done = [n for n, ref in self.finetunes.items() if ray.wait([ref], timeout=0)[0]]
        for n in done:
            self.finetunes.pop(n)
        return self.builds + len(self.finetunes)

    def lookup(self, name: str) -> dict:
        """The entry of run-time domain ``name``, else a 400 (a bad name) or 404."""
        if not valid_name(name):
            raise ApiError(400, "'name' must be 1-64 letters, digits, '_', '.' or '-' starting with a letter or "
                           "digit", param="name", code="invalid_value")
        entry = self.entry(name) if name not in self.startup else None
        if entry is None:
            raise ApiError(404, f"'{name}' is " + ("a start-up domain, not a run-time one"
                                                   if name in self.startup else "not a run-time domain"),
                           param="name", code="model_not_found")
        return entry

    async def create(self, req: DomainRequest, served: dict | None = None, auto_pick: str | None = None
                     ) -> tuple[dict, int]:
        """``POST /v1/domains``: the instant model of ``req.documents`` served under
        ``req.name`` when this returns; ``finetune_budget`` queues a Ray Train fine-tuning
        that replaces it when done. Returns the domain's view and the tokens it read."""
        from slmfactory.models.instant import GenericPhaseMissing  # lazy (module docstring)

        if self.cfg is None:
            raise ApiError(503, "this app was started without a run config: no run-time domains",
                           code="instant_unavailable", type_="service_unavailable")
        if req.name in self.startup or self.store.exists(req.name):
            raise ApiError(409, f"domain '{req.name}' already exists", param="name", code="name_exists")
        if req.finetune_budget is not None:
            step = self.cfg.finetune.batch_size * self.cfg.data.seq_len
            if req.finetune_budget < step:
                raise ApiError(400, f"'finetune_budget' must be at least one step of {step} tokens, got "
                               f"{req.finetune_budget}", param="finetune_budget", code="invalid_value")
        if self.pending() >= self.max_pending:
            raise ApiError(429, f"{self.pending()} domain builds and fine-tunes are queued or running "
                           f"(serving.max_pending_builds); retry later", code="queue_full",
                           type_="rate_limit_error", headers={"Retry-After": "30"})
        self.builds += 1
        try:
            if self.inputs is None or (self.inputs.done() and self.inputs.exception() is not None):
                # The first POST, or the generic phases were not trained at the last one
                # (503 then): look again, they may be now.
                self.inputs = asyncio.ensure_future(asyncio.to_thread(instant_inputs, self.cfg))
            families, tokenizer, minilm = await asyncio.shield(self.inputs)
            self.minilm = self.minilm or minilm
            compare = (lambda built: compare_served(built, served, tokenizer, self.cfg.data.seq_len,
                                                    self.cfg.finetune.batch_size, auto_pick)) if served else None
            entry, built = await asyncio.to_thread(
                create_domain, self.cfg, req.name, req.documents, families, embedder=minilm,
                tokenizer=tokenizer, taken=lambda n: n in self.startup, limited=True, compare=compare)
        except NameTaken as e:
            raise ApiError(409, str(e), param="name", code="name_exists") from None
        except Outscored as e:
            raise ApiError(409, str(e).split(": ", 1)[-1], param="name", code="outscored") from None
        except StoreFull as e:
            raise ApiError(409, str(e).split(": ", 1)[-1], param="name", code="max_domains") from None
        except GenericPhaseMissing as e:
            raise ApiError(503, str(e), code="instant_unavailable", type_="service_unavailable") from None
        except DataError as e:
            param = str(e).split(":", 1)[0] if str(e).split(":", 1)[0] in ("name", "documents") else None
            raise ApiError(400, str(e), param=param or "documents", code="invalid_value") from None
        finally:
            self.builds -= 1
        better = (entry.get("compared") or {}).get("better_served_by")
        if better:
            LOG.warning("domain %r: the served domain %r scores its documents' held-out text better (perplexity "
                        "%.2f against %.2f); registered anyway (serving.register_when_outscored)", req.name, better,
                        entry["compared"]["served"][better]["heldout_ppl"], entry["test_ppl"])
        register_async(self.cfg, req.name, entry)
        if req.finetune_budget is not None:
            import ray  # lazy (module docstring)

            # "queued" is written before the task exists: a fast task's "running" or
            # "failed" can only come after it, never be overwritten by it.
            entry = self.store.update(req.name, finetune={"status": "queued",
                                                             "budget_tokens": req.finetune_budget})
            task = ray.remote(num_cpus=0, max_retries=0)(finetune_and_swap)
            self.finetunes[req.name] = task.remote(self.cfg.to_tree(), req.name, req.finetune_budget)
        return domain_view(entry), int(len(built.docs.train) + len(built.docs.heldout))

    async def status(self, name: str) -> dict:
        """``GET /v1/domains/NAME``: the domain's view, its fine-tune status made true."""
        import ray  # lazy (module docstring)

        entry = await asyncio.to_thread(self.lookup, name)
        ref = self.finetunes.get(name)
        ft = entry.get("finetune") or {}
        if ref is not None and ft.get("status") == "queued" and ray.wait([ref], timeout=0)[0]:
            try:
                ray.get(ref)
            except Exception as e:  # noqa: BLE001  (the task died before it started)
                entry = self.store.update(name, finetune={**ft, "status": "failed",
                                                             "error": f"{type(e).__name__}"})
        entry = await asyncio.to_thread(finetune_status, self.store, name, entry)
        return domain_view(entry)

    async def delete(self, name: str) -> dict:
        """``DELETE /v1/domains/NAME``: a run-time domain no fine-tune is working on."""
        if name in self.startup:
            raise ApiError(409, f"'{name}' is a start-up domain (its model folder is the run's); only "
                           "run-time domains are deleted", param="name", code="not_deletable")
        self.lookup(name)
        self.pending()  # drops finished fine-tunes from self.finetunes
        if self.store.finetuning(name) or name in self.finetunes:
            raise ApiError(409, f"domain '{name}' is being fine-tuned; delete it when that ends",
                           param="name", code="busy")
        entry = await asyncio.to_thread(self.store.delete, name)
        self.entries.pop(name, None)
        return {"id": name, "object": "domain", "deleted": entry is not None}
