"""Where a request's time in the replica goes: its ``Timer`` (milliseconds per part, sent
back as the ``Server-Timing`` header), held for the request's handlers and their tasks in a
context variable (``timer()``, ``mark(part)``). Apart from ``serving.server`` so that the
routes (``serving.app``) and the completion handlers (``serving.completions``) mark their
parts without importing the replica.
"""

from __future__ import annotations

import contextvars
import time


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
