"""Resources per phase on a real two-node Ray cluster on this machine (loopback: ``ray start
--head`` plus ``ray start --address``, one CPU each, token authentication on;
``tests/local_cluster.py``).

The recipe (configs/sweep-tiny.yaml, tiny budgets) gives pretraining and fine-tuning
different resources: the generic phase 2 workers of 1 CPU (DDP across the two nodes, on a
Ray Train worker group), each fine-tune 1 worker of half a CPU (in its trial's own
process). The trials' and the trainer's placement groups, read from Ray's GCS
(``ray.util.placement_group_table``) while the sweep runs, are exactly that plan; and 4
fine-tunes hold their reservations at once where the global ``scaling`` (1 CPU per trial)
lets 2 fit on the cluster's 2 CPUs.

A second sweep gives each fine-tune 2 workers: Ray Train runs inside the trial, on a
placement group of exactly the phase's workers beside the trial's own driver bundle.

What decides the count is Ray's resource accounting, not timing: Tune asks for every
trial's placement group when the trials start, a group is created only when its bundle
fits, and a trial's group lives until the trial (tens of seconds of training here) ends.
"""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import pytest

from tests.local_cluster import local_cluster

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "configs" / "sweep-tiny.yaml"


def _bundles(pg: dict) -> list[dict[str, float]]:
    return [{k: float(v) for k, v in b.items() if k in ("CPU", "GPU")} for _, b in sorted(pg["bundles"].items())]


class PlacementGroupWatch:
    """Polls the GCS's placement group table while the sweep runs in this process: every
    group seen (id -> bundles) and the most single-bundle groups of ``trial_bundle`` that
    were CREATED (reserved) at once."""

    def __init__(self, trial_bundle: dict[str, float], address: str):
        self.trial_bundle, self.address = trial_bundle, address
        self.seen: dict[str, list[dict[str, float]]] = {}
        self.before: set[str] = set()
        self.most_trials_at_once = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import ray

        while not self._stop.is_set():
            if ray.is_initialized():
                try:
                    table = ray.util.placement_group_table()
                except Exception:  # noqa: BLE001  (the driver connecting or disconnecting)
                    table = {}
                created = 0
                for pg_id, pg in table.items():
                    if pg_id in self.before:
                        continue  # an earlier test's (the GCS keeps removed groups)
                    bundles = _bundles(pg)
                    self.seen.setdefault(pg_id, bundles)
                    if pg["state"] == "CREATED" and bundles == [self.trial_bundle]:
                        created += 1
                self.most_trials_at_once = max(self.most_trials_at_once, created)
            self._stop.wait(0.2)

    def __enter__(self):
        # The test holds the driver's connection across the sweep (run_sweep joins it and
        # leaves it up), so the groups already in the GCS are known before the sweep starts.
        from slmfactory.platform.runtime import init_ray

        init_ray(self.address)
        import ray

        self.before = set(ray.util.placement_group_table())
        self._thread.start()
        return self

    def __exit__(self, *exc):
        import ray

        self._stop.set()
        self._thread.join(10)
        ray.shutdown()


@pytest.fixture(scope="module")
def two_node_cluster():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_AUTH_MODE", "token")  # the driver sends the token too
        mp.delenv("RAY_ADDRESS", raising=False)
        mp.delenv("SLMFACTORY_LAUNCHER", raising=False)  # each phase where its resources say
        with local_cluster() as (address, _):
            yield address


