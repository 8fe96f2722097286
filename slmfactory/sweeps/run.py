"""``slmfactory sweep``: the budget grid on Ray Tune, every trial one MLflow run.

Order of work:

1. the plan (``plan.py``): every recipe error surfaces here, before anything runs;
2. the shared stages on the driver: tokenizer, clustering, and each (strategy family,
   generic budget) generic phase once. Running them first as their own stage — rather
   than letting concurrent trials race for a lock — means no trial holds a slot while
   it waits, every domain's trial starts from a finished generic phase, and a
   multi-worker generic phase gets the whole cluster (Ray Train inside the driver). The
   stage lock still guards the rare case of two sweeps sharing a workdir;
3. the trials on Ray Tune (a function trainable), each reserving what its phases declare
   (``scaling.<phase>``, ``plan.trial_resources``): its own placement group holds the
   one-worker phases it runs in its own process (a fine-tune on half a GPU and 4 CPUs), so
   small fine-tunes pack onto a node; a phase of more than one worker runs a Ray Train
   ``TorchTrainer`` from the trial, which reserves its workers in a placement group of its
   own, as Ray documents Train inside Tune for Train V2 (docs/sweeps.md#resources-per-phase).
   Tune starts at most as many trials as fit on the cluster at once (or
   ``sweep.max_concurrent``). ``--resume`` restores the Tune experiment: finished
   trials are not rerun, and a rerun trial finds its finished stages and trains nothing.
   A failed trial (its worker killed, or an error) is retried ``sweep.max_failures`` times
   (Tune's ``FailureConfig``): its stages resume from their last checkpoints;
4. MLflow: one live run per trial, found by its trial key before one is created
   (``trial.open_trial_run``), so a retried attempt, a resumed sweep or a create retried
   after a lost reply never records a second one (Ray's ``MLflowLoggerCallback`` would open
   a run per attempt). The trial's process (the trial's driver; rank 0 of its phases) opens
   it RUNNING with its params when the trial starts and streams its phases' curves; the
   sweep's driver completes it when the trial ends (a Tune callback: metrics, model,
   registry, FINISHED) and marks a failed attempt FAILED (a retry reopens it). When the
   trials are done, any trial run of the sweep still RUNNING (trials Tune stopped) is
   marked FAILED, so none is left RUNNING after a sweep (or its ``--resume``) returns.
   The callback holds only its sweep's folder and finds the live sweep of the process it
   runs in under it (``TrialLogger``): a restored Tuner's unpickled callbacks report to the
   process that resumed it, through Ray's public APIs only.

Before it runs (and with ``--dry-run``) the sweep says when the recipe's device profile was
not measured on this machine (``platform/machine.py``); after the first generic phase it
trains, how that phase's measured tokens/s compare with the profile's projection.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from slmfactory.data.clustering import run_clustering
from slmfactory.data.corpus import list_domains
from slmfactory.data.tokens import ensure_tokenizer
from slmfactory.models.strategies import get_strategy
from slmfactory.models.train import StrategyContext, make_launcher
from slmfactory.pipeline import ensure_corpus, run_trial
from slmfactory.platform.config import RunConfig, from_dict
from slmfactory.platform.cost import measured_vs_projected
from slmfactory.platform.errors import SlmFactoryError
from slmfactory.platform.machine import machine_warning, this_machine
from slmfactory.platform.runtime import ray_session, say
from slmfactory.sweeps.plan import (
    ClusterShape, SweepPlan, concurrency, describe, describe_resources, hours, plan_sweep, size_generic_pool,
    trial_resources)
from slmfactory.sweeps.records import ensure_sweep_run, fail_running_trials, finish_sweep_run, update_champions
from slmfactory.trial import TrialRecord, experiment_name, fail_trial_run, live_trial_run, log_trial

# Module level: the callback class is pickled by reference (the experiment state names it).
from ray import tune  # noqa: E402

@dataclass
class SweepOutcome:
    plan: SweepPlan
    experiment: str
    records: dict[str, TrialRecord]
    """Trial key -> the trial's record (metrics, tags, model path)."""
    seconds: float


def sweep_dir(cfg: RunConfig, name: str) -> Path:
    return (cfg.root / "sweeps").resolve() / name


