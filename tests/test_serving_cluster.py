"""Serving as the RayService runs it, on the two-node loopback cluster: the head at zero CPUs
(it runs the Serve controller and proxy, never a replica), two replicas on the worker node,
the models in the registry of a real ``mlflow server`` reached over HTTP (artifacts proxied).

- The application builder only looks up which model serves each domain (nothing lands in
  the model cache when ``build_app`` returns); each replica downloads its model itself into
  its node's cache, and every replica answers.
- ``champion`` moved to another version while a client sends requests throughout: every
  replica serves the new version without a redeploy, and no request fails. The test knows
  the swap happened from each answer's ``slmfactory-model-version`` and
  ``slmfactory-replica`` headers (and the new version's own weights score the input
  differently), never from a sleep.
- One scrape of the worker node's Ray metrics export sees the requests of both replicas,
  each counted under its replica tag, equal to what the client saw each replica answer
  (polled with a bound: Ray exports every second here).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from tests.local_cluster import MlflowServer, ray_cluster, ray_env

pytestmark = [pytest.mark.ray, pytest.mark.server, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"
EXPERIMENT = "cluster-serving"
NAME = f"{EXPERIMENT}-legal"
INPUT = "The licence grants you the right"
def _register(work: Path, uri: str, seed: int) -> None:
    """A tiny random Llama (weights from ``seed``) logged to a run and registered as the next
    version of ``NAME``, as a sweep registers its trials' models."""
    import torch

    from slmfactory.models.train.phases import export_hf, load_lm
    from slmfactory.platform.config import load_config
    from slmfactory.platform.tracking import MlflowTracker, register_model

    cfg = load_config(TINY, {"workdir": str(work)})
    model = load_lm(cfg, "slm", None).eval()  # initialised from the recipe's seed: the same for both
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for w in model.parameters():
            w.add_((torch.randn(w.shape, generator=g) * 0.05).to(w.dtype))
    folder = work / f"export-{seed}" / "legal"
    export_hf(cfg, model, folder, {"domain": "legal", "strategy": "slm", "params": 1, "test_ppl": 1.0})
    tracker = MlflowTracker(uri, EXPERIMENT, f"seed-{seed}", {"domain": "legal", "strategy": "slm"})
    tracker.log_metrics({"params": 1, "ppl/legal": 2.0 + seed})
    tracker.log_artifact(folder, "model")
    register_model(tracker, NAME, "model")
    tracker.close()


DEPLOY = """
import json, sys
import ray
from ray import serve
from slmfactory.serving.app import build_app

from tests.local_cluster import free_port

args, cache, port = json.loads(sys.argv[1]), sys.argv[2], int(sys.argv[3])
ray.init(address=sys.argv[4])
nodes = [n for n in ray.nodes() if n["Alive"]]
app = build_app(args)
import pathlib
left = sorted(str(p) for p in pathlib.Path(cache).rglob("*")) if pathlib.Path(cache).exists() else []
# The first deploy picks the proxy's port here, just before Serve binds it (a port picked
# before the cluster started can be taken by then: any process's outgoing connection may
# get it); should it still be taken, Serve is shut down and another port tried.
for attempt in range(3 if port == 0 else 1):
    chosen = port or free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": chosen})
        if sys.argv[5] == "replace":  # the old replicas' CPUs freed first: the worker has one
            serve.delete("slmfactory")
        serve.run(app, name="slmfactory", route_prefix="/")
        break
    except Exception as e:
        if port or "Failed to bind" not in str(e) or attempt == 2:
            raise
        print(f"port {chosen} taken: another", flush=True)
        serve.shutdown()
print("DEPLOYED " + json.dumps({"port": chosen, "cpus": sorted(n["Resources"].get("CPU", 0) for n in nodes),
                                "cache_after_build": left,
                                "metrics_port": next(n["MetricsExportPort"] for n in nodes
                                                     if n["Resources"].get("CPU", 0) > 0)}))
"""
"""Deploys the app from a driver that then exits (as ``serve deploy`` and the RayService do):
the application lives in the cluster. A subprocess with the cluster's environment (token
authentication on), so this test process never joins Ray."""


