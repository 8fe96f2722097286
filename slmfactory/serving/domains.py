"""Domains created at run time (``slmfactory specialize``, ``POST /v1/domains``): a folder
of one JSON entry per name under ``<workdir>/instant/domains``, which every replica of the
serving app consults when a model name is not in its start-up catalog.

An entry names the model folder that serves the domain and a ``version``. Replacing the
model (the fine-tuned one is ready) writes a new folder first, then swaps the entry
atomically with ``version + 1``: a replica sees the new version on its next request and
loads it under a new multiplexed id, while requests already holding the old model finish
on it, so no request fails during the swap.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from slmfactory.platform.errors import DataError
from slmfactory.platform.stages import write_json_atomic

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
RESERVED = frozenset({"auto"})


class NameTaken(DataError):
    pass


def check_name(name: str) -> None:
    if not isinstance(name, str) or not NAME_PATTERN.match(name) or name in RESERVED:
        raise DataError(f"name: {name!r} is not a valid domain name (1-64 letters, digits, '_', '.', '-', "
                        f"starting with a letter or digit; not 'auto')")


class DomainRegistry:
    """The run-time domains of a workdir (shared storage for a multi-node app)."""

    def __init__(self, root: Path):
        self.dir = Path(root) / "instant" / "domains"

    def entry_path(self, name: str) -> Path:
        return self.dir / f"{name}.json"

    def get(self, name: str) -> dict | None:
        try:
            return json.loads(self.entry_path(name).read_text())
        except (OSError, ValueError):
            return None

    def names(self) -> list[str]:
        return sorted(p.stem for p in self.dir.glob("*.json")) if self.dir.is_dir() else []

    def exists(self, name: str) -> bool:
        return self.entry_path(name).is_file() or self.dir.joinpath(f".{name}.claim").exists()

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / ".lock", "a+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    @contextlib.contextmanager
    def claim(self, name: str, taken: Callable[[str], bool] = lambda _n: False) -> Iterator[None]:
        """Hold ``name`` while its model is built: a second creation of the same name (on
        any replica) gets ``NameTaken`` at once; the claim is dropped if the build fails."""
        check_name(name)
        claim = self.dir / f".{name}.claim"
        with self._lock():
            if taken(name) or self.entry_path(name).is_file() or claim.exists():
                raise NameTaken(f"name: domain {name!r} already exists")
            claim.write_text(str(os.getpid()))
        try:
            yield
        finally:
            claim.unlink(missing_ok=True)

    def publish(self, name: str, entry: dict[str, Any]) -> dict:
        """Write the entry of a new domain (version 1)."""
        entry = {**entry, "name": name, "version": 1, "created": time.time()}
        write_json_atomic(self.entry_path(name), entry)
        return entry

    def update(self, name: str, **changes: Any) -> dict:
        """Change fields of an entry atomically; a new ``path`` bumps the version (the swap)."""
        with self._lock():
            entry = self.get(name)
            if entry is None:
                raise DataError(f"name: no domain {name!r}")
            if "path" in changes and changes["path"] != entry["path"]:
                changes["version"] = int(entry["version"]) + 1
            entry.update(changes)
            write_json_atomic(self.entry_path(name), entry)
            return entry


def register_in_mlflow(cfg, name: str, entry: dict, metrics: dict[str, float]) -> dict:
    """One MLflow run per served instant model (experiment ``<tracking.experiment>-instant``),
    its folder as the ``model`` artifact, registered as a version of ``<experiment>-<name>``."""
    from slmfactory.platform.tracking import MlflowTracker
    from slmfactory.sweeps.tracking import register

    experiment = f"{cfg.tracking.experiment}-instant"
    tracker = MlflowTracker(cfg.tracking_uri, experiment, f"{name}-v{entry['version']}")
    tracker.set_tags({"domain": name, "strategy": entry["strategy"], "phase": "instant",
                      "docs": entry.get("docs", "")})
    tracker.log_metrics({k: float(v) for k, v in metrics.items()})
    tracker.log_artifact(Path(entry["path"]), "model")
    register(tracker, f"{experiment}-{name}", "model")
    tracker.close()
    return {"experiment": experiment, "run_id": tracker.run_id, "registered_model": f"{experiment}-{name}"}


def create_domain(cfg, name: str, texts: list[str], families, *, embedder=None, tokenizer=None,
                  taken: Callable[[str], bool] = lambda _n: False, log=None) -> tuple[dict, Any]:
    """Build the instant candidates of ``texts`` and publish the chosen one under ``name``;
    returns (entry, the ``InstantDomain``)."""
    from slmfactory.models.instant import build_instant

    registry = DomainRegistry(cfg.root)
    with registry.claim(name, taken):
        built = build_instant(cfg, texts, families, embedder=embedder, tokenizer=tokenizer, log=log)
        best = built.best
        entry = registry.publish(name, {
            "path": str(best.path), "strategy": f"instant/{best.rule}", "params": _params(best.path),
            "test_ppl": best.heldout_ppl, "docs": built.docs.digest, "instant": built.summary(),
            "finetune": None, "mlflow": None})
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
        DomainRegistry(cfg.root).update(name, mlflow=info)

    t = threading.Thread(target=run, name=f"mlflow-{name}", daemon=True)
    t.start()
    return t


def finetune_and_swap(cfg_tree: dict, name: str, budget_tokens: int) -> dict:
    """Fine-tune the domain's served instant model within ``budget_tokens`` (Ray Train),
    then swap the served model. Runs as a Ray task queued by the serving app, or inline by
    ``slmfactory specialize``; progress and outcome are recorded in the entry."""
    import numpy as np

    from slmfactory.models.instant import Candidate, finetune_instant, split_documents
    from slmfactory.platform.config import from_dict

    cfg = from_dict(cfg_tree)
    registry = DomainRegistry(cfg.root)
    entry = registry.get(name)
    if entry is None:
        raise DataError(f"name: no domain {name!r}")
    registry.update(name, finetune={"status": "running", "budget_tokens": budget_tokens, "started": time.time()})
    try:
        inst = entry["instant"]
        rule = inst["chosen"]
        cand = inst["candidates"][rule]
        texts = json.loads(Path(inst["documents_path"]).read_text())
        docs = split_documents(cfg, texts)
        init = Candidate(rule, Path(cand["path"]), cand["stage"], cand["heldout_nll"], cand["heldout_ppl"], 0.0, 0.0)
        work = cfg.root / "instant" / "data" / docs.digest
        out = finetune_instant(cfg, np.asarray(docs.train), np.asarray(docs.heldout), init, budget_tokens, work,
                               log=None)
        status = {"status": "done", "budget_tokens": budget_tokens, **{k: out[k] for k in
                  ("heldout_ppl", "steps", "flops", "seconds", "path")}, "before_ppl": cand["heldout_ppl"]}
        # Swap only if fine-tuning did not make the held-out slice worse (early stopping
        # keeps the best step, but a handful of documents can still overfit).
        if out["heldout_ppl"] <= cand["heldout_ppl"]:
            new = registry.update(name, path=out["path"], strategy=f"instant/{rule}+finetune",
                                  test_ppl=out["heldout_ppl"], finetune=status)
            register_async(cfg, name, new)
        else:
            status["status"] = "kept-instant"
            new = registry.update(name, finetune=status)
        return new
    except Exception as e:  # noqa: BLE001  (recorded in the entry; the instant model keeps serving)
        registry.update(name, finetune={"status": "failed", "budget_tokens": budget_tokens,
                                        "error": f"{type(e).__name__}: {str(e)[:300]}"})
        raise
