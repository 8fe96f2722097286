"""A sweep's trial plan: the recipe's ``sweep:`` grid expanded into trials, the generic
phases they share, each phase's projected FLOPs and device-hours (priced by the device
profile from each phase's :class:`~slmfactory.platform.cost.Work`), and the peak memory
each stage needs.

A trial (:class:`slmfactory.trial.Trial`) is (strategy, domain, generic budget,
specialisation budget, in-domain size, settings); ``sweep.grid`` adds settings and
``sweep.only`` restricts what one strategy crosses.

The two budget axes mean the same thing for every strategy: the generic axis is what a
strategy spends before any domain is known (shared), the spec axis what it spends once
the domain is known (per domain: slm-is's resampled pretraining and fine-tuning,
slm-nopt's training from scratch, slm-d's teacher fine-tuning, teacher forward passes and
student training, best-after-fine-tuning's k fine-tunes). A strategy with no generic
phase (slm-is, slm-nopt) does not take the generic axis: it has one trial per spec budget
(generic budget ``none``), and the dry-run says so.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from slmfactory.models.arch import build_model, count_params
from slmfactory.models.strategies import get_strategy
from slmfactory.platform.config import RunConfig
from slmfactory.platform.cost import Work, device_seconds
from slmfactory.platform.errors import ConfigError
from slmfactory.platform.footprint import GiB, stage_memory
from slmfactory.platform.stages import digest
from slmfactory.trial import Budget, Trial, budget_of, config_value, sweep_name


@dataclass
class GenericPhase:
    """A generic phase the plan shares: one (strategy family, generic budget)."""

    family: str
    budget: Budget
    strategy: str
    """A strategy that trains it (the driver runs its ``pretrain``)."""
    trials: int
    work: list[Work]
    trial: "Trial | None" = None
    """A trial whose config trains it."""

    @property
    def flops(self) -> float:
        return sum(w.flops for w in self.work)


@dataclass
class SweepPlan:
    name: str
    trials: list[Trial]
    generic: list[GenericPhase]
    spec_work: dict[str, list[Work]]
    """Trial key -> projected specialisation work."""
    generic_of: dict[str, str | None]
    """Trial key -> its generic phase's label (None: no generic phase)."""


def _budgets(tokens: tuple, flops: tuple, default: Budget) -> list[Budget]:
    out = [Budget("tokens", float(v)) for v in tokens] + [Budget("flops", float(v)) for v in flops]
    return out or [default]


def _kept(only: tuple[dict, ...] | None, t: Trial, generic: Budget, spec: Budget, settings: tuple) -> bool:
    """Whether ``sweep.only``'s restrictions for the trial's strategy keep it (any one of
    them keeping it is enough)."""
    if not only:
        return True
    values = {"domains": t.domain, "in_domain_tokens": t.in_domain, **dict(settings),
              f"generic_{generic.unit}": generic.value, f"spec_{spec.unit}": spec.value}
    # An axis the trial's budget is not in (generic_flops for a token budget) keeps nothing.
    return any(all(values.get(axis, _ABSENT) in kept for axis, kept in restriction.items())
               for restriction in only)


_ABSENT = object()


