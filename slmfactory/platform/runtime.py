"""Ray runtime: start a local Ray instance by default, or join a cluster.

``RAY_ADDRESS`` (or ``--address``) joins an existing cluster, e.g. one started with
``ray start --head`` or a KubeRay RayCluster. Token authentication, on by default in
Ray 2.60, is left on: Ray generates the token under ``~/.ray/auth_token`` and workers
started by ``ray start`` on the same machine read it from there.
"""

from __future__ import annotations

import builtins
import os
from contextlib import contextmanager
from typing import Iterator

# Set before Ray or MLflow is imported anywhere in the process.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Ray Train V2 is the default in 2.60; say so explicitly so a cluster image agrees.
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")


def say(text: str) -> None:
    """Print ``text`` through whatever ``builtins.print`` is now: the default ``log`` of the
    driver, the sweep and the trainer.

    Ray replaces ``builtins.print`` in a process once Ray Data's progress bars (tqdm_ray) or
    Train V2's log capture start there, and a reference to the original ``print`` then no
    longer pickles (pickle stores builtins by name and checks the name still means it), so
    Tune failed to save a sweep whose callbacks held ``print`` after the driver had run a
    Ray Data stage. This function pickles by reference whatever Ray has patched."""
    builtins.print(text)


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to ``address`` / ``$RAY_ADDRESS`` or start a local instance (idempotent)."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    kwargs: dict = {"include_dashboard": False, "logging_level": "WARNING",
                    "log_to_driver": os.environ.get("SLMFACTORY_RAY_LOGS", "0") == "1"}
    if address is None:
        kwargs["num_cpus"] = num_cpus or os.cpu_count()
    ray.init(address=address, **kwargs)


@contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None) -> Iterator[None]:
    """``init_ray`` for the duration of a block; shuts down only what it started."""
    import ray

    started = not ray.is_initialized()
    init_ray(address, num_cpus)
    try:
        yield
    finally:
        if started:
            ray.shutdown()


BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")
"""/proc/cpuinfo flags of CPUs whose matrix units take bf16 (Sapphire Rapids and later,
Cooper Lake, Zen 4+): elsewhere oneDNN emulates bf16 matmuls and they are slower than fp32."""


def cpu_bf16_support() -> str:
    """The CPU's bf16 matrix feature (``amx_bf16`` or ``avx512_bf16``), or "" without one.
    Read from /proc/cpuinfo (Linux); torch's own capability string is the fallback elsewhere."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return next((flag for flag in BF16_CPU_FLAGS if flag in flags), "")
    except OSError:
        pass
    import torch

    cap = torch.backends.cpu.get_cpu_capability()   # "AMX" / "AVX512" / "AVX2" / "DEFAULT"
    return "amx_bf16" if "AMX" in cap.upper() else ""
