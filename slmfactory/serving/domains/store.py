"""The store of the domains created at run time (``slmfactory specialize``, ``POST
/v1/domains``): a folder of one JSON entry per name under ``<workdir>/instant/domains``,
which every replica of the serving app consults when a model name is not in its start-up
catalog.

An entry names the model folder that serves the domain and a ``version``. Replacing the
model (the fine-tuned one is ready) writes a new folder first, then swaps the entry
atomically with ``version + 1``: a replica sees the new version on its next request and
loads it under a new multiplexed id, while requests already holding the old model finish
on it, so no request fails during the swap.

Apart from ``runtime`` (the builds, fine-tunes and ``/v1/domains`` handlers that write the
entries): reading the store takes the file system and the one name rule, no model code.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from slmfactory.platform.errors import DataError
from slmfactory.platform.stages import write_json_atomic
from slmfactory.serving.api import RESERVED, valid_name  # the one name rule


class NameTaken(DataError):
    pass


class StoreFull(DataError):
    pass


def check_name(name: str) -> None:
    if not valid_name(name) or name in RESERVED:
        raise DataError(f"name: {name!r} is not a valid domain name (1-64 letters, digits, '_', '.', '-', "
                        f"starting with a letter or digit; not 'auto')")


# -- the domain store (one JSON entry per run-time domain, shared by every replica) ---------

class DomainStore:
    """The run-time domains of a workdir (shared storage for a multi-node app)."""

    def __init__(self, root: Path):
        self.dir = Path(root) / "instant" / "domains"

    def entry_path(self, name: str) -> Path:
        check_name(name)  # a name reaches the file system only once it passed the one rule
        return self.dir / f"{name}.json"

    def get(self, name: str) -> dict | None:
        if not valid_name(name):
            return None
        try:
            return json.loads(self.entry_path(name).read_text())
        except (OSError, ValueError):
            return None

    def names(self) -> list[str]:
        return sorted(p.stem for p in self.dir.glob("*.json") if valid_name(p.stem)) if self.dir.is_dir() else []

    def exists(self, name: str) -> bool:
        return self.entry_path(name).is_file() or self.building(name)

    def _held(self, path: Path) -> bool:
        """Whether a live process holds the lock on ``path`` (a dead one's is released by
        the kernel: a replica SIGKILLed mid-build leaves the name usable)."""
        try:
            with open(path, "r") as f:
                try:
                    fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
                except BlockingIOError:
                    return True
                fcntl.flock(f, fcntl.LOCK_UN)
                return False
        except FileNotFoundError:
            return False

    def building(self, name: str) -> bool:
        return self._held(self.dir / f".{name}.build")

    def finetuning(self, name: str) -> bool:
        return self._held(self.dir / f".{name}.finetune")

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
    def lease(self, name: str, kind: str = "build") -> Iterator[None]:
        """An exclusive lock on ``.<name>.<kind>`` held while this process works on the
        name (not a claim file: the kernel drops it when the process dies)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        f = open(self.dir / f".{name}.{kind}", "a+")
        try:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise NameTaken(f"name: domain {name!r} is being {'built' if kind == 'build' else 'fine-tuned'}") \
                    from None
            yield
        finally:
            f.close()  # releases the lock

    def disk_bytes(self) -> int:
        """Bytes of every run-time domain's served model folders (what ``max_domain_disk_mb`` caps)."""
        folders = set().union(*(_folders(self.get(n) or {}) for n in self.names()))
        return sum(f.stat().st_size for p in folders if p.is_dir() for f in p.rglob("*") if f.is_file())

    @contextlib.contextmanager
    def claim(self, name: str, taken: Callable[[str], bool] = lambda _n: False, max_domains: int | None = None,
              max_bytes: float | None = None) -> Iterator[None]:
        """Hold ``name`` while its model is built: a second creation of the same name (on
        any replica) gets ``NameTaken`` at once; a full store gets ``StoreFull``."""
        check_name(name)
        with self._lock():
            if taken(name) or self.entry_path(name).is_file():
                raise NameTaken(f"name: domain {name!r} already exists")
            if max_domains is not None and len(self.names()) >= max_domains:
                raise StoreFull(f"name: this workdir holds {len(self.names())} run-time domains, the limit "
                                   f"(serving.max_domains); delete one first")
            if max_bytes is not None and self.disk_bytes() >= max_bytes:
                raise StoreFull(f"name: run-time domains use {self.disk_bytes() / 2 ** 20:.0f} MiB, the limit "
                                   f"(serving.max_domain_disk_mb); delete one first")
            lease = self.lease(name)
            lease.__enter__()
        try:
            yield
        finally:
            lease.__exit__(None, None, None)

    def delete(self, name: str) -> dict | None:
        """Remove a run-time domain: its entry (replicas stop serving it on their next
        request) and the model folders it owns under ``<workdir>/instant``."""
        import shutil

        check_name(name)
        with self._lock():
            entry = self.get(name)
            if entry is None:
                return None
            self.entry_path(name).unlink(missing_ok=True)
            # Candidate folders are stages keyed by the documents: another domain built
            # from the same documents shares them, and keeps them.
            shared = set().union(*(_folders(self.get(n) or {}) for n in self.names()))
        own = self.dir.parent.resolve()
        for p in _folders(entry) - shared:
            if own in p.parents and p.is_dir():  # never a folder outside the instant area
                shutil.rmtree(p, ignore_errors=True)
        return entry

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


def _folders(entry: dict) -> set[Path]:
    """The model folders a store entry serves or may swap to (its instant candidates)."""
    paths = {entry.get("path")} | {c.get("path") for c in ((entry.get("instant") or {}).get("candidates") or {}).values()}
    return {Path(p).resolve() for p in paths if p}


def finetune_status(store: DomainStore, name: str, entry: dict) -> dict:
    """``entry`` with its fine-tune status made true: "running" with no live worker holding
    the fine-tune lease is a worker that died (SIGKILL, node loss): "failed"."""
    ft = entry.get("finetune") or {}
    if ft.get("status") == "running" and not store.finetuning(name):
        fresh = store.get(name) or entry  # it may have just finished
        ft = fresh.get("finetune") or {}
        if ft.get("status") == "running":
            try:
                return store.update(name, finetune={**ft, "status": "failed",
                                                    "error": "the fine-tuning worker died"})
            except DataError:
                return entry
        return fresh
    return entry