def _trainable(config: dict) -> None:
    """One trial, on a Tune worker: open its live MLflow run, run it (its phases stream their
    curves there), report its record (the driver completes the run)."""
    import torch
    from ray import tune

    cpus = float(config.get("cpus", 1))
    torch.set_num_threads(max(1, int(cpus)))
    cfg = from_dict(config["cfg"])
    # The trial's placement group holds its one-worker phases' resources: they run here.
    held = trial_resources(cfg, cfg.strategy.name).held
    with live_trial_run(cfg, experiment_name(cfg), config.get("parent_run")) as live:
        # The trial's own start (its first attempt's: the run's) and end: its run carries them.
        started = live.start_time if live is not None else int(time.time() * 1000)
        record = run_trial(cfg, log=None, launcher=make_launcher(cfg, log=None, holds=held), tracker=live)
    record.started_ms, record.ended_ms = started, int(time.time() * 1000)
    tune.report({"ppl": record.ppl, "record": json.dumps(record.to_dict())})


def eta_seconds(seconds_per_flop: float | None, running: list[float], pending_flops: list[float],
                slots: int) -> float | None:
    """Seconds until every trial has finished.

    ``seconds_per_flop`` is measured: the finished trials' own durations over their projected
    FLOPs (None before any trial has finished: no rate yet). ``running``: the seconds each
    running trial still needs at that rate (its projected time minus the time it has run).
    The trials not started yet (their projected FLOPs, in the order Tune starts them) each
    take the slot that frees first, as Tune gives them out; ``slots`` trials run at once."""
    import heapq

    if seconds_per_flop is None:
        return None
    free = sorted(max(0.0, r) for r in running)
    free += [0.0] * max(0, slots - len(free))
    heapq.heapify(free)
    for flops in pending_flops:
        heapq.heappush(free, heapq.heappop(free) + flops * seconds_per_flop)
    return max(free, default=0.0)


