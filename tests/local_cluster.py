"""A real two-node Ray cluster on this machine (loopback), for the multi-node tests, and
the serving app on loopback.

Teardown stops only this cluster's Ray processes (found by their temp dirs, then their
children, by pid) — ``ray stop`` would also kill every other Ray session on the machine.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

RAY_BIN = Path(sys.executable).with_name("ray")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_mine(temp_dirs: list[str]) -> None:
    """Terminate the processes whose command line names one of ``temp_dirs`` (the
    nodes' GCS, raylets, agents) and their children (the workers), by pid."""
    import psutil

    me = os.getpid()
    roots = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            cmd = p.info["cmdline"] or []
        except psutil.Error:
            continue
        if p.pid != me and any(any(t in a for t in temp_dirs) for a in cmd):
            roots.append(p)
    procs: dict[int, psutil.Process] = {}
    for p in roots:
        procs[p.pid] = p
        try:
            for c in p.children(recursive=True):
                if c.pid != me:
                    procs[c.pid] = c
        except psutil.Error:
            pass
    for p in procs.values():
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(list(procs.values()), timeout=15)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass


@contextmanager
def local_cluster(dashboard: bool = False, cpus_per_node: int = 1) -> Iterator[tuple[str, str | None]]:
    """A two-node Ray cluster on loopback: ``ray start --head`` plus ``ray start --address``,
    each with its own temp dir and ``cpus_per_node`` CPUs, token authentication on.
    Yields (GCS address, dashboard URL or None: ``ray job submit`` talks to the dashboard)."""
    if not RAY_BIN.is_file() and shutil.which("ray") is None:
        pytest.skip("the `ray` command is not installed, so `ray start` cannot make a cluster")
    ray_bin = str(RAY_BIN if RAY_BIN.is_file() else shutil.which("ray"))
    # Token auth stays on: the head writes/reads ~/.ray/auth_token; the joining node, the
    # driver and `ray job` must be told to send it.
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="token")
    env.pop("RAY_ADDRESS", None)
    # Short paths: Ray puts Unix sockets under the temp dir (108-byte limit).
    t_head = tempfile.mkdtemp(prefix="slmf-rh-", dir="/tmp")
    t_work = tempfile.mkdtemp(prefix="slmf-rw-", dir="/tmp")
    port = free_port()
    dash_port = free_port() if dashboard else None
    common = [f"--num-cpus={cpus_per_node}", "--node-ip-address=127.0.0.1", "--disable-usage-stats"]

    def own_ports() -> list[str]:
        # Each node's agents on free ports: the defaults (52365 ...) collide with the other
        # node, and with any other Ray instance on the machine ("No available agent").
        return [f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
                f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}"]
    dash = ["--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash_port}"] \
        if dashboard else ["--include-dashboard=false"]
    try:
        head = subprocess.run([ray_bin, "start", "--head", f"--port={port}", f"--temp-dir={t_head}", *dash, *common,
                               *own_ports()],
                              capture_output=True, text=True, env=env, timeout=180)
        assert head.returncode == 0, f"ray start --head failed:\n{head.stdout[-2000:]}\n{head.stderr[-2000:]}"
        work = subprocess.run([ray_bin, "start", f"--address=127.0.0.1:{port}", f"--temp-dir={t_work}", *common,
                               *own_ports()],
                              capture_output=True, text=True, env=env, timeout=180)
        assert work.returncode == 0, f"ray start --address failed:\n{work.stdout[-2000:]}\n{work.stderr[-2000:]}"
        yield f"127.0.0.1:{port}", (f"http://127.0.0.1:{dash_port}" if dashboard else None)
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        stop_mine([t_head, t_work])
        shutil.rmtree(t_head, ignore_errors=True)
        shutil.rmtree(t_work, ignore_errors=True)


@contextmanager
def serving_app(config: Path, overrides: dict, models: Path) -> Iterator[str]:
    """The project's serving app (``build_app`` on ``config`` with ``overrides``, models from
    ``models``) on Ray Serve on a free loopback port of the Ray instance already up; yields
    its base URL and shuts Serve down after."""
    from ray import serve

    from slmfactory.serving.app import build_app

    port = free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app({"config": str(config), "set": [f"{k}={v}" for k, v in overrides.items()],
                             "models": str(models)}), name="slmfactory", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
