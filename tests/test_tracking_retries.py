"""A tracking server that stays down: MLflow's client retries each call (bounded by
MLFLOW_HTTP_REQUEST_MAX_RETRIES and _BACKOFF_FACTOR), the tracking client prints a line per
retry, and when the retries are spent the command fails with one line naming the server, the
bound and the variables that set it (tests/test_cluster_rehearsal.py has the server that comes
back: the sweep waits and loses nothing)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.local_cluster import free_port

REPO = Path(__file__).resolve().parents[1]


def test_retry_budget_follows_mlflows_variables(monkeypatch):
    from slmfactory.platform.tracking import retry_budget

    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", raising=False)
    # MLflow's defaults: 7 retries, factor 2: urllib3 waits 0, 4, 8, 16, 32, 64, 120 (capped) s.
    assert retry_budget() == (7, 2, 244.0)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    assert retry_budget() == (3, 1, 6.0)


def test_a_server_that_stays_down_fails_with_one_clear_error(tmp_path, monkeypatch, capsys):
    from slmfactory.platform.config import load_config
    from slmfactory.platform.errors import SlmFactoryError
    from slmfactory.platform.tracking import TrackingUnavailable
    from slmfactory.sweeps.records import ensure_sweep_run

    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    cfg = load_config(REPO / "configs" / "sweep-tiny.yaml", {"workdir": str(tmp_path), "tracking.uri": uri})
    # The first thing a sweep does with MLflow: its parent run.
    with pytest.raises(TrackingUnavailable) as e:
        ensure_sweep_run(cfg, "slmfactory-sweep-tiny", "sweep-tiny", "plan")
    # A user error: the CLI prints it as one line (no traceback) and exits 2.
    assert isinstance(e.value, SlmFactoryError) and "\n" not in str(e.value)
    message = str(e.value)
    assert message.startswith(f"MLflow tracking server {uri} could not be reached (")
    assert "after 2 retries over ~2 s" in message and "MLFLOW_HTTP_REQUEST_MAX_RETRIES=2" in message
    assert "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR=1" in message and "tracking.uri" in message and "--resume" in message
    # Each retry was shown as it happened, with the bound it runs under.
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("[tracking] ")]
    assert len(lines) == 2 and "retry 1 of 2" in lines[0] and "retry 2 of 2" in lines[1], lines
    assert "MLflow server not answering" in lines[0] and "gives up after ~2 s" in lines[0]


def test_other_mlflow_errors_pass_through_unchanged(tmp_path):
    from mlflow.exceptions import MlflowException

    from slmfactory.platform.tracking import TrackingUnavailable, client_for

    client = client_for(f"sqlite:///{tmp_path / 'mlflow.db'}")
    with pytest.raises(MlflowException) as e:
        client.get_run("0" * 32)
    assert not isinstance(e.value, TrackingUnavailable)


def test_a_live_run_against_a_server_that_is_away_gives_up_fast_and_the_trial_runs_on(tmp_path, monkeypatch,
                                                                                       capsys):
    """A live run is best effort: under MLflow's default bound (7 retries, ~4 minutes) a
    trial would wait on a restarting server at its start, at every curve flush and at its
    end. Its calls run under the short bound instead (2 retries, ~2 s), the trial's work
    runs, its points are kept, and the process's own bound is back afterwards."""
    import os

    from slmfactory.platform.config import load_config
    from slmfactory.platform.tracking import BEST_EFFORT_HTTP, LiveRunTracker
    from slmfactory.trial import live_trial_run

    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    for k in BEST_EFFORT_HTTP:
        monkeypatch.delenv(k, raising=False)
    cfg = load_config(REPO / "configs" / "tiny.yaml",
                      {"workdir": str(tmp_path), "tracking.enabled": True, "tracking.uri": uri})
    ran = []
    with live_trial_run(cfg, "slmfactory-live") as live:
        ran.append(os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"])
    assert live is None and ran == ["2"]  # no live run; the work ran under the short bound
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ  # MLflow's default is back
    err = capsys.readouterr().err
    assert "[tracking] no live run for this attempt: TrackingUnavailable" in err
    assert "after 2 retries over ~2 s" in err and "retry 2 of 2" in err and "retry 3" not in err

    # A live run whose server went away mid-trial: a flush gives up under the same bound and
    # keeps its points for the next flush.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "7")
    tracker = LiveRunTracker(uri, "0" * 32, flush_seconds=3600)
    tracker.log_metrics({"finetune/slm/legal/train_loss": 2.5}, step=0)
    assert len(tracker._points) == 1
    err = capsys.readouterr().err
    assert "[tracking] live curve points kept for later" in err and "retry 2 of 2" in err and "retry 3" not in err
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "7"  # the process's own setting, restored