def _clock(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


class _Progress:
    """Trials done / running / left, the best result so far and an ETA.

    The ETA uses the dry-run's projected specialisation FLOPs per trial (``plan.spec_work``;
    the shared generic phases are trained before any trial starts) and the seconds per FLOP
    measured on the trials finished so far (``eta_seconds``). Every event is one plain line
    through ``log``, which is what CI and a redirected stdout get. On a terminal a ``rich``
    live table under those lines also keeps the counts, best and ETA current between events
    (it ticks once a second)."""

    def __init__(self, total: int, log: Callable[[str], None] | None, flops: dict[str, float] | None = None,
                 slots: int = 1, live: bool | None = None, clock: Callable[[], float] = time.perf_counter):
        self.total, self.log, self.clock, self.slots = total, log, clock, slots
        self.flops = dict(flops or {})
        """Trial key -> projected FLOPs (a key missing counts as 0)."""
        self.done = self.failed = self.running = 0
        self.best: tuple[float, str] | None = None
        self.t0 = clock()
        self.started_at: dict[str, float] = {}
        """Running trials: key -> when it started."""
        self.took: dict[str, float] = {}
        """Finished trials: key -> seconds it ran (the measured rate)."""
        self.failed_keys: set[str] = set()  # failed trials' FLOPs are neither a rate nor work left
        self._live = None
        if live is None:
            import sys

            live = log is not None and sys.stdout.isatty()
        if live:
            from rich.live import Live

            # redirect_stdout: the event lines (print) scroll above the table.
            self._live = Live(self, refresh_per_second=1, transient=False, redirect_stdout=True)
            self._live.start()

    # -- events (the Tune callback calls these) --
    def started(self, key: str, name: str) -> None:
        self.running += 1
        self.started_at[key] = self.clock()
        self.line(f"started {name}")

    def finished_ok(self, key: str, name: str, ppl: float) -> None:
        self.running = max(0, self.running - 1)
        self.done += 1
        began = self.started_at.pop(key, None)
        if began is not None:  # (a trial whose start this process did not see gives no rate)
            self.took[key] = self.clock() - began
        if self.best is None or ppl < self.best[0]:
            self.best = (ppl, name)
        self.line(f"finished {name}: ppl {ppl:.2f}")

    def retrying(self, key: str, name: str, why: str, failures: int, max_failures: int) -> None:
        """A failed trial Tune runs again (``sweep.max_failures``): it is pending, not running."""
        self.running = max(0, self.running - 1)
        self.started_at.pop(key, None)
        limit = "without end" if max_failures < 0 else f"at most {max_failures}"
        self.line(f"RETRYING {name} (failure {failures}, retried {limit} times; its stages resume "
                  f"from their checkpoints): {why}")

    def errored(self, key: str, name: str, why: str) -> None:
        self.running = max(0, self.running - 1)
        self.failed += 1
        self.started_at.pop(key, None)
        self.failed_keys.add(key)
        self.line(f"FAILED {name}: {why}")

    def __getstate__(self) -> dict:
        # Tune pickles the run config, callbacks included (into the experiment state that
        # --resume restores); the live display's thread and terminal are this process's only.
        return {**self.__dict__, "_live": None}

    def close(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None

    # -- what is shown --
    @property
    def left(self) -> int:
        return max(0, self.total - self.done - self.failed - self.running)

    def eta(self) -> float | None:
        done_flops = sum(self.flops.get(k, 0.0) for k in self.took)
        if done_flops <= 0:
            return None
        spf, now = sum(self.took.values()) / done_flops, self.clock()
        running = [self.flops.get(k, 0.0) * spf - (now - t) for k, t in self.started_at.items()]
        pending = [v for k, v in self.flops.items()
                   if k not in self.took and k not in self.started_at and k not in self.failed_keys]
        return eta_seconds(spf, running, pending, self.slots)

    def text(self, what: str) -> str:
        best = f"; best {self.best[1]} ppl {self.best[0]:.2f}" if self.best else ""
        eta = self.eta()
        return (f"[sweep {self.clock() - self.t0:6.0f}s] {self.done}/{self.total} done, "
                f"{self.running} running, {self.left} left{', %d failed' % self.failed if self.failed else ''}"
                f"{best}{'; ETA ' + _clock(eta) if eta is not None else ''} | {what}")

    def line(self, what: str) -> None:
        if self.log is not None:
            self.log(self.text(what))

    def __rich__(self):
        from rich.table import Table

        table = Table(title="sweep", title_justify="left")
        for col in ("done", "running", "left", "failed", "best so far (ppl_macro)", "elapsed", "ETA"):
            table.add_column(col, justify="left" if col.startswith("best") else "right")
        best = f"{self.best[0]:.2f}  {self.best[1]}" if self.best else "-"
        table.add_row(f"{self.done}/{self.total}", str(self.running), str(self.left), str(self.failed), best,
                      _clock(self.clock() - self.t0), _clock(self.eta()))
        return table


def _last_error(trial) -> str:
    """The last line of a failed trial's error (its traceback stays in ``error.txt``)."""
    path = Path(trial.local_path or "") / "error.txt"
    try:
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        return f"{lines[-1].strip()} (traceback: {path})"
    except (OSError, IndexError):
        return f"see {trial.local_path}"


@dataclass
class LiveSweep:
    """What a sweep's Tune callback reports to in the process running the sweep."""

    cfg: RunConfig
    names: dict[str, str]
    """Trial key -> trial name."""
    progress: _Progress
    records: dict[str, TrialRecord]
    parent_run_id: str | None = None


_LIVE: dict[str, LiveSweep] = {}
"""Sweep folder -> the live sweep this process runs there (``TrialLogger`` looks it up)."""


def live_sweep(key: str) -> LiveSweep:
    live = _LIVE.get(key)
    if live is None:
        raise SlmFactoryError(f"sweep: a Tune callback of the sweep at {key} fired in a process that does not run "
                              f"that sweep (running here: {sorted(_LIVE) or 'none'})")
    return live


class TrialLogger(tune.Callback):
    """Logs each finished trial to MLflow from the driver (never from a worker) and keeps the
    progress display current.

    It holds only its sweep's folder. Tune pickles a run's callbacks into the experiment,
    and ``Tuner.restore`` (Ray 2.60's public resume, which takes the trainable and
    ``param_space`` again but no run config) gives the restored run those pickled copies
    back: a callback holding the first process's progress and records would report to
    objects nobody reads. Each event therefore looks up the live sweep of the process it
    fires in (``_LIVE``, set by ``run_sweep`` around ``fit``), so a resumed sweep's
    callbacks report to the process that resumed it without reaching into Tune's
    internals."""

    def __init__(self, key: str):
        self.key = key

    def on_trial_start(self, iteration, trials, trial, **info):
        live = live_sweep(self.key)
        key = trial.config.get("trial")
        live.progress.started(key, live.names.get(key, trial.trial_id))

    def on_trial_complete(self, iteration, trials, trial, **info):
        live = live_sweep(self.key)
        result = trial.last_result or {}
        if "record" not in result:
            live.progress.running = max(0, live.progress.running - 1)
            return
        record = TrialRecord.from_dict(json.loads(result["record"]))
        key = trial.config["trial"]
        live.records[key] = record
        if live.cfg.tracking.enabled:
            log_trial(live.cfg, experiment_name(live.cfg), key, record, parent_run_id=live.parent_run_id)
        live.progress.finished_ok(key, live.names.get(key, key), record.metrics[TrialRecord.PPL_MACRO])

    def on_trial_recover(self, iteration, trials, trial, **info):
        # Tune runs it again (sweep.max_failures): its run is FAILED until the retry reopens it.
        live = live_sweep(self.key)
        key = trial.config.get("trial")
        why = _last_error(trial)
        self.fail_run(live, key, why)
        live.progress.retrying(key, live.names.get(key, trial.trial_id), why, trial.num_failures,
                               live.cfg.sweep.max_failures)

    def on_trial_error(self, iteration, trials, trial, **info):
        live = live_sweep(self.key)
        key = trial.config.get("trial")
        why = _last_error(trial)
        self.fail_run(live, key, why)
        live.progress.errored(key, live.names.get(key, trial.trial_id), why)

    @staticmethod
    def fail_run(live: LiveSweep, key: str | None, why: str) -> None:
        # A worker killed mid-trial could not mark its run; its attempt's error is here.
        if live.cfg.tracking.enabled and key:
            fail_trial_run(live.cfg, experiment_name(live.cfg), key, why)


def prepare_shared(cfg: RunConfig, plan: SweepPlan, log: Callable[[str], None] | None,
                   recipe: str = "RECIPE") -> None:
    """Tokenizer, clustering, each trial's Ray Data stages and every shared generic phase,
    once, on the driver; after the first generic phase trained here, its measured rate
    against the device profile's (``rate_line``)."""
    ensure_tokenizer(cfg)

    clustered = set()
    for t in plan.trials:  # one clustering per distinct cluster setting and in-domain size
        if "clusters" in get_strategy(t.strategy).requires:
            tcfg = t.config(cfg)
            if (repr(tcfg.cluster), t.in_domain) not in clustered:
                clustered.add((repr(tcfg.cluster), t.in_domain))
                run_clustering(tcfg, progress=log is not None)
    for t in plan.trials:  # per-domain Ray Data work (resampling, expert histograms) stays out of Tune
        tcfg = t.config(cfg)
        get_strategy(t.strategy).prepare(StrategyContext(tcfg, make_launcher(tcfg, log=log), log=log), t.domain)
    rated = False
    for i, phase in enumerate(plan.generic, 1):
        tcfg = phase.trial.config(cfg)
        label = f"{phase.family}@{phase.budget.label()}"
        if log:
            log(f"[sweep] generic phase {i}/{len(plan.generic)}: {label} "
                f"(shared by {phase.trials} trials; projected {phase.flops:.3e} FLOPs, "
                f"{hours(phase.work, cfg.device):.3g} {cfg.device.name} hours)")
        t0 = time.perf_counter()
        artifact = get_strategy(phase.strategy).pretrain(StrategyContext(tcfg, make_launcher(tcfg, log=log), log=log))
        cost = getattr(artifact, "cost", None)
        # The first phase trained here (a reused one took seconds of its recorded wall time).
        if not rated and log and cost is not None and time.perf_counter() - t0 >= 0.5 * cost.wall_seconds:
            line = rate_line(label, cost, cfg, recipe)
            if line:
                rated = True
                log(line)


RATE_TOLERANCE = 1.5
"""A measured / projected rate beyond this factor either way is worth a calibration."""


def rate_line(label: str, cost, cfg: RunConfig, recipe: str = "RECIPE") -> str | None:
    """How a generic phase's measured training tokens/s (its wall time: validation and any
    compile included) compare with what ``cfg.device`` projects for the same work."""
    got = measured_vs_projected(cost, cfg.device)
    if got is None:
        return None
    sizes = "+".join(f"{p / 1e6:.2f}M" for p in got["params"])
    line = (f"[sweep] generic phase {label} trained at {got['measured']:,.0f} tokens/s ({sizes} parameters, "
            f"{got['wall_seconds']:.3g} s of wall time) where device profile {cfg.device.name} projects "
            f"{got['projected']:,.0f} ({got['projected_seconds']:.3g} s): measured / profile {got['ratio']:.2f}x")
    if not 1 / RATE_TOLERANCE <= got["ratio"] <= RATE_TOLERANCE:
        line += (f"; this sweep's projected device-hours are off by about that factor on this machine "
                 f"(`slmfactory calibrate -c {recipe}` measures its rows)")
    return line


def ray_cluster_shape() -> ClusterShape:
    """The alive nodes of the Ray cluster this process is connected to."""
    import ray

    nodes = [{k: float(v) for k, v in n["Resources"].items() if k in ("CPU", "GPU")}
             for n in ray.nodes() if n.get("Alive")]
    return ClusterShape(tuple(nodes), "the Ray cluster the sweep sees")


def this_machine_shape() -> ClusterShape:
    """This machine as a one-node cluster (a dry run with no cluster to look at)."""
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return ClusterShape(({"CPU": float(os.cpu_count() or 1), **({"GPU": float(gpus)} if gpus else {})},),
                        "this machine; --address reads a cluster's nodes, --nodes N --gpus-per-node G "
                        "--cpus-per-node C describes one")


def _dry_run_cluster(address: str | None) -> ClusterShape:
    if not (address or os.environ.get("RAY_ADDRESS")):
        return this_machine_shape()
    with ray_session(address):
        return ray_cluster_shape()


def run_sweep(cfg: RunConfig, resume: bool = False, dry_run: bool = False, address: str | None = None,
              log: Callable[[str], None] | None = say, recipe: str = "RECIPE",
              cluster: ClusterShape | None = None) -> SweepOutcome | None:
    """``recipe``: the recipe's path as the user gave it (the warnings' commands name it);
    ``cluster``: the nodes a dry run plans for (default: the cluster at ``address`` or
    ``RAY_ADDRESS``, else this machine)."""
    # Trials run with the trial folder as their working directory: paths must be absolute.
    cfg = size_generic_pool(cfg.replace(workdir=str(cfg.root.resolve())), log)
    warning = machine_warning(cfg.device, this_machine(), recipe)
    if dry_run:
        no_corpus = not (cfg.corpus_dir / "manifest.json").is_file()
        if no_corpus:  # a plan needs no corpus: paper scale is planned before its corpus exists
            plan = plan_sweep(cfg, list(cfg.sweep.domains) or list(cfg.corpus.domains))
        else:
            ensure_corpus(cfg, build=False)
            plan = plan_sweep(cfg, list_domains(cfg.corpus_dir))
        if log:
            log((f"(no corpus at {cfg.corpus_dir} yet: domains taken from the recipe)\n" if no_corpus else "")
                + describe(plan, cfg) + "\n" + describe_resources(plan, cfg, cluster or _dry_run_cluster(address))
                + (f"\n\nwarning: {warning}" if warning else ""))
        return None
    ensure_corpus(cfg, build=False)
    plan = plan_sweep(cfg, list_domains(cfg.corpus_dir))
    if warning and log:
        log(f"[sweep] warning: {warning}")
    path = sweep_dir(cfg, plan.name)
    t0 = time.perf_counter()
    records: dict[str, TrialRecord] = {}
    # The experiment state is saved every second (trials last minutes): a killed driver
    # loses at most that much bookkeeping, and --resume knows every finished trial.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")
    with ray_session(address):
        if resume and not tune.Tuner.can_restore(str(path)):
            # One command for a long run's every start, the first included (a background job
            # restarted by hand or by a script need not know whether it ever began).
            if log:
                log(f"[sweep] --resume: nothing to resume at {path}; starting the sweep")
            resume = False
        parent = None
        if cfg.tracking.enabled:  # the store, experiment and the sweep's parent run, before any trial logs

            parent = ensure_sweep_run(cfg, experiment_name(cfg), plan.name, describe(plan, cfg))
        prepare_shared(cfg, plan, log, recipe)
        # Each trial reserves what its phases declare (plan.trial_resources): its own bundle
        # for the phases it runs in itself; Ray Train reserves a bigger phase's workers.
        shape = ray_cluster_shape()
        by_key = {t.key: t for t in plan.trials}
        reserve = {k: trial_resources(t.config(cfg), t.strategy) for k, t in by_key.items()}
        fits = concurrency(plan, cfg, shape)
        # Ray places every trial that fits; the limit keeps Tune from starting drivers whose
        # Ray Train groups could only wait (Ray's advice for Train inside Tune).
        concurrent = cfg.sweep.max_concurrent or max(1, max(fits.values()))
        if log:
            for strategy, n in fits.items():
                if n == 0:  # Ray would hold the trial's placement group request until nodes join
                    held = reserve[next(t.key for t in plan.trials if t.strategy == strategy)]
                    log(f"[sweep] warning: a {strategy} trial reserves {held.label()} at once, which no placement "
                        f"on {shape.label()} holds: its trials wait until the cluster grows (an autoscaler adds "
                        f"nodes); lower scaling.<phase> or add nodes")
        if log:
            cpus = sum(n.get("CPU", 0.0) for n in shape.nodes)
            gpus = sum(n.get("GPU", 0.0) for n in shape.nodes)
            log(f"[sweep] {len(plan.trials)} trials on Ray Tune, up to {concurrent} at a time ({cpus:g} CPUs"
                + (f", {gpus:g} GPUs" if gpus else "") + f") on {shape.label()} ("
                + ", ".join(f"{s}: {n} at once, each {reserve[next(t.key for t in plan.trials if t.strategy == s)].label()}"
                            for s, n in fits.items())
                + f"); MLflow experiment {experiment_name(cfg)!r} at {cfg.tracking_uri}")
        # The ETA's work: each trial's projected specialisation FLOPs from the plan (the dry-run's).
        progress = _Progress(len(plan.trials), log,
                             flops={k: sum(w.flops for w in work) for k, work in plan.spec_work.items()},
                             slots=concurrent)
        _LIVE[str(path)] = LiveSweep(cfg, {t.key: t.name for t in plan.trials}, progress, records, parent)
        callback = TrialLogger(str(path))
        trainable = tune.with_resources(
            _trainable, lambda config: tune.PlacementGroupFactory([reserve[config["trial"]].head]))
        space = {"trial": tune.grid_search(list(by_key)),
                 "cfg": tune.sample_from(lambda config: by_key[config["trial"]].config(cfg).to_tree()),
                 "cpus": tune.sample_from(lambda config: reserve[config["trial"]].head.get("CPU", 1.0)),
                 "parent_run": parent}
        if resume:
            # Public API only: the restored run keeps its pickled TrialLogger, which finds this
            # process's live sweep under the same folder (_LIVE).
            tuner = tune.Tuner.restore(str(path), trainable, resume_unfinished=True, resume_errored=True,
                                       param_space=space)
        else:
            tuner = tune.Tuner(
                trainable, param_space=space,
                # Trial actors are reused: a new process per trial (torch, transformers
                # imports) would cost seconds per trial.
                tune_config=tune.TuneConfig(max_concurrent_trials=concurrent, reuse_actors=True,
                                            trial_name_creator=lambda t: by_key[t.config["trial"]].name,
                                            trial_dirname_creator=lambda t: f'{by_key[t.config["trial"]].name[:64]}-{t.config["trial"][:8]}'),
                # A failed trial runs again (its stages resume from their checkpoints) in
                # its one MLflow run.
                run_config=tune.RunConfig(name=plan.name, storage_path=str(path.parent), callbacks=[callback],
                                          failure_config=tune.FailureConfig(max_failures=cfg.sweep.max_failures),
                                          verbose=0))
        try:
            results = tuner.fit()
        finally:
            progress.close()  # the live table (a terminal only) stops, its last state left on screen
            _LIVE.pop(str(path), None)
        if parent is not None:
            stopped = fail_running_trials(cfg.tracking_uri, experiment_name(cfg), parent)
            if stopped and log:
                log(f"[sweep] {len(stopped)} trial run(s) left RUNNING by stopped trials marked FAILED "
                    f"(--resume reopens them)")
        for r in results:
            if r.error is None and r.metrics and "record" in r.metrics:
                records.setdefault(r.config["trial"], TrialRecord.from_dict(json.loads(r.metrics["record"])))
        failed = [r for r in results if r.error is not None]
    if parent is not None:
        update_champions(cfg.tracking_uri, experiment_name(cfg), cfg.sweep.inference_caps, log)
        # A failed trial leaves the sweep RUNNING: --resume finishes it under the same parent.
        if not failed:
            finish_sweep_run(cfg, parent)
    if failed:
        raise SlmFactoryError(f"sweep: {len(failed)} of {len(plan.trials)} trials failed (first: {failed[0].error}); "
                              f"fix and rerun with --resume")
    return SweepOutcome(plan, experiment_name(cfg), records, time.perf_counter() - t0)
