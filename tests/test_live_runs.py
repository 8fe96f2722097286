"""One trial, one MLflow run, whatever fails; and runs that are live while their trials train.

On a real ``mlflow server`` behind :class:`tests.local_cluster.TrackingProxy`, a proxy that
loses the reply to a request the server has already carried out (MLflow's client retries
it) or holds a reply until the test has looked at the server: the test decides where the
client waits, so nothing here depends on timing.
"""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.local_cluster import MlflowServer, TrackingProxy

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "configs" / "sweep-tiny.yaml"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow-server")
    s = MlflowServer(f"sqlite:///{root / 'mlflow.db'}", root / "artifacts", root / "server.log")
    s.start()
    try:
        yield s
    finally:
        s.stop()


def _ends(suffix: str):
    return lambda method, path, body: method == "POST" and path.split("?")[0].endswith(suffix)


@pytest.mark.server
@pytest.mark.timeout(300)
def test_a_lost_reply_to_a_create_leaves_one_experiment_run_and_model_version(server):
    """The server creates the experiment, the run and the model version, the client never
    hears back and MLflow's client sends the request again: still one of each."""
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    from slmfactory.platform.tracking import (
        DUPLICATE_TAG, MlflowTracker, client_for, ensure_experiment, find_or_create_run, register_model)

    direct = MlflowClient(tracking_uri=server.uri)
    with TrackingProxy(server.uri) as proxy:
        for what in ("/experiments/create", "/runs/create", "/model-versions/create"):
            proxy.drop(_ends(what))
        client = client_for(proxy.uri)
        exp_id = ensure_experiment(client, proxy.uri, "lost-replies")
        run = find_or_create_run(client, exp_id, "slmfactory.trial", "k1", "trial k1", {"domain": "legal"})
        tracker = MlflowTracker(proxy.uri, "lost-replies", "trial k1", run_id=run.info.run_id)
        register_model(tracker, "lost-replies-legal", "model")
        # The same trial again (a retried attempt, a resumed sweep): its run, no new version.
        again = find_or_create_run(client, exp_id, "slmfactory.trial", "k1", "trial k1")
        register_model(tracker, "lost-replies-legal", "model")
    assert proxy.dropped == 3  # each create's reply was lost once, and retried
    assert [e.name for e in direct.search_experiments(filter_string="name = 'lost-replies'")] == ["lost-replies"]
    active = direct.search_runs([exp_id], "tags.`slmfactory.trial` = 'k1'")
    assert [r.info.run_id for r in active] == [run.info.run_id] == [again.info.run_id]
    assert active[0].data.tags["domain"] == "legal"
    # The retry did create a second run: it is deleted, pointing at the one kept.
    (dup,) = direct.search_runs([exp_id], "tags.`slmfactory.trial` = 'k1'", run_view_type=ViewType.DELETED_ONLY)
    assert dup.info.run_id != run.info.run_id and dup.data.tags[DUPLICATE_TAG] == run.info.run_id
    versions = direct.search_model_versions("name = 'lost-replies-legal'")
    assert [v.run_id for v in versions] == [run.info.run_id]


def test_a_live_run_sends_its_curve_in_batches_and_pickles_without_its_points(tmp_path):
    """The first point goes at once (a new run shows its curve from the start), the next
    ones wait for the batch (one ``log_batch`` per flush, here only the explicit one); a
    pickled copy (what a Ray Train phase ships to its workers) logs to the same run and
    carries none of the buffered points."""
    from slmfactory.platform.tracking import LiveRunTracker, client_for, ensure_experiment, find_or_create_run

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = client_for(uri)
    run = find_or_create_run(client, ensure_experiment(client, uri, "live"), "slmfactory.trial", "k", "k")
    run_id, name = run.info.run_id, "finetune/slm/legal/train_loss"

    def steps() -> list[int]:
        return sorted(m.step for m in client.get_metric_history(run_id, name))

    live = LiveRunTracker(uri, run_id, flush_seconds=3600)
    for step in range(5):
        live.log_metrics({name: 1.0 / (step + 1)}, step=step)
    assert steps() == [0]
    copy = pickle.loads(pickle.dumps(live))
    copy.flush()
    assert steps() == [0]  # the copy held none of the original's points
    live.flush()
    assert steps() == [0, 1, 2, 3, 4]
    copy.log_metrics({name: 0.1}, step=5)
    copy.flush()
    assert steps() == [0, 1, 2, 3, 4, 5]  # the copy logs to the same run


