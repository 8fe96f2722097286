"""One way to materialise a stage's output: keyed, atomic, marked complete, locked.

Every cached product of the platform (tokenizer, token streams, embeddings, k-means,
domain assignment, resampled data, each generic phase, each fine-tune) is a
:class:`Stage`: a folder ``<workdir>/<kind>/<name>-<key>`` whose ``key`` is a hash of
*everything that changes the result* — config sections and the keys (or content hashes)
of the upstream stages it reads. So

- a changed input gives a new key, hence a new folder, and the stage recomputes;
- an unchanged input gives the same key, and the finished folder is reused as it is;
- a finished stage is never built again: its ``stage.json`` marker says it is complete.

The output is written to a work folder next to the final one and renamed into place
together with the marker, so a reader never sees half an output and a kill leaves
either nothing or a complete stage. Long stages (training) build in a *stable* work
folder (``.<name>-<key>.partial``) so a killed run resumes its own checkpoints; short
ones use a fresh temporary folder. An advisory file lock serialises concurrent builders
of the same key (two sweep trials needing one generic phase: the second waits, then
finds it done).

Keys are Merkle-style: a stage's key stands for its content, so downstream stages key on
it instead of re-hashing large files; only root inputs (corpus files) are hashed by
content (their sha256 is in the corpus manifest).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import math
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from slmfactory.platform.errors import DataError

MARKER = "stage.json"
KEY_CHARS = 16


def canonical(value: Any) -> Any:
    """A JSON-able form of config sections, stages, paths and plain values."""
    if isinstance(value, Stage):
        return {"stage": value.kind, "key": value.key}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        to_tree = getattr(value, "to_tree", None)
        return canonical(to_tree() if callable(to_tree) else dataclasses.asdict(value))
    if isinstance(value, dict):
        return {str(k): canonical(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [canonical(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and math.isfinite(value) and value == int(value) and abs(value) < 2**53:
        return int(value)  # 1e6 and 1000000 are the same budget
    return value


def digest(*inputs: Any) -> str:
    blob = json.dumps(canonical(list(inputs)), sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:KEY_CHARS]


@contextlib.contextmanager
def atomic_path(dest: Path) -> Iterator[Path]:
    """A temporary path beside ``dest`` to write a file (or build a folder) at: renamed
    onto ``dest`` when the block ends, removed when it raises. A reader sees the old
    ``dest`` or the complete new one, never half of it, and a failure leaves nothing
    behind. The path is in ``dest``'s own folder, so the rename stays on one filesystem
    and is atomic; a folder can replace only a missing (or empty) ``dest``.

    ``with atomic_path(out) as tmp: pq.write_table(table, tmp)``"""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = _beside(dest, "tmp")
    try:
        yield tmp
        os.replace(tmp, dest)
    except BaseException:
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def _beside(dest: Path, what: str) -> Path:
    # pid and a random part: concurrent writers (processes or threads) never share one.
    return dest.with_name(f".{dest.name}.{os.getpid()}-{secrets.token_hex(4)}.{what}")


def replace_dir(src: Path, dest: Path) -> None:
    """Put the complete folder ``src`` at ``dest`` (same filesystem), replacing what is
    there: a reader sees the old ``dest`` or the new one, never a mix. The old one is moved
    aside (one rename), the new one renamed in, then the old one removed. If the new one
    cannot be renamed in, the old one is put back and the error raised: ``dest`` is as it
    was. A kill between the two renames leaves ``dest`` missing (never half-written) and
    the old one beside it."""
    src, dest = Path(src), Path(dest)
    old = _beside(dest, "old")
    moved_aside = dest.exists() or dest.is_symlink()
    if moved_aside:
        os.replace(dest, old)
    try:
        os.replace(src, dest)
    except BaseException:
        if moved_aside:
            os.replace(old, dest)
        raise
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(dest: Path) -> Iterator[Path]:
    """A fresh empty folder beside ``dest`` to build a folder in: swapped in for ``dest``
    (replacing a finished one, :func:`replace_dir`) when the block ends, removed when it
    raises. :func:`atomic_path` for a folder that may already exist."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = _beside(dest, "tmp")
    tmp.mkdir()
    try:
        yield tmp
        replace_dir(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_bytes_atomic(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: Path, text: str) -> None:
    """``text`` as UTF-8 at ``path``, atomically (:func:`atomic_path`)."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=1, default=str))


@dataclass(frozen=True)
class Stage:
    """A keyed output folder. ``inputs`` is what the key was computed from (kept in the
    marker, so ``stage.json`` says why a folder exists)."""

    kind: str
    name: str
    key: str
    dir: Path
    inputs: dict

    @classmethod
    def of(cls, root: Path, kind: str, name: str, **inputs: Any) -> "Stage":
        key = digest(kind, name, inputs)
        safe = name.replace("/", "-")
        return cls(kind=kind, name=name, key=key, dir=Path(root) / kind / f"{safe}-{key}",
                   inputs=canonical(inputs))

    # -- state --------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return (self.dir / MARKER).is_file()

    @property
    def info(self) -> dict:
        """What the builder returned (read from the marker); {} if not finished."""
        try:
            return json.loads((self.dir / MARKER).read_text())["info"]
        except (OSError, ValueError, KeyError):
            return {}

    def path(self, rel: str | Path) -> Path:
        """A file of this stage, or of an upstream one (``../<stage>/file``), normalised so
        it resolves even before this stage's own folder exists."""
        return Path(os.path.normpath(self.dir / rel))

    def relative(self, path: str | Path) -> str:
        """``path`` relative to this stage's folder: how ``info`` refers to files, here or
        in an upstream stage, so a workdir can be moved or copied whole."""
        return os.path.relpath(Path(path).resolve(), self.dir.resolve())

    @property
    def work_dir(self) -> Path:
        """The stable folder a resumable build writes into before it is renamed."""
        return self.dir.with_name(f".{self.dir.name}.partial")

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        self.dir.parent.mkdir(parents=True, exist_ok=True)
        with open(self.dir.with_name(f".{self.dir.name}.lock"), "a+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    # -- building -----------------------------------------------------------------------
    def build(self, fn: Callable[[Path], dict | None], *, resumable: bool = False, replace: bool = False) -> dict:
        """Run ``fn(work_dir)`` unless the stage is finished, then publish its output.

        ``fn`` writes everything under the folder it is given and returns a JSON-able
        ``info`` dict (paths inside it relative to the stage folder). ``resumable``: the
        work folder survives a kill, so ``fn`` can resume from what it left there.
        ``replace``: rebuild a finished stage (a token stream grown to a longer prefix of
        the same deterministic stream) and swap it in atomically.
        """
        with self.lock():
            if self.done and not replace:
                return self.info
            work = self.work_dir if resumable else self.dir.with_name(f".{self.dir.name}.tmp-{os.getpid()}")
            if not resumable:
                shutil.rmtree(work, ignore_errors=True)
            work.mkdir(parents=True, exist_ok=True)
            info = fn(work) or {}
            write_json_atomic(work / MARKER, {"kind": self.kind, "name": self.name, "key": self.key,
                                              "inputs": self.inputs, "info": info})
            replace_dir(work, self.dir)  # over a stale unfinished folder, or the stage being replaced
            return info

    def write(self, info: dict) -> dict:
        """Publish a stage whose output is just its ``info`` (a record of other stages)."""
        return self.build(lambda _work: info)


# -- root inputs: the corpus files, hashed by content --------------------------------------

_MANIFESTS: dict[str, tuple[int, dict]] = {}


def corpus_digest(corpus_dir: Path, part: str, split: str) -> str:
    """The sha256 of one corpus file, as the manifest records it (so a corpus rebuilt or
    imported into the same workdir changes every key downstream of the files it changed)."""
    man = Path(corpus_dir) / "manifest.json"
    try:
        mtime = man.stat().st_mtime_ns
    except OSError:
        raise DataError(f"{corpus_dir}: no corpus manifest (build the corpus first: slmfactory corpus)") from None
    hit = _MANIFESTS.get(str(man))
    if hit is None or hit[0] != mtime:
        hit = (mtime, json.loads(man.read_text(encoding="utf-8"))["parts"])
        _MANIFESTS[str(man)] = hit
    key = f"generic/{split}" if part == "generic" else f"domains/{part}/{split}"
    if key not in hit[1]:
        raise DataError(f"{corpus_dir}: the manifest has no part {key!r}")
    return hit[1][key]["sha256"]
