"""Ray runtime: start a local Ray instance by default, or join a cluster.

``RAY_ADDRESS`` (or ``--address``) joins an existing cluster, e.g. one started with
``ray start --head`` or a KubeRay RayCluster. Token authentication, on by default in
Ray 2.60, is left on: Ray generates the token under ``~/.ray/auth_token`` and workers
started by ``ray start`` on the same machine read it from there.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

# Set before Ray or MLflow is imported anywhere in the process.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Ray Train V2 is the default in 2.60; say so explicitly so a cluster image agrees.
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")


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