@pytest.mark.ray
@pytest.mark.server
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_sweep_through_a_lossy_proxy_has_live_runs_and_one_run_per_trial(server, tiny_root, tmp_path):
    """A sweep of two trials logging through the proxy: the reply to the first trial's run
    creation is lost (the server made the run, the trial's process retries), and the reply
    to the first curve point a trainer streams is held while the test reads the run from the
    server directly: RUNNING, its params there, a curve point there, MLflow's system metrics
    (on by default) arriving. After the sweep: each trial has exactly one run, FINISHED, its
    live curve and the record's; none is RUNNING."""
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    work = tmp_path / "work"
    shutil.copytree(tiny_root, work)
    experiment = "slmfactory-sweep-tiny"
    direct = MlflowClient(tracking_uri=server.uri)

    def live_curve(method, path, body):  # a point a trainer streamed (phase-qualified name)
        return _ends("/runs/log-batch")(method, path, body) and any(
            m.get("key", "").startswith("finetune/slm-nopt/") for m in body.get("metrics", []))

    def trial_run_create(method, path, body):
        return _ends("/runs/create")(method, path, body) and any(
            t.get("key") == "slmfactory.trial" for t in body.get("tags", []))

    with TrackingProxy(server.uri) as proxy:
        proxy.drop(trial_run_create)
        proxy.hold(live_curve)
        args = ["sweep", "-c", str(RECIPE), "--set", f"workdir={work}", "--set", f"tracking.uri={proxy.uri}",
                "--set", "sweep.strategies=[slm-nopt]", "--set", "sweep.domains=[legal,biomedical]",
                "--set", "sweep.max_concurrent=1"]
        driver = subprocess.Popen([sys.executable, "-m", "slmfactory.cli", *args], cwd=REPO, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True,
                                  env={**os.environ, "SLMFACTORY_LAUNCHER": "local",
                                       "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1"})
        try:
            while not proxy.held.wait(1):
                assert driver.poll() is None, driver.stdout.read()[-4000:]
            # The trial's process waits for this reply: the trial is training, at its first point.
            run_id = proxy.held_body["run_id"]
            run = direct.get_run(run_id)
            assert run.info.status == "RUNNING"
            assert run.data.params["strategy.name"] == "slm-nopt"
            assert run.data.params["data.domain"] == run.data.tags["domain"] in ("legal", "biomedical")
            assert run.data.tags["mlflow.parentRunId"] and run.data.tags["slmfactory.trial"]
            point = proxy.held_body["metrics"][0]["key"]
            assert len(direct.get_metric_history(run_id, point)) >= 1
            assert "ppl_macro" not in run.data.metrics  # not finished: no result yet
            # MLflow's system metrics (on by default; sampled every second here) arrive while it trains: its
            # trainer stays blocked until the release, so this waits for the monitor's thread only.
            deadline = time.monotonic() + 120
            while not any(k.startswith("system/") for k in direct.get_run(run_id).data.metrics):
                assert time.monotonic() < deadline, "no system metrics on the running trial's run"
                time.sleep(0.5)
            proxy.release()
            out, _ = driver.communicate(timeout=600)
        finally:
            if driver.poll() is None:
                driver.kill()
                driver.wait(timeout=60)
    assert driver.returncode == 0, out[-4000:]
    assert proxy.dropped == 1  # the trial's process sent its run's creation twice
    exp_id = direct.get_experiment_by_name(experiment).experiment_id
    runs = direct.search_runs([exp_id], "tags.`slmfactory.trial` != ''")
    keys = [r.data.tags["slmfactory.trial"] for r in runs]
    assert len(runs) == 2 and len(set(keys)) == 2, keys  # one run per trial
    assert {r.info.status for r in runs} == {"FINISHED"}
    assert not direct.search_runs([exp_id], "attributes.status = 'RUNNING'")
    # The lost reply did make a second run: deleted, pointing at the trial's run.
    (dup,) = direct.search_runs([exp_id], "tags.`slmfactory.trial` != ''", run_view_type=ViewType.DELETED_ONLY)
    assert dup.data.tags["slmfactory.duplicate_of"] in {r.info.run_id for r in runs}
    for r in runs:
        d = r.data.tags["domain"]
        assert "ppl_macro" in r.data.metrics
        live = direct.get_metric_history(r.info.run_id, f"finetune/slm-nopt/{d}/valid_nll")
        kept = direct.get_metric_history(r.info.run_id, "finetune/valid_nll")
        assert len(live) >= 2 and sorted(m.step for m in kept) == sorted({m.step for m in kept})
        assert {m.step for m in kept} == {m.step for m in live}
    assert run_id in {r.info.run_id for r in runs}
