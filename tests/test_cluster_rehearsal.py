"""The cluster user's path, rehearsed on this machine (``make cluster-test``): a two-node
Ray cluster on loopback (``ray start --head`` with the dashboard, then ``ray start
--address``; separate temp dirs, one CPU each, token authentication on), a tiny sweep
submitted with ``ray job submit``, its MLflow results checked, the cluster torn down.

The commands are the README's "Run on a cluster" ones; only the addresses differ. The
workdir stands in for the cluster's shared storage (both nodes see the same disk here).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.local_cluster import RAY_BIN, local_cluster

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "configs" / "sweep-tiny.yaml"


def _ray(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([str(RAY_BIN), *args], capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.timeout(900)
def test_a_sweep_submitted_with_ray_job_submit_runs_on_two_nodes(tiny_root, tmp_path):
    from mlflow.tracking import MlflowClient

    from slmfactory.platform.config import load_config

    work = tmp_path / "shared"
    shutil.copytree(tiny_root, work)
    # One strategy on two domains: two trials, one per node's CPU, sharing one generic phase.
    overrides = [f"workdir={work}", "sweep.strategies=[slm]", "sweep.domains=[legal,biomedical]"]
    entrypoint = " ".join([shlex.quote(sys.executable), "-m", "slmfactory.cli", "sweep", "-c", str(RECIPE),
                           *[a for o in overrides for a in ("--set", shlex.quote(o))]])
    with local_cluster(dashboard=True) as (_, dashboard):
        nodes = _ray("list", "nodes", "--address", dashboard, "--format", "json")
        assert nodes.returncode == 0, nodes.stderr[-2000:]
        assert nodes.stdout.count('"state": "ALIVE"') == 2, nodes.stdout[-2000:]
        # The head's job agent starts a few seconds after `ray start` returns: until then the
        # dashboard answers "No available agent to submit job, please try again later".
        deadline = time.time() + 120
        while True:
            submit = _ray("job", "submit", "--address", dashboard, "--no-wait",
                          "--submission-id", "slmf-rehearsal", "--", *shlex.split(entrypoint))
            if submit.returncode == 0 or "No available agent" not in submit.stderr or time.time() > deadline:
                break
            time.sleep(3)
        assert submit.returncode == 0, submit.stdout[-2000:] + submit.stderr[-2000:]
        deadline, status = time.time() + 780, ""
        while time.time() < deadline:
            status = _ray("job", "status", "--address", dashboard, "slmf-rehearsal").stdout
            # `ray job status` ends with "Job 'slmf-rehearsal' succeeded" (or failed/stopped).
            if re.search(r"job 'slmf-rehearsal' (succeeded|failed|stopped)", status.lower()):
                break
            time.sleep(5)
        logs = _ray("job", "logs", "--address", dashboard, "slmf-rehearsal").stdout
        assert "job 'slmf-rehearsal' succeeded" in status.lower(), f"{status}\n--- job logs ---\n{logs[-4000:]}"
    assert "[sweep] 2 trials on Ray Tune" in logs and "(2 CPUs)" in logs, logs[-3000:]

    # The results a person browses: one finished MLflow run per trial, with perplexity and cost.
    cfg = load_config(RECIPE, {"workdir": str(work)})
    client = MlflowClient(tracking_uri=cfg.tracking_uri)
    exp = client.get_experiment_by_name("slmfactory-sweep-tiny")
    assert exp is not None
    runs = client.search_runs([exp.experiment_id], filter_string="tags.`slmfactory.trial` != ''")
    assert sorted(r.data.tags["domain"] for r in runs) == ["biomedical", "legal"]
    for r in runs:
        assert r.info.status == "FINISHED"
        d = r.data.tags["domain"]
        assert 1 < r.data.metrics[f"ppl/{d}"] < cfg.tokenizer.vocab_size
        assert r.data.metrics["cost/spec_flops"] > 0 and r.data.metrics["cost/generic_flops"] > 0
    # One generic phase for both trials, on shared storage.
    assert len(list((work / "train").glob("pretrain-slm-*/stage.json"))) == 1