@pytest.mark.timeout(900)
def test_pretraining_and_fine_tunes_reserve_their_own_resources_and_fine_tunes_pack(two_node_cluster, tiny_root,
                                                                                    tmp_path):
    from slmfactory.platform.config import load_config
    from slmfactory.sweeps.plan import ClusterShape, concurrency, plan_sweep, trial_resources
    from slmfactory.sweeps.run import run_sweep

    work = tmp_path / "work"
    shutil.copytree(tiny_root, work)
    per_phase = {"workdir": str(work), "tracking.enabled": False, "sweep.strategies": ["slm"],
                 "sweep.domains": ["legal", "biomedical"], "sweep.grid": {"finetune.seed": [0, 1]},
                 "scaling.pretrain.num_workers": 2, "scaling.pretrain.cpus_per_worker": 1,
                 "scaling.finetune.num_workers": 1, "scaling.finetune.cpus_per_worker": 0.5}
    cfg = load_config(RECIPE, per_phase)
    assert (cfg.scaling.num_workers, cfg.scaling.cpus_per_worker) == (1, 1.0)  # the global setting

    # The plan: 4 trials; each reserves half a CPU, which 2 CPUs hold 4 of; the global setting 2.
    plan = plan_sweep(cfg, ["legal", "biomedical"])
    two_cpus = ClusterShape(({"CPU": 1.0}, {"CPU": 1.0}), "the test's two nodes")
    assert len(plan.trials) == 4
    assert {t.key: trial_resources(t.config(cfg), t.strategy).head for t in plan.trials} == \
        {t.key: {"CPU": 0.5} for t in plan.trials}
    assert concurrency(plan, cfg, two_cpus) == {"slm": 4}
    global_cfg = load_config(RECIPE, {k: v for k, v in per_phase.items() if not k.startswith("scaling.")})
    assert concurrency(plan, global_cfg, two_cpus) == {"slm": 2}

    lines: list[str] = []
    with PlacementGroupWatch({"CPU": 0.5}, two_node_cluster) as watch:
        outcome = run_sweep(cfg, address=two_node_cluster, log=lines.append)
    log = "\n".join(lines)
    assert outcome is not None and len(outcome.records) == 4, log[-3000:]
    assert "up to 4 at a time (2 CPUs) on 2 nodes x (1 CPU) (slm: 4 at once, each 0.5 CPU)" in log, log[-3000:]
    assert "[pretrain/slm] Ray Train (pretrain resources): 2 x (1 CPU)" in log, log[-3000:]

    groups = list(watch.seen.values())
    # The generic phase: one Ray Train group of 2 workers x 1 CPU (one per node).
    assert groups.count([{"CPU": 1.0}, {"CPU": 1.0}]) == 1, groups
    # Every trial: one bundle of half a CPU (its fine-tune runs in the trial's process), and
    # nothing else was reserved (no fine-tune started a worker group of its own).
    trial_groups = [g for g in groups if g == [{"CPU": 0.5}]]
    assert 1 <= len(trial_groups) <= 4 and len(groups) == len(trial_groups) + 1, groups
    # More fine-tunes held their resources at once than the global setting lets fit (2).
    assert watch.most_trials_at_once > 2, (watch.most_trials_at_once, groups)


@pytest.mark.timeout(900)
def test_a_fine_tune_of_two_workers_runs_ray_train_inside_its_trial_on_exactly_its_resources(two_node_cluster,
                                                                                             tiny_root, tmp_path):
    """Ray Train inside a Tune trial, as Ray documents it for Train V2: the trial reserves
    only itself as the driver (a tenth of a CPU), and its fine-tune's ``TorchTrainer`` asks
    for exactly the phase's 2 workers of half a CPU, in a placement group of its own; the
    plan counts both, so one trial runs at a time on 2 CPUs (0.1 + 2 x 0.5, twice, is 2.2)."""
    from slmfactory.platform.config import load_config
    from slmfactory.sweeps.run import run_sweep

    work = tmp_path / "work"
    shutil.copytree(tiny_root, work)
    cfg = load_config(RECIPE, {"workdir": str(work), "tracking.enabled": False, "sweep.strategies": ["slm"],
                               "sweep.domains": ["legal", "biomedical"],
                               "scaling.finetune.num_workers": 2, "scaling.finetune.cpus_per_worker": 0.5})
    lines: list[str] = []
    with PlacementGroupWatch({"CPU": 0.1}, two_node_cluster) as watch:
        outcome = run_sweep(cfg, address=two_node_cluster, log=lines.append)
    log = "\n".join(lines)
    assert outcome is not None and len(outcome.records) == 2, log[-3000:]
    assert "up to 1 at a time (2 CPUs)" in log and "each 0.1 CPU + Ray Train 2 x (0.5 CPU)" in log, log[-3000:]
    groups = list(watch.seen.values())
    trainers = [g for g in groups if g == [{"CPU": 0.5}, {"CPU": 0.5}]]
    drivers = [g for g in groups if g == [{"CPU": 0.1}]]
    # One Ray Train group per fine-tune (one a trial), the trials' own driver bundles, nothing else
    # (the generic phase, one CPU worker, trained in the driver's process).
    assert len(trainers) == 2 and 1 <= len(drivers) <= 2 and len(groups) == len(trainers) + len(drivers), groups