def plan_sweep(cfg: RunConfig, domains_available: list[str]) -> SweepPlan:
    """Expand ``cfg.sweep`` into trials; every error names its ``sweep.*`` key and comes
    before any trial starts."""
    s = cfg.sweep
    if not s.strategies:
        raise ConfigError("sweep.strategies: empty grid (list at least one strategy)")
    for name in s.strategies:
        get_strategy(name)  # unknown -> ConfigError naming the key
    domains = list(s.domains) or ([cfg.data.domain] if cfg.data.domain else [])
    if not domains:
        raise ConfigError("sweep.domains: empty grid (list at least one domain)")
    for d in domains:
        if d not in domains_available:
            raise ConfigError(f"sweep.domains: unknown domain {d!r} (the corpus has {', '.join(domains_available)})")
    generic = _budgets(s.generic_tokens, s.generic_flops, budget_of(cfg.pretrain))
    spec = _budgets(s.spec_tokens, s.spec_flops, budget_of(cfg.finetune))
    sizes = list(s.in_domain_tokens) or [cfg.data.domain_train_tokens]
    for key in s.grid:
        config_value(cfg, key)  # unknown key -> ConfigError naming sweep.grid.<key>
    grid_keys = sorted(s.grid)
    settings = [tuple(zip(grid_keys, values)) for values in itertools.product(*(s.grid[k] for k in grid_keys))]
    trials: list[Trial] = []
    seen: set[str] = set()
    for st, g, sp, n, extra, d in itertools.product(s.strategies, generic, spec, sizes, settings, domains):
        # A strategy without a generic phase takes no generic axis: one trial, not one per budget.
        t = Trial(st, d, g if get_strategy(st).generic_family is not None else None, sp, n, extra)
        if not _kept(s.only.get(st), t, g, sp, extra):
            continue
        if t.key not in seen:
            seen.add(t.key)
            trials.append(t)
    for t in trials:
        try:
            t.config(cfg)
        except ConfigError as e:
            raise ConfigError(f"sweep.grid: trial {t.name}: {e}") from None
    phases: dict[tuple[str, Budget, str], GenericPhase] = {}
    spec_work: dict[str, list[Work]] = {}
    generic_of: dict[str, str | None] = {}
    for t in trials:
        strategy = get_strategy(t.strategy)
        tcfg = t.config(cfg)
        g_work, s_work = strategy.projected_work(tcfg)
        spec_work[t.key] = s_work
        family = strategy.generic_family
        if family is None:
            generic_of[t.key] = None
            continue
        # Generic phases are shared by every trial whose generic side is the same config
        # (a seed or cluster.k in the grid gives another phase; a fine-tune seed does not).
        gcfg = tcfg.replace(**{"data.domain": "", "finetune.seed": 0})
        key = (family, t.generic, digest("generic-side", gcfg.pretrain, gcfg.cluster, gcfg.slm, gcfg.llm,
                                         gcfg.strategy.settings.get(family), gcfg.data.seq_len))
        if key not in phases:
            phases[key] = GenericPhase(family, t.generic, t.strategy, 0, g_work, trial=t)
        phases[key].trials += 1
        generic_of[t.key] = f"{family}@{t.generic_label}"
    return SweepPlan(name=sweep_name(cfg), trials=trials, generic=list(phases.values()),
                     spec_work=spec_work, generic_of=generic_of)


WINDOW_FILL = 0.8
"""Assumed mean fill of a clustering window (documents end mid-window), sizing the pool."""


