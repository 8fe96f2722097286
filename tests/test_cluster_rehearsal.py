"""The cluster its users share, rehearsed on this machine (``make cluster-test``): a two-node
Ray cluster on loopback (``ray start --head`` with the dashboard, then ``ray start --address``;
separate temp dirs, one CPU each, token authentication on), its GCS backed by an external Redis
(GCS fault tolerance), and one MLflow tracking server on a real PostgreSQL, as
docs/shared-cluster.md deploys them. Sweeps are submitted with ``ray job submit``; the workdir stands
in for the cluster's shared storage (both nodes see the same disk here).

- two users' sweeps submitted at once, both logging to the one server: every trial is one
  run, none lost or duplicated, each report reads back only its own sweep's runs;
- the tracking server killed in the middle of a sweep (after its first trial's run is logged)
  and started again once the sweep has noticed: the sweep waits, retries its logging and ends
  with every run present, the finished trial neither rerun nor logged twice;
- the GCS process killed under a Serve application: every request sent while it is down is
  answered, and the cluster recovers its state from Redis when it is back.

What decides each outcome is chosen by the test (the kill after N runs exist, the restart
after the sweep's retry line), never a sleep. The servers are Debian's ``postgresql`` and
``redis-server`` (``make services`` installs them), each started here in a temp dir on a
free loopback port and stopped after.
"""

from __future__ import annotations

import collections
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.local_cluster import (
    RAY_BIN,
    Cluster,
    MlflowServer,
    Redis,
    free_port,
    postgres_server,
    ray_cluster,
    ray_env,
    redis_server,
)

pytestmark = [pytest.mark.ray, pytest.mark.server, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "configs" / "sweep-tiny.yaml"
TINY = REPO / "configs" / "tiny.yaml"
DOMAINS = ["biomedical", "legal"]
RETRY_LINE = "[tracking] MLflow server not answering"


@dataclass
class Shared:
    cluster: Cluster
    mlflow: MlflowServer
    redis: Redis
    work: Path
    out: Path


@pytest.fixture(scope="module")
def shared(tiny_root, tmp_path_factory):
    root = tmp_path_factory.mktemp("shared-cluster")
    work = root / "shared"
    shutil.copytree(tiny_root, work)
    with postgres_server() as database, redis_server() as redis:
        server = MlflowServer(database, root / "mlflow-artifacts", root / "mlflow-server.log")
        server.start()
        try:
            with ray_cluster(dashboard=True, redis=redis) as cluster:
                yield Shared(cluster, server, redis, work, root)
        finally:
            server.stop()


def _ray(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(RAY_BIN), *args], capture_output=True, text=True, timeout=timeout, env=ray_env())


def _overrides(s: Shared, *extra: str) -> list[str]:
    return [f"workdir={s.work}", f"tracking.uri={s.mlflow.uri}", *extra]


def _submit(s: Shared, submission_id: str, overrides: list[str]) -> None:
    """``ray job submit --no-wait`` of ``slmfactory sweep`` with ``overrides``."""
    entrypoint = [sys.executable, "-m", "slmfactory.cli", "sweep", "-c", str(RECIPE),
                  *[a for o in overrides for a in ("--set", o)]]
    # The head's job agent starts a few seconds after `ray start` returns: until then the
    # dashboard answers "No available agent to submit job, please try again later".
    deadline = time.time() + 120
    while True:
        r = _ray("job", "submit", "--address", s.cluster.dashboard, "--no-wait", "--submission-id", submission_id,
                 "--", *entrypoint)
        if r.returncode == 0 or "No available agent" not in r.stderr or time.time() > deadline:
            break
        time.sleep(3)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]


