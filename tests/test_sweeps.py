"""Sweeps on real Ray Tune and real MLflow (sqlite in a temp dir): configs/sweep-tiny.yaml,
2 strategies x 2 domains on the committed sample, killed midway and resumed; the report
and the recommendation read it back from MLflow."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "configs" / "sweep-tiny.yaml"


def cli(*args, timeout=600, **kw):
    env = {**os.environ, "SLMFACTORY_LAUNCHER": "local"}
    return subprocess.run([sys.executable, "-m", "slmfactory.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=REPO, **kw)


def one_line_error(out, *needles):
    assert out.returncode == 2, (out.stdout, out.stderr[-2000:])
    assert "Traceback" not in out.stderr
    lines = [l for l in out.stderr.splitlines() if l.startswith("slmfactory: error:")]
    assert len(lines) == 1, out.stderr
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.fixture
def work(tiny_root, tmp_path):
    w = tmp_path / "work"
    shutil.copytree(tiny_root, w)
    return w


@pytest.mark.parametrize("override, needle", [
    ("sweep.strategies=[slm,gpt5]", "sweep.strategies[1]"),
    ("sweep.generic_tokens=[-5]", "sweep.generic_tokens[0]"),
    ("sweep.strategies=[]", "sweep.strategies: empty grid"),
    ("sweep.domains=[legal,atlantis]", "sweep.domains: unknown domain 'atlantis'"),
])
def test_bad_sweep_recipes_fail_before_any_trial(work, override, needle):
    out = cli("sweep", "-c", str(RECIPE), "--set", f"workdir={work}", "--set", override, timeout=120)
    one_line_error(out, needle)
    assert not (work / "sweeps").exists() and not (work / "generic").exists()


def test_dry_run_prints_the_plan_and_runs_nothing(work):
    out = cli("sweep", "-c", str(RECIPE), "--set", f"workdir={work}", "--dry-run",
              "--set", "sweep.generic_tokens=[10240,20480]", timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    # slm: 2 generic budgets x 2 domains; slm-nopt has no generic phase, so the generic axis
    # does not multiply it (one trial per domain, generic budget 'none'), and the plan says so.
    assert "6 trials, 2 shared generic phases" in out.stdout
    assert "slm@1.02e+04T" in out.stdout and "slm@2.05e+04T" in out.stdout
    assert "slm-nopt-legal-gnone-s1.02e+04T" in out.stdout and "not on the generic axis: slm-nopt" in out.stdout
    assert "cpu-2core hours" in out.stdout
    assert not (work / "generic").exists() and not (work / "sweeps").exists()


def test_paper_dry_run_plans_gpu_hours_and_memory_without_a_corpus(tmp_path):
    out = cli("sweep", "-c", str(REPO / "configs" / "paper.yaml"), "--set", f"workdir={tmp_path}", "--dry-run",
              timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    text = out.stdout
    assert "126 trials, 10 shared generic phases" in text  # slm-is, slm-nopt: not on the generic axis
    # ~100 A100-hours of SLM pretraining at 45B tokens (Table 2: 2.2 h per 1B), slm-pn ~1.5x.
    # Columns: phase, trials, tokens, FLOPs, hours, epochs.
    hours = {line.split()[0]: float(line.split()[4].replace(",", "")) for line in text.splitlines()
             if line.startswith(("slm@4.5e+10T", "slm-pn@4.5e+10T", "llm@4.5e+10T"))}
    assert 80 < hours["slm@4.5e+10T"] < 120 and 1.3 < hours["slm-pn@4.5e+10T"] / hours["slm@4.5e+10T"] < 1.8
    assert 3.0 < hours["llm@4.5e+10T"] / hours["slm@4.5e+10T"] < 4.0
    assert "a100-bf16 hours" in text and "peak memory by stage" in text
    assert "pretrain slm-pn (1,421M)" in text and "largest per-device need" in text
    assert not any(tmp_path.iterdir())  # planned, nothing built


def _finished_trial_count(db: Path) -> int:
    """Finished trial runs, read straight from the sqlite file (read-only): an MLflow client
    here could run its schema migration while the driver is creating the database."""
    import sqlite3

    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as con:
            return con.execute("SELECT COUNT(*) FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid "
                               "WHERE t.key = 'slmfactory.trial' AND r.status = 'FINISHED'").fetchone()[0]
    except sqlite3.Error:
        return 0  # not created yet, or being created


def _finished_trial_runs(uri: str, experiment: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return client, []
    runs = client.search_runs([exp.experiment_id], filter_string="tags.`slmfactory.trial` != ''")
    return client, runs


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_sweep_killed_midway_resumes_with_one_run_per_trial(work):
    from slmfactory.platform.config import load_config

    cfg = load_config(RECIPE, {"workdir": str(work)})
    uri, experiment = cfg.tracking_uri, "slmfactory-sweep-tiny"
    args = ["sweep", "-c", str(RECIPE), "--set", f"workdir={work}", "--set", "sweep.max_concurrent=1"]
    # The first start is the same command as every later one: --resume with nothing to resume starts it.
    driver = subprocess.Popen([sys.executable, "-m", "slmfactory.cli", *args, "--resume"], cwd=REPO,
                              stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, env={**os.environ, "SLMFACTORY_LAUNCHER": "local"})
    deadline = time.time() + 400
    while time.time() < deadline and driver.poll() is None and not _finished_trial_count(work / "mlflow.db"):
        time.sleep(0.5)
    driver.send_signal(signal.SIGKILL)  # the driver dies mid-sweep: no cleanup, no final state
    driver.wait(timeout=60)
    assert "--resume: nothing to resume at" in driver.stdout.read()
    _, finished = _finished_trial_runs(uri, experiment)
    assert finished, "no trial finished before the deadline"
    done_before = {r.data.tags["slmfactory.trial"]: r.info.start_time for r in finished}
    markers = {p: p.stat().st_mtime_ns for p in (work / "train").glob("*/stage.json")}
    assert len(done_before) < 4

    out = cli(*args, "--resume", timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    client, runs = _finished_trial_runs(uri, experiment)
    keys = [r.data.tags["slmfactory.trial"] for r in runs]
    assert len(runs) == 4 and len(set(keys)) == 4, keys  # exactly one run per trial
    # None left RUNNING by the killed driver's trial in flight (its retry reopened and finished
    # it), and no second run of any trial, not even a deleted one.
    from mlflow.entities import ViewType

    exp_id = client.get_experiment_by_name(experiment).experiment_id
    assert not client.search_runs([exp_id], "attributes.status = 'RUNNING'")
    every = client.search_runs([exp_id], "tags.`slmfactory.trial` != ''", run_view_type=ViewType.ALL)
    assert sorted(r.info.run_id for r in every) == sorted(r.info.run_id for r in runs)
    for r in runs:
        assert r.info.status == "FINISHED"
        t, m = r.data.tags, r.data.metrics
        d = t["domain"]
        assert {t["strategy"], d} <= {"slm", "slm-nopt", "legal", "biomedical"}
        assert t["phase"] == "specialize" and t["in_domain_tokens"] == "20000" and t["generic_budget"]
        for name in (f"ppl/{d}", "ppl_macro", "test_nll", "cost/generic_flops", "cost/spec_flops",
                     "cost/spec_device_hours", "cost/spec_wall_seconds", "cost/inference_flops_per_token"):
            assert name in m, name
        assert r.data.params["strategy.name"] == t["strategy"] and r.data.params["data.domain"] == d
        assert len(client.get_metric_history(r.info.run_id, "finetune/valid_nll")) >= 2  # a curve by step
        assert {a.path for a in client.list_artifacts(r.info.run_id, "model")} >= {"model/model.safetensors",
                                                                                   "model/config.json"}
        assert (m["cost/generic_flops"] > 0) == (t["strategy"] == "slm")
    # Finished trials were not redone: same runs, and their training stages untouched.
    for r in runs:
        if r.data.tags["slmfactory.trial"] in done_before:
            assert r.info.start_time == done_before[r.data.tags["slmfactory.trial"]]
    for p, mtime in markers.items():
        assert p.stat().st_mtime_ns == mtime, p
    # The shared generic phase trained once: one pretraining run, 40 steps, same cost in both trials.
    pretrain = list((work / "train").glob("pretrain-slm-*/stage.json"))
    assert len(pretrain) == 1
    slm = [r for r in runs if r.data.tags["strategy"] == "slm"]
    assert len({r.data.metrics["cost/generic_flops"] for r in slm}) == 1
    import json

    assert json.loads(pretrain[0].read_text())["info"]["result"]["steps"] == 40
    # One registered model per domain, a version per trial of that domain.
    names = {m.name for m in client.search_registered_models()}
    assert names == {f"{experiment}-legal", f"{experiment}-biomedical"}
    _check_parent_times_and_aliases(client, experiment, runs)

    # The report and the recommendation read the sweep back from MLflow.
    rep = cli("report", "-c", str(RECIPE), "--set", f"workdir={work}", timeout=300)
    assert rep.returncode == 0, rep.stderr[-2000:]
    out_dir = work / "reports" / experiment
    pngs = sorted(p.name for p in out_dir.glob("*.png"))
    assert "amortisation_n20000_flops.png" in pngs and "ppl_vs_cost_n20000_N7_flops.png" in pngs
    assert any(p.startswith("figure1_n20000_N") for p in pngs)
    assert "| slm |" in (out_dir / "report.md").read_text()
    (parent,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id],
                                   filter_string="tags.`slmfactory.sweep` != ''")
    assert {"report/report.md", "report/amortisation_n20000_flops.png"} <= {
        a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert "recommendation.md" in {a.path for a in client.list_artifacts(parent.info.run_id)}
    rec = cli("recommend", "-c", str(RECIPE), "--set", f"workdir={work}", "--inference-params", "1e9",
              "--spec-budget", "1e15", "--domains", "7", timeout=300)
    assert rec.returncode == 0, rec.stderr[-2000:]
    assert "recommended:" in rec.stdout and "runner-up:" in rec.stdout and "macro perplexity" in rec.stdout
    # The URI recommend prints is the registry's: the recommended configuration's version of
    # each domain, and what `serve --from-registry` resolves when that version is the champion.
    from slmfactory.serving.catalog import from_registry

    printed = dict(line.split("model ", 1)[1].split(": ", 1) for line in rec.stdout.splitlines()
                   if line.strip().startswith("model "))
    assert set(printed) == {"legal", "biomedical"}, rec.stdout
    served = from_registry(uri, experiment, work / "registry-test")
    for d, e in served.items():
        name, alias_version = f"{experiment}-{d}", client.get_model_version_by_alias(f"{experiment}-{d}", "champion").version
        assert e.uri == f"models:/{name}@champion (version {alias_version})"
        assert printed[d].startswith(f"models:/{name}/")
        if printed[d].split()[0] == f"models:/{name}/{alias_version}":
            assert f"models:/{name}@champion" in printed[d]
        assert (Path(e.path) / "model.safetensors").is_file()
    none = cli("recommend", "-c", str(RECIPE), "--set", f"workdir={work}", "--inference-params", "10",
               "--spec-budget", "1e15", "--domains", "7", timeout=300)
    one_line_error(none, "no measured configuration")
    _check_serving_costs(work, runs, out_dir, served)


def _check_serving_costs(work, runs, out_dir, served):
    """Each exported model's serving rates, measured at export: on its run (tokens/s, the
    device-hours per million tokens they price to, the machine), in its registered folder,
    in the report's column, and `recommend --inference-cost` answering from them."""
    import pytest

    for r in runs:
        m = r.data.metrics
        for task in ("generate", "score"):
            assert m[f"serving/{task}_tokens_per_s"] > 0
            assert m[f"serving/{task}_device_hours_per_mtok"] == pytest.approx(1e6 / 3600 / m[f"serving/{task}_tokens_per_s"])
        assert "cores" in r.data.tags["serving_machine"] and "1 torch thread(s)" in r.data.tags["serving_machine"]
    assert all(e.serving_rates is not None and e.serving_rates.generate_tokens_per_s > 0 for e in served.values())
    table = (out_dir / "report.md").read_text()
    assert "serving cost / M tokens generate / score (device-hours)" in table and "measured once at export" in table
    rows = [line for line in table.splitlines()  # the configurations table's rows (macro ppl in bold)
            if line.startswith(("| slm |", "| slm-nopt |")) and " | **" in line]
    assert len(rows) == 2 and not any(line.endswith("| - / - |") for line in rows), rows
    base = ["recommend", "-c", str(RECIPE), "--set", f"workdir={work}", "--inference-params", "1e9",
            "--spec-budget", "1e15", "--domains", "7"]
    rec = cli(*base, "--inference-cost", "1e9", timeout=300)
    assert rec.returncode == 0, rec.stderr[-2000:]
    assert "recommended:" in rec.stdout and "serving cost (device-hours): " in rec.stdout
    assert "per million generated tokens" in rec.stdout and "(<= 1e+09 asked)" in rec.stdout
    priced = cli(*base, "--inference-cost", "1e9", "--set", "serving.price_per_device_hour=0.09", timeout=300)
    assert priced.returncode == 0 and "serving cost (at 0.09 per device-hour): " in priced.stdout
    # Nothing serves a million tokens in a thousandth of a device-second.
    none = cli(*base, "--inference-cost", "3e-10", timeout=300)
    one_line_error(none, "no measured configuration", "<= 3e-10 (device-hours) per million generated tokens")