def size_generic_pool(cfg: RunConfig, log=None) -> RunConfig:
    """``cfg`` with ``cluster.max_generic_windows`` raised, if capped, so that the embedded
    generic pool the cluster-based strategies (slm-mix, slm-pn, slm-is) draw from holds at
    least the sweep's largest generic token budget: past the pool they would repeat epochs
    where slm and llm read fresh text."""
    c = cfg.cluster
    if c.max_generic_windows == 0:
        return cfg
    largest = max(list(cfg.sweep.generic_tokens) + [cfg.pretrain.max_tokens])
    needed = -(-largest // int(c.window_tokens * WINDOW_FILL))
    if needed <= c.max_generic_windows:
        return cfg
    if log:
        log(f"[sweep] cluster.max_generic_windows raised from {c.max_generic_windows:,} to {needed:,}: the "
            f"embedded generic pool must hold the largest generic budget ({largest:,.0f} tokens)")
    return cfg.replace(**{"cluster.max_generic_windows": needed})


def spec_epochs(work: list[Work], in_domain: int) -> float:
    """Projected passes over the in-domain set of the specialisation's final training phase
    (the fine-tune every strategy ends with; slm-is's resampled pretraining before it reads
    generic data)."""
    train = [w for w in work if w.kind == "train"]
    return train[-1].tokens / in_domain if train else 0.0


def hours(work: list[Work], profile) -> float:
    return sum(device_seconds(w, profile) for w in work) / 3600.0


def memory_rows(plan: SweepPlan, cfg: RunConfig) -> list:
    """The peak memory of every stage (``footprint.stage_memory``) at the plan's sizes."""
    import torch

    extra = {}
    for p in plan.generic:
        top = max((w.optimizer_extra_params for w in p.work), default=0.0)
        if top > 0:
            extra[p.family] = max(extra.get(p.family, 0.0), top)
    with torch.device("meta"):  # counted, not allocated
        params = {key: count_params(build_model(getattr(cfg, key), cfg.tokenizer.vocab_size, cfg.data.seq_len))
                  for key in ("slm", "llm")}
    return stage_memory(cfg, params, extra)


def describe(plan: SweepPlan, cfg: RunConfig) -> str:
    """The dry-run's text: trials, the shared generic phases, projected FLOPs and
    device-hours per phase and in total, and the peak memory of each stage."""
    import torch

    profile = cfg.device
    measured = ", ".join(f"{r.params / 1e6:,.3g}M: {r.train_tokens_per_s:,.0f} tok/s" for r in profile.rows())
    lines = [f"sweep {plan.name!r}: {len(plan.trials)} trials, {len(plan.generic)} shared generic phases",
             f"device profile {profile.name}: peak {profile.peak_flops:.3g} FLOP/s, "
             + (f"measured training throughput {measured} (MFU {profile.mfu} elsewhere)" if measured
                else f"MFU {profile.mfu}") + "; each phase on its own resources (scaling.<phase>)", "",
             f"{'generic phase':<28}{'trials':>7}{'tokens':>12}{'FLOPs':>12}{'hours':>11}{'epochs':>8}"]
    pool = cfg.cluster.max_generic_windows * cfg.cluster.window_tokens * WINDOW_FILL
    for p in plan.generic:
        tokens = sum(w.tokens for w in p.work if w.kind == "train")
        # Cluster-based families read the embedded pool (capped: known here); slm and llm
        # read the generic split itself (its epochs are measured when they run).
        epochs = f"{tokens / pool:>8.2f}" if pool and p.family in ("slm-mix", "slm-pn") else f"{'-':>8}"
        lines.append(f"{p.family + '@' + p.budget.label():<28}{p.trials:>7}{tokens:>12.3g}{p.flops:>12.3e}"
                     f"{hours(p.work, profile):>11.2f}{epochs}")
    lines += ["", f"{'trial':<60}{'generic phase':<24}{'spec tokens':>12}{'spec FLOPs':>12}{'hours':>9}"
              f"{'epochs':>8}"]
    repeats = []
    for t in plan.trials:
        work = plan.spec_work[t.key]
        tokens = sum(w.tokens for w in work if w.kind == "train")
        epochs = spec_epochs(work, t.in_domain)
        lines.append(f"{t.name:<60}{plan.generic_of[t.key] or '-':<24}{tokens:>12,}{sum(w.flops for w in work):>12.3e}"
                     f"{hours(work, profile):>9.2f}{epochs:>8.2f}")
        if epochs > 1:
            repeats.append(t.name)
    no_generic = sorted({t.strategy for t in plan.trials if t.generic is None})
    if no_generic:
        lines += ["", f"not on the generic axis: {', '.join(no_generic)} (no generic pretraining: one trial per "
                  f"spec budget, generic budget 'none'; slm-is's only generic cost is the shared clustering)"]
    if repeats:
        lines.append(f"note: {len(repeats)} trials fine-tune for more than one epoch of their in-domain set "
                     f"(early stopping on the domain's validation split usually ends them sooner)")
    g_work = [w for p in plan.generic for w in p.work]
    s_work = [w for work in plan.spec_work.values() for w in work]
    g_h, s_h = hours(g_work, profile), hours(s_work, profile)
    lines += ["", f"total: generic {sum(w.flops for w in g_work):.3e} FLOPs ({g_h:,.2f} h), specialisation "
              f"{sum(w.flops for w in s_work):.3e} FLOPs ({s_h:,.2f} h), all {g_h + s_h:,.2f} {profile.name} hours"]
    rows = memory_rows(plan, cfg)
    lines += ["", f"{'peak memory by stage':<34}{'where':<8}{'estimate':>13}  grows with"]
    lines += [r.line() for r in rows]
    device_peak = max(r.bytes for r in rows if r.where == "device") / GiB
    lines.append(f"largest per-device need: {device_peak:.1f} GiB")
    return "\n".join(lines)


# -- resources: what each trial reserves, how many run at once, how long the sweep takes --------

TRIAL_DRIVER_CPUS = 0.1
"""A trial whose phases all run on Ray Train worker groups only drives and waits for them."""


@dataclass(frozen=True)
class TrialResources:
    """What one trial asks the cluster for.

    ``head`` is the trial's own placement group (Tune's, one bundle): the process that runs
    its one-worker phases in itself (their workers' GPU share and CPUs, the largest of
    them), or only drives Ray Train. ``groups`` are its phases of more than one worker:
    Ray Train V2 reserves each in a placement group of its own when the phase starts
    (one bundle per worker), one phase at a time, so at most the largest is held at once."""

    head: dict[str, float]
    groups: tuple[tuple[dict[str, float], ...], ...] = ()
    held: tuple[str, ...] = ()
    """The phase kinds whose one worker runs in the trial's own process."""
    devices: float = 1.0
    """The device share its slowest phase trains on (workers x GPUs each; a CPU worker is
    one device): the projected wall time divides its device-hours by it."""

    def reservation(self) -> list[dict[str, float]]:
        """Every bundle held at the trial's busiest moment (head + its largest group)."""
        largest = max(self.groups, key=lambda g: sum(b.get("GPU", 0.0) for b in g) * 1e6
                      + sum(b.get("CPU", 0.0) for b in g), default=())
        return [self.head, *largest]

    def label(self) -> str:
        text = _bundle_label(self.head)
        for g in self.groups:
            text += f" + Ray Train {len(g)} x ({_bundle_label(g[0])})"
        return text


def _bundle_label(b: dict[str, float]) -> str:
    return ", ".join(f"{v:g} {k}" for k, v in sorted(b.items(), key=lambda kv: kv[0] != "GPU") if v > 0)


def phase_devices(r) -> float:
    return r.num_workers * (r.gpus_per_worker if r.use_gpu else 1.0)


def trial_resources(cfg: RunConfig, strategy: str) -> TrialResources:
    """A trial's reservation from its strategy's in-trial phases (``spec_phases``) and
    their ``scaling.<phase>`` resources."""
    kinds = get_strategy(strategy).spec_phases
    head: dict[str, float] = {}
    groups, held = [], []
    for kind in kinds:
        r = cfg.scaling.phase(kind)
        if r.num_workers == 1:
            held.append(kind)
            for k, v in r.bundle().items():
                head[k] = max(head.get(k, 0.0), v)
        else:
            groups.append(tuple(r.bundle() for _ in range(r.num_workers)))
    if not head:
        head = {"CPU": TRIAL_DRIVER_CPUS}
    devices = min((phase_devices(cfg.scaling.phase(k)) for k in kinds), default=1.0)
    return TrialResources(head, tuple(groups), tuple(held), devices)


def copies_that_fit(nodes: list[dict[str, float]], bundles: list[dict[str, float]], limit: int = 100_000) -> int:
    """How many copies of ``bundles`` (one trial's reservation) Ray can place at once on
    ``nodes`` (each a node's resources), every bundle whole on one node, first fit."""
    free = [dict(n) for n in nodes]
    order = sorted(bundles, key=lambda b: (-b.get("GPU", 0.0), -b.get("CPU", 0.0)))
    count = 0
    while count < limit:
        trial = [dict(n) for n in free]
        for b in order:
            node = next((n for n in trial if all(n.get(k, 0.0) + 1e-9 >= v for k, v in b.items())), None)
            if node is None:
                return count
            for k, v in b.items():
                node[k] = node.get(k, 0.0) - v
        free, count = trial, count + 1
    return count


@dataclass(frozen=True)
class ClusterShape:
    """The nodes a plan is packed onto: the cluster the sweep sees, or one described by flags."""

    nodes: tuple[dict[str, float], ...]
    source: str

    @classmethod
    def described(cls, nodes: int, gpus_per_node: float, cpus_per_node: float) -> "ClusterShape":
        node = {"CPU": float(cpus_per_node), **({"GPU": float(gpus_per_node)} if gpus_per_node else {})}
        return cls(tuple(dict(node) for _ in range(nodes)), "described by --nodes/--gpus-per-node/--cpus-per-node")

    def label(self) -> str:
        shapes: dict[str, int] = {}
        for n in self.nodes:
            shapes[_bundle_label(n)] = shapes.get(_bundle_label(n), 0) + 1
        return " + ".join(f"{c} node{'s' if c > 1 else ''} x ({s})" for s, c in shapes.items())


def concurrency(plan: SweepPlan, cfg: RunConfig, cluster: ClusterShape) -> dict[str, int]:
    """Strategy -> trials of it that run at once on ``cluster`` (a sweep of it alone)."""
    out = {}
    for t in plan.trials:
        if t.strategy not in out:
            out[t.strategy] = copies_that_fit(list(cluster.nodes), trial_resources(t.config(cfg), t.strategy)
                                              .reservation())
    return out


def projected_wall(plan: SweepPlan, cfg: RunConfig, cluster: ClusterShape) -> tuple[float, float]:
    """(generic, trials) projected wall seconds on ``cluster``.

    The generic phases run one after another on the driver, each on its own workers
    (device-hours over its devices: ideal data parallelism). The trials then start in the
    plan's order, each as soon as its reservation fits beside the running ones, and run for
    their projected device-hours over their device share (a fine-tune on half a GPU beside
    another takes twice its GPU-hours)."""
    import heapq

    generic = 0.0
    for p in plan.generic:
        kinds = get_strategy(p.strategy).generic_phases or ("pretrain",)
        for i, w in enumerate(p.work):
            r = p.trial.config(cfg).scaling.phase(kinds[i] if len(kinds) == len(p.work) else kinds[0])
            generic += device_seconds(w, cfg.device) / phase_devices(r)
    pending = []
    for t in plan.trials:
        res = trial_resources(t.config(cfg), t.strategy)
        seconds = sum(device_seconds(w, cfg.device) for w in plan.spec_work[t.key]) / res.devices
        pending.append((res.reservation(), seconds))
    for bundles, _ in pending:
        if copies_that_fit(list(cluster.nodes), bundles, limit=1) == 0:
            return generic, float("inf")
    free = [dict(n) for n in cluster.nodes]
    running: list[tuple[float, int, list]] = []  # (end, id, [(node index, bundle)])
    now, ident = 0.0, 0
    while pending or running:
        started = True
        while started:
            started = False
            for i, (bundles, seconds) in enumerate(pending):
                placed, trial = [], [dict(n) for n in free]
                for b in sorted(bundles, key=lambda b: (-b.get("GPU", 0.0), -b.get("CPU", 0.0))):
                    j = next((j for j, n in enumerate(trial) if all(n.get(k, 0.0) + 1e-9 >= v
                                                                   for k, v in b.items())), None)
                    if j is None:
                        break
                    for k, v in b.items():
                        trial[j][k] -= v
                    placed.append((j, b))
                else:
                    free = trial
                    heapq.heappush(running, (now + seconds, ident, placed))
                    ident += 1
                    pending.pop(i)
                    started = True
                    break
        end, _, placed = heapq.heappop(running)
        now = end
        for j, b in placed:
            for k, v in b.items():
                free[j][k] += v
    return generic, now


def wall_label(seconds: float) -> str:
    """``1,028.5 h``; under an hour in minutes (``48 min``)."""
    return f"{seconds / 3600:,.1f} h" if seconds >= 3600 else f"{seconds / 60:.0f} min"


def describe_resources(plan: SweepPlan, cfg: RunConfig, cluster: ClusterShape) -> str:
    """The dry-run's resource plan: each phase's workers, GPUs and CPUs, each strategy's
    trial reservation, how many trials run at once on ``cluster`` (and how many the global
    ``scaling`` alone would allow), and the projected wall time there."""
    from slmfactory.platform.config import PHASES

    s = cfg.scaling
    used = {k for t in plan.trials for k in (*get_strategy(t.strategy).generic_phases, *get_strategy(t.strategy).spec_phases)}
    lines = ["", "resources per phase (scaling.<phase>; a key not set takes scaling's own):",
             f"  {'phase':<14}{'workers':>8}{'GPUs/worker':>13}{'CPUs/worker':>13}  runs"]
    for kind in PHASES:
        r = s.phase(kind)
        where = ("before the trials, on the driver" if kind in ("pretrain", "pretrain_llm", "experts")
                 else "inside a trial")
        where += ": Ray Train worker group" if r.num_workers > 1 or (r.use_gpu and where.startswith("before")) \
            else (": in the trial's own process" if where == "inside a trial" else ": in the driver's process")
        lines.append(f"  {kind:<14}{r.num_workers:>8}{r.gpus_per_worker:>13g}{r.cpus_per_worker:>13g}  {where}"
                     + ("" if kind in used else " (no strategy of this sweep)"))
    shared = {"finetune": "fine-tune slm", "finetune_llm": "fine-tune llm"}
    rows = {r.stage: r.bytes for r in memory_rows(plan, cfg)}
    for kind in PHASES:
        r = s.phase(kind)
        if kind in used and 0 < r.gpus_per_worker < 1:
            n = int(1 / r.gpus_per_worker + 1e-9)
            need = rows.get(shared.get(kind, ""))
            lines.append(f"  {n} trials share a GPU: {kind} holds {r.gpus_per_worker:g} of one"
                         + (f", needing {n} x {need / GiB:.1f} = {n * need / GiB:.1f} GiB of its memory (peak memory "
                            f"above)" if need else ""))
    fits = concurrency(plan, cfg, cluster)
    lines += ["", f"cluster: {cluster.label()} ({cluster.source})",
              f"  {'strategy':<12}{'trials':>7}{'at once':>9}  trial reserves (Tune placement group; + Ray Train groups)"]
    for strategy, n in fits.items():
        t = next(t for t in plan.trials if t.strategy == strategy)
        count = sum(1 for x in plan.trials if x.strategy == strategy)
        lines.append(f"  {strategy:<12}{count:>7}{n:>9}  {trial_resources(t.config(cfg), strategy).label()}")
    d = s.default()
    global_res = TrialResources({"CPU": TRIAL_DRIVER_CPUS}, (tuple(d.bundle() for _ in range(d.num_workers)),)) \
        if d.num_workers > 1 else TrialResources(d.bundle())
    lines.append(f"  with scaling's one setting for every phase ({d.label()}): "
                 f"{copies_that_fit(list(cluster.nodes), global_res.reservation())} trials at once")
    generic, trials = projected_wall(plan, cfg, cluster)
    if trials == float("inf"):
        lines.append("projected wall time: a trial's reservation fits on no node of this cluster")
    else:
        lines.append(f"projected wall time on this cluster: generic phases {wall_label(generic)} (one after "
                     f"another), trials {wall_label(trials)}, all {wall_label(generic + trials)} "
                     f"({cfg.device.name} profile; ideal data parallelism, no queueing or start-up)")
    return "\n".join(lines)