def _wait_job(s: Shared, submission_id: str, timeout: float) -> str:
    """Wait for the job to end; assert it succeeded; return its logs."""
    deadline, status = time.time() + timeout, ""
    while time.time() < deadline:
        status = _ray("job", "status", "--address", s.cluster.dashboard, submission_id).stdout
        # `ray job status` ends with "Job 'ID' succeeded" (or failed/stopped).
        if re.search(rf"job '{submission_id}' (succeeded|failed|stopped)", status.lower()):
            break
        time.sleep(3)
    logs = _ray("job", "logs", "--address", s.cluster.dashboard, submission_id).stdout
    assert f"job '{submission_id}' succeeded" in status.lower(), f"{status}\n--- job logs ---\n{logs[-5000:]}"
    return logs


def _client(s: Shared):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=s.mlflow.uri)


def _runs(s: Shared, sweep: str) -> tuple[list, list]:
    """(the sweep's trial runs, its parent runs): every run of experiment slmfactory-<sweep>."""
    client = _client(s)
    exp = client.get_experiment_by_name(f"slmfactory-{sweep}")
    assert exp is not None, sweep
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    trials = [r for r in runs if "slmfactory.trial" in r.data.tags]
    parents = [r for r in runs if "slmfactory.sweep" in r.data.tags]
    assert len(trials) + len(parents) == len(runs), f"{sweep}: runs that are neither a trial nor the sweep"
    return trials, parents


def _check_sweep(s: Shared, sweep: str, strategy: str, trials_expected: int) -> list:
    """Every trial one finished run (one per trial key, nested under the one finished sweep
    run), perplexity and costs logged, one registered model version per domain; returns them."""
    from slmfactory.platform.config import load_config

    trials, parents = _runs(s, sweep)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED", [p.info.status for p in parents]
    keys = collections.Counter(r.data.tags["slmfactory.trial"] for r in trials)
    assert len(keys) == trials_expected and set(keys.values()) == {1}, f"{sweep}: runs per trial key {keys}"
    assert sorted(r.data.tags["domain"] for r in trials) == DOMAINS
    vocab = load_config(RECIPE, {"workdir": str(s.work)}).tokenizer.vocab_size
    for r in trials:
        assert r.info.status == "FINISHED" and r.data.tags["strategy"] == strategy
        assert r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        d = r.data.tags["domain"]
        assert 1 < r.data.metrics[f"ppl/{d}"] < vocab
        assert r.data.metrics["cost/spec_flops"] > 0
    client = _client(s)
    for d in DOMAINS:  # the registry: one version per trial, never two from a retried call
        versions = client.search_model_versions(f"name = 'slmfactory-{sweep}-{d}'")
        assert len(versions) == 1, (sweep, d, [v.version for v in versions])
    return trials


def _report_strategies(s: Shared, sweep: str) -> subprocess.Popen:
    """``slmfactory report`` of one sweep, started (the caller reads its table)."""
    cmd = [sys.executable, "-m", "slmfactory.cli", "report", "-c", str(RECIPE), "--out", str(s.out / f"report-{sweep}"),
           *[a for o in _overrides(s, f"sweep.name={sweep}") for a in ("--set", o)]]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _report_strategies_listed(report_md: str) -> list[str]:
    """The ``strategy`` cell of every row of every table of the report that has that column."""
    found, column = [], None
    for line in report_md.splitlines():
        if not line.startswith("|"):
            column = None
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if column is None:  # a table's header row
            column = cells.index("strategy") if "strategy" in cells else -1
        elif column >= 0 and not set(cells[0]) <= set("-:"):
            found.append(cells[column])
    return found