def _check_parent_times_and_aliases(client, experiment, trial_runs):
    """One parent run per sweep, every trial nested under it; each trial run starts and ends
    at its trial's own times; each domain's ``champion`` alias on its best version."""
    import json

    exp_id = client.get_experiment_by_name(experiment).experiment_id
    assert client.get_experiment(exp_id).tags.get("mlflow.experimentKind") == "custom_model_development"
    parents = client.search_runs([exp_id], filter_string="tags.`slmfactory.sweep` != ''")
    assert len(parents) == 1  # the resumed sweep kept its parent
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert {"recipe.yaml", "plan.txt"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}
    best: dict[str, tuple[float, str]] = {}
    for r in trial_runs:
        assert r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
        record = json.loads(Path(client.download_artifacts(r.info.run_id, "trial.json")).read_text())
        assert (r.info.start_time, r.info.end_time) == (record["started_ms"], record["ended_ms"])
        d = r.data.tags["domain"]
        ppl = r.data.metrics[f"ppl/{d}"]
        if d not in best or ppl < best[d][0]:
            best[d] = (ppl, r.info.run_id)
    for d, (_, run_id) in best.items():
        mv = client.get_model_version_by_alias(f"{experiment}-{d}", "champion")
        assert mv.run_id == run_id, (d, mv.run_id, run_id)


