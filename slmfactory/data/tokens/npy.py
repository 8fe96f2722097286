"""Growing ``.npy`` files: token streams written a chunk at a time (tokenization,
resampling, per-cluster streams) and read back with ``np.load(path, mmap_mode="r")``.
No torch here: Ray Data workers import it."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np


class NpyWriter:
    """Append int32 chunks to a 1-d ``.npy`` file without holding it: the header is
    written for shape ``(0,)`` and rewritten with the final length on ``close``. numpy
    pads a header for ``GROWTH_AXIS_MAX_DIGITS`` digits of the first axis, so its size does
    not change and the data never moves; ``np.load(path, mmap_mode="r")`` reads the result."""

    def __init__(self, path: Path, dtype=np.int32):
        self.path, self.dtype, self.n = Path(path), np.dtype(dtype), 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "wb")
        self._header_len = self._write_header(0)

    def _write_header(self, n: int) -> int:
        self._f.seek(0)
        np.lib.format.write_array_header_1_0(
            self._f, {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": (n,)})
        return self._f.tell()

    def append(self, chunk: np.ndarray) -> None:
        chunk = np.ascontiguousarray(chunk, dtype=self.dtype)
        if chunk.ndim != 1:
            raise ValueError(f"NpyWriter: expected a 1-d chunk, got shape {chunk.shape}")
        self._f.write(chunk.tobytes())  # (one chunk's copy at most)
        self.n += len(chunk)

    def close(self) -> int:
        """Finish the file; returns its length."""
        if self._f.closed:
            return self.n
        end = self._f.tell()
        if self._write_header(self.n) != self._header_len:  # cannot happen for a 1-d shape
            raise RuntimeError(f"{self.path}: npy header changed size")
        self._f.seek(end)
        self._f.close()
        return self.n

    def __enter__(self) -> "NpyWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_tokens(path: Path, chunks: Iterable[np.ndarray]) -> int:
    """Stream int32 ``chunks`` into the ``.npy`` file ``path``; returns its length."""
    with NpyWriter(path) as w:
        for chunk in chunks:
            w.append(chunk)
    return w.n


def flatten_with_eos(tokens, eos: int) -> np.ndarray:
    """A pyarrow list<int32> array → int32 tokens, each list followed by ``eos``."""
    offs = tokens.offsets.to_numpy().astype(np.int64)
    flat = tokens.values.to_numpy(zero_copy_only=False)[offs[0]:offs[-1]].astype(np.int32)
    offs = offs - offs[0]
    n = len(tokens)
    out = np.empty(len(flat) + n, dtype=np.int32)
    # Window i moves right by i positions (the i eos before it).
    out[np.repeat(np.arange(n), np.diff(offs)) + np.arange(len(flat))] = flat
    out[offs[1:] + np.arange(n)] = eos
    return out
