"""API keys and per-key rate limits of the serving app.

Keys come from files named by ``serving.api_keys_file`` / ``serving.admin_keys_file``
(one key a line; ``#`` comments) or the environment variables ``SLMFACTORY_API_KEYS`` /
``SLMFACTORY_ADMIN_KEYS`` (comma-separated; what a Kubernetes Secret mounts). They are
never in the recipe, so never in MLflow params nor in a logged config; the replicas get
only their SHA-256 digests, and a request's key is compared by digest in constant time.
An admin key may do everything a plain key may, plus ``/v1/domains`` (create, fine-tune,
delete).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import math
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from slmfactory.platform.errors import ConfigError

API_ENV, ADMIN_ENV = "SLMFACTORY_API_KEYS", "SLMFACTORY_ADMIN_KEYS"
MIN_KEY_CHARS = 16
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def _read(path: str, what: str) -> list[str]:
    try:
        lines = Path(path).expanduser().read_text().splitlines()
    except OSError as e:
        raise ConfigError(f"{what}: cannot read {path} ({e.strerror})") from None
    return [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]


def load_keys(cfg) -> tuple[list[str], list[str]]:
    """(digests of the API keys, digests of the admin keys) of ``cfg.serving`` and the
    environment. A key shorter than 16 characters is refused (one line naming where it
    came from, never the key)."""
    s = cfg.serving
    out = []
    for file_key, env in (("api_keys_file", API_ENV), ("admin_keys_file", ADMIN_ENV)):
        keys = _read(getattr(s, file_key), f"serving.{file_key}") if getattr(s, file_key) else []
        keys += [k.strip() for k in os.environ.get(env, "").split(",") if k.strip()]
        for i, k in enumerate(keys):
            if len(k) < MIN_KEY_CHARS:
                raise ConfigError(f"serving.{file_key} / ${env}: key {i + 1} has {len(k)} characters; keys need at "
                                  f"least {MIN_KEY_CHARS}")
        out.append(sorted({digest(k) for k in keys}))
    api, admin = out
    return api, admin


def is_loopback(host: str) -> bool:
    return host in LOOPBACK or host.startswith("127.")


@dataclass(frozen=True)
class Caller:
    key: str       # the key's digest ("" with keys off): what rate limits are counted by
    admin: bool


class Auth:
    """Who a request is, from ``Authorization: Bearer KEY``. No keys configured: keys off
    (everyone is an admin), which ``slmfactory serve`` allows only on loopback or with
    ``--insecure``."""

    def __init__(self, api: list[str], admin: list[str]):
        self.api, self.admin = frozenset(api), frozenset(admin)
        self.enabled = bool(self.api or self.admin)

    def caller(self, authorization: str | None) -> Caller | None:
        if not self.enabled:
            return Caller("", True)
        scheme, _, key = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            return None
        d = digest(key.strip())
        # Constant-time comparison against every key: the answer's timing says nothing
        # about how much of a key matched.
        admin = any(hmac.compare_digest(d, a) for a in self.admin)
        plain = any(hmac.compare_digest(d, a) for a in self.api)
        return Caller(d, admin) if admin or plain else None


class RateLimiter:
    """Per-key token buckets: ``rpm`` requests and ``tpm`` tokens per minute (0 = no
    limit), refilled continuously. ``charge`` takes from the bucket or says how many
    seconds until it could (the ``Retry-After``). One replica's, or, held in one actor for
    every replica of an app, the app's (``SharedRateLimiter``)."""

    def __init__(self, rpm: float, tpm: float, max_keys: int = 100_000, clock=time.monotonic):
        self.rates = {"requests": rpm, "tokens": tpm}
        self.clock = clock  # seconds; a test steps its own
        self.buckets: dict[tuple[str, str], tuple[float, float]] = {}  # (key, kind) -> (level, time)
        self.lock = threading.Lock()
        self.max_keys = max_keys

    def charge(self, key: str, kind: str, amount: float) -> float:
        """0.0 when granted (and taken), else the seconds to wait."""
        per_min = self.rates[kind]
        if per_min <= 0:
            return 0.0
        rate = per_min / 60.0
        now = self.clock()
        with self.lock:
            level, t = self.buckets.get((key, kind), (per_min, now))
            level = min(per_min, level + (now - t) * rate)
            if amount > per_min:  # could never be granted: the wait of a full bucket
                return 60.0
            if level < amount:
                self.buckets[(key, kind)] = (level, now)
                return max(1.0, math.ceil((amount - level) / rate))
            if len(self.buckets) >= self.max_keys and (key, kind) not in self.buckets:
                self.buckets.clear()  # bounded: only valid keys get here, so this is a safety net
            self.buckets[(key, kind)] = (level - amount, now)
            return 0.0


SHARED_TIMEOUT_S = 2.0
"""How long a replica waits for the shared buckets before it counts the request itself."""


class RateLimitsActor:
    """The token buckets of every replica of one application: a named detached actor
    (``SharedRateLimiter``). The limit comes with each charge, so a redeployed app with
    other limits uses them at once."""

    def __init__(self):
        self.limiter = RateLimiter(0.0, 0.0)

    def charge(self, key: str, kind: str, amount: float, per_min: float) -> float:
        self.limiter.rates[kind] = per_min
        return self.limiter.charge(key, kind, amount)


class SharedRateLimiter:
    """Per-key rates held for the whole application: every replica charges the same buckets,
    in the named detached actor ``name`` (created by the first replica that needs it, found
    by the others; no CPU). A key gets the limit however many replicas it reaches. When the
    actor does not answer within ``SHARED_TIMEOUT_S`` (its node lost), the request is
    counted by the replica's own ``local`` buckets (per replica, as with one replica) and
    the actor is looked up or created again for the next one."""

    def __init__(self, rpm: float, tpm: float, name: str, local: RateLimiter):
        self.rates = {"requests": rpm, "tokens": tpm}
        self.name, self.local = name, local
        self.actor = None

    def _handle(self):
        import ray  # lazy: the replica's, never the CLI's

        if self.actor is None:
            self.actor = ray.remote(RateLimitsActor).options(
                name=self.name, lifetime="detached", get_if_exists=True, num_cpus=0, max_restarts=-1).remote()
        return self.actor

    async def charge(self, key: str, kind: str, amount: float) -> float:
        per_min = self.rates[kind]
        if per_min <= 0:
            return 0.0
        try:
            return await asyncio.wait_for(self._handle().charge.remote(key, kind, amount, per_min),
                                          SHARED_TIMEOUT_S)
        except Exception as e:  # noqa: BLE001  (an unreachable actor: this replica counts alone)
            self.actor = None
            logging.getLogger("ray.serve").warning("slmfactory: shared rate limits %s unreachable (%s); counted "
                                                   "by this replica", self.name, type(e).__name__)
            return self.local.charge(key, kind, amount)