def _trial_worker(driver_pid: int, lock_glob: str, work: Path):
    """The process training the phase whose stage lock matches ``lock_glob``: among the
    driver's own descendants (its Ray instance's workers, never another Ray's), the one
    holding that lock file open (a stage's builder holds it for the whole build)."""
    import psutil

    locks = {str(p) for p in (work / "train").glob(lock_glob)}
    if not locks:
        return None
    for proc in psutil.Process(driver_pid).children(recursive=True):
        try:
            if any(f.path in locks for f in proc.open_files()):
                return proc
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return None


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_trial_whose_worker_is_killed_is_retried_and_keeps_one_run(work):
    """A trial's Ray worker killed (SIGKILL) while it trains, after its phase's first
    checkpoint: Tune retries it (``sweep.max_failures``), it resumes and finishes, and the
    experiment holds exactly one run for its trial key. The sweep also says its profile
    names no machine, and how its generic phase's measured rate compares with the profile."""
    from slmfactory.platform.config import load_config

    cfg = load_config(RECIPE, {"workdir": str(work)})
    uri, experiment = cfg.tracking_uri, "slmfactory-sweep-tiny"
    # Two trials, one at a time: slm (20 fine-tuning steps) and slm-nopt, whose 160 steps from
    # scratch checkpoint every 10 (no early stopping, so its length is fixed).
    args = ["sweep", "-c", str(RECIPE), "--set", f"workdir={work}", "--set", "sweep.strategies=[slm,slm-nopt]",
            "--set", "sweep.domains=[legal]", "--set", "sweep.max_concurrent=1", "--set", "sweep.max_failures=1",
            "--set", "sweep.spec_tokens=[10240,81920]",
            "--set", "sweep.only={slm: {spec_tokens: [10240]}, slm-nopt: {spec_tokens: [81920]}}",
            "--set", "finetune.patience=0", "--set", "finetune.eval_every=40", "--set", "finetune.checkpoint_every=10"]
    driver = subprocess.Popen([sys.executable, "-m", "slmfactory.cli", *args], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, env={**os.environ, "SLMFACTORY_LAUNCHER": "local"})
    killed = None
    try:
        deadline = time.time() + 400
        while time.time() < deadline and driver.poll() is None and killed is None:
            # slm-nopt's phase has written a checkpoint and trains on: kill the process training it.
            if list((work / "train").glob(".finetune-slm-nopt-legal-*.partial/checkpoints/latest")):
                proc = _trial_worker(driver.pid, ".finetune-slm-nopt-legal-*.lock", work)
                if proc is not None:
                    proc.kill()
                    killed = proc.pid
            time.sleep(0.05)
        assert killed is not None, "slm-nopt's phase never checkpointed while the sweep ran"
        out, _ = driver.communicate(timeout=500)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait(timeout=60)
    assert driver.returncode == 0, out[-4000:]
    retried = [line for line in out.splitlines() if "RETRYING slm-nopt-legal" in line]
    assert len(retried) == 1, out[-4000:]
    assert "2/2 done" in out and "sweep done" in out and "FAILED" not in out
    # Its phase finished once, from the checkpoints the killed attempt left (the stage's work folder).
    (marker,) = (work / "train").glob("finetune-slm-nopt-legal-*/stage.json")
    assert json.loads(marker.read_text())["info"]["result"]["steps"] == 160
    assert not list((work / "train").glob(".finetune-slm-nopt-legal-*.partial"))
    # Exactly one run per trial key: the failed attempt opened none.
    _, runs = _finished_trial_runs(uri, experiment)
    keys = [r.data.tags["slmfactory.trial"] for r in runs]
    assert len(runs) == 2 and len(set(keys)) == 2, keys
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    (nopt,) = [r for r in runs if r.data.tags["strategy"] == "slm-nopt"]
    from mlflow.entities import ViewType

    same_key = client.search_runs([exp.experiment_id],
                                  filter_string=f"tags.`slmfactory.trial` = '{nopt.data.tags['slmfactory.trial']}'",
                                  run_view_type=ViewType.ALL)
    assert len(same_key) == 1 and same_key[0].info.status == "FINISHED"
    # The same run across both attempts: the killed one marked it FAILED with its error (the
    # driver did, the worker being dead), the retry reopened it, streamed its curve, finished it.
    assert same_key[0].data.tags["slmfactory.error"]
    live = client.get_metric_history(nopt.info.run_id, "finetune/slm-nopt/legal/train_loss")
    assert max(m.step for m in live) == 150 and min(m.step for m in live) == 1
    assert not client.search_runs([exp.experiment_id], "attributes.status = 'RUNNING'")
    assert nopt.data.metrics["cost/spec_flops"] > 0 and "ppl_macro" in nopt.data.metrics
    # The sweep named its profile's problem and measured its one generic phase against it.
    assert "[sweep] warning: device profile 'cpu-2core' has no measured rows" in out
    assert "[sweep] generic phase slm@2.05e+04T trained at" in out and "measured / profile" in out