@pytest.fixture(scope="module")
def served(tiny_root, tmp_path_factory):
    """(base URL, MLflow client, model cache, worker's metrics export port) of the app
    deployed from the registry's ``champion`` (version 1) on the cluster."""
    from mlflow.tracking import MlflowClient

    root = tmp_path_factory.mktemp("cluster-serving")
    work = root / "work"
    shutil.copytree(tiny_root, work)
    server = MlflowServer(f"sqlite:///{root / 'mlflow.db'}", root / "artifacts", root / "mlflow.log")
    server.start()
    try:
        for seed in (0, 1):
            _register(work, server.uri, seed)
        client = MlflowClient(server.uri)
        client.set_registered_model_alias(NAME, "champion", "1")
        cache = root / "model-cache"
        args = {"config": str(TINY), "from_registry": "champion", "experiment": EXPERIMENT, "registry_poll_s": 1,
                "model_cache": str(cache),
                "set": [f"workdir={work}", f"tracking.uri={server.uri}", "serving.replica_cpus=0.5",
                        "serving.min_replicas=2", "serving.max_replicas=2"]}
        port = 0  # picked by the first deploy (DEPLOY)
        # Ray's metrics reported every second (default 10 s): the scrape below waits less.
        env = {"RAY_metrics_report_interval_ms": "1000"}
        with ray_cluster(head_cpus=0, env_vars=env) as cluster:
            def deploy(*sets: str, replace: bool = False) -> dict:
                nonlocal port
                app_args = {**args, "set": [*args["set"], *sets]}
                run = subprocess.run([sys.executable, "-c", DEPLOY, json.dumps(app_args), str(cache), str(port),
                                      cluster.address, "replace" if replace else "new"], capture_output=True,
                                     text=True, timeout=600, env={**ray_env(), **env}, cwd=REPO)
                line = next((ln for ln in run.stdout.splitlines() if ln.startswith("DEPLOYED ")), None)
                assert run.returncode == 0 and line, run.stdout[-3000:] + run.stderr[-5000:]
                facts = json.loads(line[len("DEPLOYED "):])
                port = facts["port"]
                return facts

            facts = deploy()
            assert facts["cpus"] == [0, 1], "the head has no CPU: the replicas run on the worker"
            # The builder looked the alias up and downloaded nothing: the replicas do.
            assert facts["cache_after_build"] == []
            yield f"http://127.0.0.1:{port}", client, cache, facts["metrics_port"], deploy
    finally:
        server.stop()


