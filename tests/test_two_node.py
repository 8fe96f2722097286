"""The clustering pipeline on a real two-node Ray cluster on this machine (loopback):
``ray start --head`` plus a second ``ray start --address``, each with its own temp dir
and one CPU, the driver joining with ``init_ray(address=...)``.

Checks: every window embedded and assigned exactly once; assignments agree with an
in-process MiniLM + nearest centroid; and a single-node run of k-means / assignment on
the same (cached) embeddings gives the same centroids and histograms.

Teardown stops only this test's Ray processes (found by their temp dirs, then their
children, by pid) — ``ray stop`` would also kill every other Ray session on the machine.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
RAY_BIN = Path(sys.executable).with_name("ray")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop_mine(temp_dirs: list[str]) -> None:
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


@pytest.fixture
def two_node_cluster(monkeypatch):
    if not RAY_BIN.is_file() and shutil.which("ray") is None:
        pytest.skip("the `ray` command is not installed, so `ray start` cannot make a cluster")
    ray_bin = str(RAY_BIN if RAY_BIN.is_file() else shutil.which("ray"))
    # Token auth stays on: the head writes/reads ~/.ray/auth_token; the joining node and
    # the driver must be told to send it.
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="token")
    # Short paths: Ray puts Unix sockets under the temp dir (108-byte limit).
    t_head = tempfile.mkdtemp(prefix="slmf-rh-", dir="/tmp")
    t_work = tempfile.mkdtemp(prefix="slmf-rw-", dir="/tmp")
    port = _free_port()
    common = ["--num-cpus=1", "--node-ip-address=127.0.0.1", "--disable-usage-stats"]
    try:
        head = subprocess.run([ray_bin, "start", "--head", f"--port={port}", f"--temp-dir={t_head}",
                               "--include-dashboard=false", *common],
                              capture_output=True, text=True, env=env, timeout=180)
        assert head.returncode == 0, f"ray start --head failed:\n{head.stdout[-2000:]}\n{head.stderr[-2000:]}"
        work = subprocess.run([ray_bin, "start", f"--address=127.0.0.1:{port}", f"--temp-dir={t_work}", *common],
                              capture_output=True, text=True, env=env, timeout=180)
        assert work.returncode == 0, f"ray start --address failed:\n{work.stdout[-2000:]}\n{work.stderr[-2000:]}"
        yield f"127.0.0.1:{port}"
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        _stop_mine([t_head, t_work])
        shutil.rmtree(t_head, ignore_errors=True)
        shutil.rmtree(t_work, ignore_errors=True)


def _shrink_corpus(cfg, generic_docs: int, keep_domains: tuple[str, ...]) -> None:
    """Keep the test short on 2 cores: fewer generic documents, two domains."""
    gen = cfg.corpus_dir / "generic" / "train.parquet"
    pq.write_table(pq.read_table(gen).slice(0, generic_docs), gen)
    for d in (cfg.corpus_dir / "domains").iterdir():
        if d.name not in keep_domains:
            shutil.rmtree(d)


def _expected_windows(cfg) -> int:
    from slmfactory.platform.clusters import corpus_inputs
    from slmfactory.platform.tokenizer import ensure_tokenizer, load_tokenizer

    tok = load_tokenizer(ensure_tokenizer(cfg))
    w = cfg.cluster.window_tokens
    n = 0
    for part, _, path in corpus_inputs(cfg):
        if part != "generic":
            continue  # in-domain windows live with their own assignment stage
        for ids in tok(pq.read_table(path).column("text").to_pylist(), add_special_tokens=False)["input_ids"]:
            n += -(-len(ids) // w)
    return n


@pytest.mark.timeout(900)
def test_pipeline_on_two_local_nodes_matches_single_node(two_node_cluster, tiny_root, tmp_path):
    import ray

    from slmfactory.platform.clusters import run_clustering
    from slmfactory.platform.config import load_config
    from slmfactory.platform.embed import encode, load_minilm
    from slmfactory.platform.runtime import init_ray
    from slmfactory.platform.tokenizer import ensure_tokenizer, load_tokenizer

    work = tmp_path / "two"
    shutil.copytree(tiny_root, work)
    # One embedding actor of half a CPU: the other node keeps a whole CPU, so a task
    # that asks 1 CPU (some Ray Data internals do, whatever we pass) can always run.
    cfg = load_config(TINY, {"workdir": str(work), "cluster.embed_actors": 1})
    _shrink_corpus(cfg, generic_docs=30, keep_domains=("legal", "religion"))

    init_ray(address=two_node_cluster)
    alive = [n for n in ray.nodes() if n["Alive"]]
    assert len(alive) == 2 and sum(n["Resources"].get("CPU", 0) for n in alive) == 2
    t0 = time.perf_counter()
    cl = run_clustering(cfg, progress=False)
    elapsed = time.perf_counter() - t0
    assert ray.is_initialized(), "run_clustering must not shut down a cluster it joined"
    ray.shutdown()

    # Complete: every window of every document, once, with a valid cluster.
    t = pads.dataset(str(cl.windows_dir), format="parquet").to_table(
        columns=["window_id", "part", "tokens", "cluster"])
    assert t.num_rows == _expected_windows(cfg) == cl.meta["windows"]
    assert len(set(t.column("window_id").to_pylist())) == t.num_rows
    cluster = t.column("cluster").to_numpy()
    assert ((cluster >= 0) & (cluster < cl.k)).all()

    # Consistent: in-process MiniLM + nearest centroid gives the stored cluster.
    rng = np.random.default_rng(0)
    pick = np.sort(rng.choice(t.num_rows, size=min(40, t.num_rows), replace=False))
    tok = load_tokenizer(ensure_tokenizer(cfg))
    texts = tok.batch_decode([t.column("tokens")[int(i)].as_py() for i in pick], skip_special_tokens=True)
    emb = encode(load_minilm("cpu"), texts, 32)
    again = np.argmax(emb @ cl.centroids.T, axis=1)
    assert (again == cluster[pick]).mean() >= 0.9

    # Same result on one node: copy the cached embeddings into a fresh workdir so the
    # single-node run redoes sample, k-means, assignment and split (not the embedding).
    single_root = tmp_path / "single"
    shutil.copytree(work, single_root, ignore=shutil.ignore_patterns("k*-*"))
    cfg1 = cfg.replace(workdir=str(single_root), **{"cluster.embed_actors": 1})
    cl1 = run_clustering(cfg1, progress=False)  # local Ray, shut down on return
    assert not ray.is_initialized()
    assert cl1.key == cl.key and cl1.domains_key == cl.domains_key
    np.testing.assert_allclose(cl1.centroids, cl.centroids, atol=1e-5)
    for part in cl.parts:
        np.testing.assert_array_equal(cl1.counts(part), cl.counts(part))
    print(f"two-node clustering of {t.num_rows} windows: {elapsed:.1f}s")