@pytest.mark.server
@pytest.mark.timeout(180)
def test_ui_serves_mlflow_on_loopback_only(work):
    import urllib.request

    from tests.local_cluster import free_port

    port = free_port()
    ui = subprocess.Popen([sys.executable, "-m", "slmfactory.cli", "ui", "-c", str(RECIPE), "--set", f"workdir={work}",
                           "--port", str(port)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          start_new_session=True)
    try:
        deadline, body = time.time() + 120, ""
        while time.time() < deadline and not body:
            try:
                body = urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).read().decode()
            except OSError:
                time.sleep(1)
        assert body.strip() == "OK"
        import psutil

        bound = [c.laddr.ip for c in psutil.net_connections(kind="tcp")
                 if c.status == psutil.CONN_LISTEN and c.laddr.port == port]
        assert bound and set(bound) == {"127.0.0.1"}, bound
    finally:
        os.killpg(ui.pid, signal.SIGKILL)
        ui.wait(timeout=30)


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_a_restored_tuners_callbacks_report_to_the_process_that_resumed_it(tmp_path):
    """``sweep --resume`` goes through Ray's public ``Tuner.restore(path, trainable,
    param_space=...)``, which hands the restored run the callbacks pickled with it (it takes
    no new ones): the sweep's ``TrialLogger`` holds only its sweep's folder and reports to
    the live sweep registered under it in the process it fires in. Here a trial fails in
    the first run, the Tuner is restored from disk under a fresh live sweep, and the retried
    trial's events reach that one, not the first."""
    import ray
    from ray import tune

    from slmfactory.platform.config import load_config
    from slmfactory.sweeps import run as sweep_run

    marker = tmp_path / "second-attempt"

    def trainable(config):
        if not marker.exists():
            raise RuntimeError("first attempt fails")
        tune.report({"ppl": 1.0})

    key = str(tmp_path / "exp")
    cfg = load_config(None, {"tracking.enabled": False})

    def live(lines):
        progress = sweep_run._Progress(1, lines.append, live=False)
        return sweep_run.LiveSweep(cfg, {"k": "the-trial"}, progress, {})

    first, second = [], []
    space = {"trial": tune.grid_search(["k"])}
    ray.init(num_cpus=1, include_dashboard=False)
    try:
        sweep_run._LIVE[key] = live(first)
        tune.Tuner(trainable, param_space=space,
                   run_config=tune.RunConfig(name="exp", storage_path=str(tmp_path), verbose=0,
                                             callbacks=[sweep_run.TrialLogger(key)])).fit()
        assert any("started the-trial" in l for l in first) and any("FAILED the-trial" in l for l in first)

        marker.write_text("")
        sweep_run._LIVE[key] = live(second)
        restored = tune.Tuner.restore(key, trainable, resume_errored=True, param_space=space)
        results = restored.fit()
        assert [r.error for r in results] == [None]
        assert any("started the-trial" in l for l in second), second
        assert not any("FAILED" in l for l in second)
        assert len([l for l in first if "started" in l]) == 1  # the first process's sweep heard nothing more

        # A callback firing where its sweep is not running is a clear error, not silence.
        del sweep_run._LIVE[key]
        from slmfactory.platform.errors import SlmFactoryError

        with pytest.raises(SlmFactoryError, match="does not run that sweep"):
            sweep_run.live_sweep(key)
    finally:
        sweep_run._LIVE.pop(key, None)
        ray.shutdown()