@pytest.mark.timeout(900)
def test_two_sweeps_at_once_each_log_every_trial_once_to_one_postgres_backed_server(shared):
    s = shared
    nodes = _ray("list", "nodes", "--address", s.cluster.dashboard, "--format", "json")
    assert nodes.returncode == 0, nodes.stderr[-2000:]
    assert nodes.stdout.count('"state": "ALIVE"') == 2, nodes.stdout[-2000:]
    # Two users, one shared workdir and one tracking server: slm (one generic phase shared by
    # its two trials) and slm-nopt (no generic phase), each on two domains.
    sweeps = {"alpha": "slm", "beta": "slm-nopt"}
    for sweep, strategy in sweeps.items():
        _submit(s, f"sweep-{sweep}", _overrides(s, f"sweep.name={sweep}", f"sweep.strategies=[{strategy}]",
                                                f"sweep.domains=[{','.join(DOMAINS)}]"))
    for sweep in sweeps:
        logs = _wait_job(s, f"sweep-{sweep}", timeout=720)
        assert "[sweep] 2 trials on Ray Tune" in logs and "(2 CPUs)" in logs, logs[-3000:]
        assert s.mlflow.uri in logs, "the sweep logs to the shared server"

    counts = {}
    for sweep, strategy in sweeps.items():
        counts[sweep] = len(_check_sweep(s, sweep, strategy, trials_expected=2))
    # The two sweeps' experiments hold their runs and no other (2 trials + 1 sweep run each);
    # the server is shared with this module's other tests, whose experiments are their own.
    client = _client(s)
    ours = [client.get_experiment_by_name(f"slmfactory-{sweep}").experiment_id for sweep in sweeps]
    everything = client.search_runs(ours, max_results=1000)
    assert len(everything) == 6, [r.info.run_name for r in everything]
    print(f"\n[shared cluster] concurrent sweeps: trial runs {counts}, {len(everything)} runs in their experiments")
    # One generic phase for slm's two trials, on shared storage.
    assert len(list((s.work / "train").glob("pretrain-slm-*/stage.json"))) == 1

    # Each user's report reads back its own sweep's runs only.
    reports = {sweep: _report_strategies(s, sweep) for sweep in sweeps}
    for sweep, proc in reports.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        rows = _report_strategies_listed((s.out / f"report-{sweep}" / "report.md").read_text())
        assert rows and {r.split(" ")[0] for r in rows} == {sweeps[sweep]}, (sweep, rows)


@pytest.mark.timeout(900)
def test_a_tracking_server_restart_mid_sweep_loses_no_run_and_reruns_no_trial(shared):
    s = shared
    sid = "sweep-gamma"
    # Trials one at a time (max_concurrent 1), with their own specialisation budget (new
    # stages to train): once the first trial's run is logged, the driver sends nothing until
    # the second has trained (30 steps: seconds), so the kill below falls between two calls.
    _submit(s, sid, _overrides(s, "sweep.name=gamma", "sweep.strategies=[slm]", f"sweep.domains=[{','.join(DOMAINS)}]",
                               "sweep.max_concurrent=1", "finetune.max_tokens=15360"))
    client = _client(s)

    def finished_trial_runs():
        exp = client.get_experiment_by_name("slmfactory-gamma")
        if exp is None:
            return []
        return client.search_runs([exp.experiment_id], "tags.`slmfactory.trial` != '' and attributes.status = 'FINISHED'")

    deadline = time.time() + 600
    while not (first := finished_trial_runs()):
        assert time.time() < deadline, "no trial of the sweep was logged"
        time.sleep(0.2)
    (before,) = first
    t_kill = time.time()
    s.mlflow.kill()
    # The sweep notices when its next trial ends and tries to log it: MLflow's client retries.
    log_path, seen = None, ""
    while RETRY_LINE not in seen:
        assert time.time() < t_kill + 600, f"the sweep never retried its logging\n{seen[-3000:]}"
        log_path = log_path or s.cluster.driver_log(sid)
        seen = log_path.read_text(errors="replace") if log_path else ""
        time.sleep(0.5)
    t_noticed = time.time()
    s.mlflow.start()
    t_back = time.time()
    logs = _wait_job(s, sid, timeout=600)
    t_done = time.time()

    trials = _check_sweep(s, "gamma", "slm", trials_expected=2)
    again = next(r for r in trials if r.info.run_id == before.info.run_id)
    assert again.info.start_time == before.info.start_time and again.info.end_time == before.info.end_time
    # Each trial started once: the finished trial was not rerun, the waiting one not restarted.
    started = collections.Counter(re.findall(r"\| started (\S+)", logs))
    assert len(started) == 2 and set(started.values()) == {1}, started
    retries = logs.count(RETRY_LINE)
    assert retries >= 1 and "TrackingUnavailable" not in logs
    print(f"\n[shared cluster] tracking-server restart: killed after 1 of 2 runs; the sweep retried "
          f"{t_noticed - t_kill:.0f} s later; server down {t_back - t_kill:.0f} s; {retries} retry lines; "
          f"sweep done {t_done - t_back:.0f} s after the restart; {len(trials)} of 2 runs present, each once")