def _score(url: str) -> tuple[int, str, str, float | None]:
    """(status, model version header, replica header, NLL) of one ``/v1/score``."""
    body = json.dumps({"model": "legal", "input": INPUT}).encode()
    req = urllib.request.Request(f"{url}/v1/score", data=body, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            out = json.loads(r.read())
            return (r.status, r.headers.get("slmfactory-model-version", ""), r.headers.get("slmfactory-replica", ""),
                    out["data"][0]["nll"])
    except urllib.error.HTTPError as e:
        return e.code, "", e.headers.get("slmfactory-replica", ""), None
    except OSError:
        return 0, "", "", None


class ClientLoop:
    """Requests one after another, in a thread, from start to stop; every answer kept."""

    def __init__(self, url: str):
        self.url, self.answers, self.stop = url, [], threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            self.answers.append(_score(self.url))

    def wait_for(self, done, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not done(list(self.answers)):
            assert self.thread.is_alive() and time.monotonic() < deadline, \
                f"{what}: not within {timeout:.0f} s; answers {Counter((a[0], a[1], a[2]) for a in self.answers)}"
            time.sleep(0.2)


def _replicas_on(answers, version: str) -> set[str]:
    return {rep for status, v, rep, _ in answers if status == 200 and v == version}


@pytest.mark.timeout(900)
def test_replicas_on_the_worker_load_their_own_models_and_follow_the_champion(served):
    url, client, cache, _, _ = served
    v1, v2 = f"models:/{NAME}/1", f"models:/{NAME}/2"
    loop = ClientLoop(url)
    loop.thread.start()
    try:
        # Every replica answers, from version 1 (two replicas: the load balancer picks at
        # random, so both answer within a few requests).
        loop.wait_for(lambda a: len(_replicas_on(a, v1)) == 2, 300, "both replicas answering version 1")
        moved_at = len(loop.answers)
        client.set_registered_model_alias(NAME, "champion", "2")
        loop.wait_for(lambda a: len(_replicas_on(a[moved_at:], v2)) == 2, 300, "both replicas on version 2")
        seen = len(loop.answers)
        loop.wait_for(lambda a: len(a) >= seen + 10, 120, "ten more answers")
    finally:
        loop.stop.set()
        loop.thread.join(120)
    answers = loop.answers
    assert Counter(a[0] for a in answers) == {200: len(answers)}, "a request failed during the move"
    # Each replica, once on version 2, stays there (the client's requests are sequential).
    last = defaultdict(str)
    for _, version, replica, _ in answers:
        assert not (last[replica] == v2 and version == v1), f"replica {replica} went back to version 1"
        last[replica] = version
    assert set(last.values()) == {v2}
    # The versions are different models: each scores the input its own way, every time alike.
    nll = {v: {round(a[3], 5) for a in answers if a[1] == v} for v in (v1, v2)}
    assert len(nll[v1]) == len(nll[v2]) == 1 and nll[v1] != nll[v2], nll
    # Downloaded once per version into the node's cache, nothing half-written left beside.
    folder = cache / "registry" / NAME
    assert sorted(p.name for p in folder.iterdir() if not p.name.endswith(".lock")) == ["1", "2"]
    assert (folder / "2" / "slmfactory.json").is_file()
    print(f"\n[cluster serving] {len(answers)} requests, all 200; champion moved after {moved_at}; "
          f"replicas {sorted(last)} on version 2")


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
        return r.read().decode()


def _by_replica(text: str, name: str, **labels: str) -> dict[str, float]:
    """The samples of ``name`` with ``labels``, summed per ``replica`` tag."""
    out: dict[str, float] = defaultdict(float)
    for line in text.splitlines():
        m = re.match(rf"^{name}\{{(.*)\}} (\S+)$", line)
        if not m:
            continue
        tags = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
        if all(tags.get(k) == v for k, v in labels.items()):
            out[tags.get("replica", "")] += float(m.group(2))
    return dict(out)


@pytest.mark.timeout(600)
def test_one_scrape_of_rays_metrics_export_counts_every_replicas_requests(served):
    """What one scrape of the worker's Ray metrics export counts under each replica's tag
    grows by this test's own 200 answers from that replica (the module's other tests send
    requests too, in whatever order they run: they are in the count before)."""
    url, _, _, metrics_port, _ = served

    def requests_by_replica() -> tuple[str, dict[str, float]]:
        text = _scrape(metrics_port)
        return text, _by_replica(text, "ray_slmfactory_requests_total", domain="legal", route="score", status="200")

    # Settled: Ray exports every second here, so two scrapes 2.5 s apart that agree hold
    # every request answered before them.
    deadline = time.monotonic() + 60
    _, before = requests_by_replica()
    while True:
        time.sleep(2.5)
        _, again = requests_by_replica()
        if again == before:
            break
        assert time.monotonic() < deadline, "the exported request counts never settled"
        before = again
    answers = [_score(url) for _ in range(30)]
    assert {a[0] for a in answers} == {200}, Counter(a[0] for a in answers)
    expected = Counter(a[2] for a in answers)
    assert len(expected) == 2, expected  # two replicas answered (the load balancer picks at random)
    deadline = time.monotonic() + 120
    text, grown = "", {}
    while time.monotonic() < deadline:
        text, counted = requests_by_replica()
        grown = {r: counted.get(r, 0.0) - before.get(r, 0.0) for r in counted if counted.get(r, 0.0) != before.get(r, 0.0)}
        if grown == {r: float(n) for r, n in expected.items()}:
            break
        time.sleep(1)
    assert grown == {r: float(n) for r, n in expected.items()}, f"{grown} != {dict(expected)}\n{text[-3000:]}"
    latency = _by_replica(text, "ray_slmfactory_latency_seconds_count", domain="legal", route="score")
    assert all(latency.get(r, 0) > 0 for r in expected), latency


@pytest.mark.timeout(600)
def test_a_keys_rate_limit_holds_across_both_replicas(served):
    """``serving.rate_limit_rpm`` with two replicas: one set of buckets for the app (a named
    detached actor), so a key is granted its 6 requests a minute however the load balancer
    spreads them; counted per replica it would get up to 12. Both replicas refuse it once
    the shared bucket is empty. The bucket refills at 6 a minute (one per 10 s): the grants
    are bounded by the time the requests took, measured."""
    url, _, _, _, deploy = served
    deploy("serving.rate_limit_rpm=6", replace=True)
    try:
        t0 = time.monotonic()
        answers = []
        while not (len(answers) >= 20 and len({a[2] for a in answers if a[0] == 429}) == 2):
            assert time.monotonic() - t0 < 120, Counter((a[0], a[2]) for a in answers)
            answers.append(_score(url))
        elapsed = time.monotonic() - t0
    finally:
        deploy(replace=True)  # the module's app as the other tests expect it: no rate limit
    granted = sum(a[0] == 200 for a in answers)
    assert {a[0] for a in answers} == {200, 429}, Counter(a[0] for a in answers)
    assert 6 <= granted <= 6 + int(elapsed / 10), (granted, elapsed)
    assert [a[0] for a in answers[:6]] == [200] * 6  # a full bucket to start with
    print(f"\n[cluster serving] rate limit 6/min over 2 replicas: {granted} of {len(answers)} granted in "
          f"{elapsed:.1f} s; 429s from {len({a[2] for a in answers if a[0] == 429})} replicas")