def test_paper_dry_run_prints_the_resource_plan_on_a_described_cluster(tmp_path):
    out = cli("sweep", "-c", str(REPO / "configs" / "paper.yaml"), "--set", f"workdir={tmp_path}", "--dry-run",
              "--nodes", "4", "--gpus-per-node", "8", "--cpus-per-node", "96", timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    text = out.stdout
    rows = {line.split()[0]: line.split()[1:4] for line in text.splitlines() if line.startswith("  ")
            and line.split() and line.split()[0] in ("pretrain", "pretrain_llm", "experts", "finetune",
                                                     "finetune_llm", "distill")}
    assert rows["pretrain"] == ["8", "1", "8"] and rows["finetune"] == ["1", "0.5", "6"]
    assert rows["finetune_llm"] == ["1", "1", "12"]
    assert "cluster: 4 nodes x (8 GPU, 96 CPU) (described by --nodes" in text
    at_once = {line.split()[0]: int(line.split()[2]) for line in text.splitlines()
               if line.startswith("  ") and line.split() and line.split()[0] in ("slm", "llm", "slm-d")}
    # Half a GPU and 6 CPUs each: 16 SLM fine-tunes per node; the LLM's take a whole GPU.
    assert at_once == {"slm": 64, "llm": 32, "slm-d": 32}
    assert "with scaling's one setting for every phase (8 x (1 GPU, 8 CPU)): 4 trials at once" in text
    assert "2 trials share a GPU: finetune holds 0.5 of one, needing 2 x 19.6 = 39.1 GiB" in text
    assert "projected wall time on this cluster: generic phases" in text
    assert not any(tmp_path.iterdir())


def test_a_described_cluster_goes_with_dry_run_only(work):
    out = cli("sweep", "-c", str(RECIPE), "--set", f"workdir={work}", "--nodes", "2", "--cpus-per-node", "4",
              timeout=120)
    one_line_error(out, "--nodes/--gpus-per-node/--cpus-per-node", "--dry-run")




def test_trials_pack_by_their_phases_resources_and_the_projected_wall_time_follows():
    from slmfactory.platform.config import load_config
    from slmfactory.sweeps.plan import (
        ClusterShape, copies_that_fit, device_seconds, plan_sweep, projected_wall, trial_resources)

    two_cpus = [{"CPU": 1.0}, {"CPU": 1.0}]
    assert copies_that_fit(two_cpus, [{"CPU": 0.5}]) == 4 and copies_that_fit(two_cpus, [{"CPU": 1.0}]) == 2
    # A driver beside a Ray Train group of 2 x 1 CPU holds 2.1 CPUs: never on 2.
    assert copies_that_fit(two_cpus, [{"CPU": 0.1}, {"CPU": 1.0}, {"CPU": 1.0}]) == 0
    gpu_nodes = list(ClusterShape.described(4, 8, 96).nodes)
    assert copies_that_fit(gpu_nodes, [{"GPU": 0.5, "CPU": 6.0}]) == 64     # GPU-bound: 16 a node
    assert copies_that_fit(gpu_nodes, [{"GPU": 0.5, "CPU": 12.0}]) == 32    # CPU-bound: 8 a node
    assert copies_that_fit(gpu_nodes, [{"CPU": 0.1}] + [{"GPU": 1.0, "CPU": 8.0}] * 8) == 4

    base = {"sweep.strategies": ["slm"], "sweep.grid": {"finetune.seed": [0, 1]}}
    per_phase = load_config(RECIPE, {**base, "scaling.finetune.cpus_per_worker": 0.5})
    plan = plan_sweep(per_phase, ["legal", "biomedical"])
    res = trial_resources(plan.trials[0].config(per_phase), "slm")
    assert (res.head, res.groups, res.held) == ({"CPU": 0.5}, (), ("finetune",))
    ddp = trial_resources(load_config(RECIPE, {**base, "scaling.finetune.num_workers": 2}), "slm")
    assert (ddp.head, ddp.groups, ddp.held) == ({"CPU": 0.1}, (({"CPU": 1.0}, {"CPU": 1.0}),), ())

    # Four equal trials: all at once on half a CPU each, two at a time on one CPU each.
    cluster = ClusterShape(tuple(two_cpus), "test")
    one = sum(device_seconds(w, per_phase.device) for w in plan.spec_work[plan.trials[0].key])
    _, packed = projected_wall(plan, per_phase, cluster)
    _, global_only = projected_wall(plan, load_config(RECIPE, base), cluster)
    assert packed == pytest.approx(one) and global_only == pytest.approx(2 * one)