def _export_model(work: Path, domain: str) -> Path:
    """A tiny random Llama of the tiny recipe, exported as the platform exports models."""
    import torch

    from slmfactory.models.train.phases import export_hf, load_lm
    from slmfactory.platform.config import load_config

    cfg = load_config(TINY, {"workdir": str(work)})
    torch.manual_seed(0)
    out = work / "gcs-models" / domain
    export_hf(cfg, load_lm(cfg, "slm", None).eval(), out, {"domain": domain, "strategy": "slm", "params": 1,
                                                             "test_ppl": 1.0})
    return out.parent


def _complete(url: str) -> int:
    body = json.dumps({"model": "legal", "prompt": "The licence", "max_tokens": 2}).encode()
    req = urllib.request.Request(f"{url}/v1/completions", data=body, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return 0


def _driver(s: Shared, code: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """A short-lived driver process connected to the cluster."""
    prog = f"import ray\nray.init(address={s.cluster.address!r})\n" + code
    return subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True, timeout=timeout,
                          env=ray_env(), cwd=REPO)


@pytest.mark.timeout(600)
def test_serve_answers_while_the_gcs_is_down_and_the_cluster_recovers_from_redis(shared):
    s = shared
    models = _export_model(s.work, "legal")
    port = free_port()
    args = {"config": str(TINY), "set": [f"workdir={s.work}", "serving.replica_cpus=0.5"], "models": str(models)}
    # Deployed by a driver that then exits, as `serve deploy` or a RayService does: the
    # application lives in the cluster, not in a client process.
    deploy = _driver(s, "from ray import serve\nfrom slmfactory.serving.app import build_app\n"
                        f"serve.start(http_options={{'host': '127.0.0.1', 'port': {port}}})\n"
                        f"serve.run(build_app({args!r}), name='slmfactory', route_prefix='/')\n")
    assert deploy.returncode == 0, deploy.stderr[-3000:]
    url = f"http://127.0.0.1:{port}"
    assert [_complete(url) for _ in range(3)] == [200] * 3

    gcs_port = int(s.cluster.address.rsplit(":", 1)[1])
    restart = s.cluster.kill_gcs()
    with pytest.raises(OSError):  # the GCS is down: nothing listens on its port
        socket.create_connection(("127.0.0.1", gcs_port), timeout=2).close()
    during = [_complete(url) for _ in range(20)]
    restart()
    answered = sum(code == 200 for code in during)
    print(f"\n[shared cluster] Serve availability while the GCS was down: {answered}/{len(during)} "
          f"requests answered ({100 * answered / len(during):.0f}%)")
    assert during == [200] * len(during), during

    # Back: a new driver connects and finds the cluster's state in the restarted GCS (recovered
    # from Redis: without it, a restarted GCS knows no session, node or actor): both nodes,
    # the Serve application (its controller is a named actor), and new work runs.
    check = _driver(s, "from ray import serve\n"
                       "@ray.remote(num_cpus=0.1)\n"
                       "def answer():\n"
                       "    return 42\n"
                       "alive = sum(n['Alive'] for n in ray.nodes())\n"
                       "status = serve.status().applications['slmfactory'].status\n"
                       "print('RECOVERED', alive, getattr(status, 'value', status), ray.get(answer.remote(), timeout=120))\n",
                    timeout=300)
    assert check.returncode == 0, check.stderr[-3000:]
    assert "RECOVERED 2 RUNNING 42" in check.stdout, check.stdout[-2000:] + check.stderr[-2000:]
    assert [_complete(url) for _ in range(3)] == [200] * 3
