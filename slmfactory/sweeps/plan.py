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

from slmfactory.models.lm import build_model, count_params
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


def describe(plan: SweepPlan, cfg: RunConfig) -> str:
    """The dry-run's text: trials, the shared generic phases, projected FLOPs and
    device-hours per phase and in total, and the peak memory of each stage."""
    import torch

    profile = cfg.device
    measured = ", ".join(f"{r.params / 1e6:,.3g}M: {r.train_tokens_per_s:,.0f} tok/s" for r in profile.rows())
    lines = [f"sweep {plan.name!r}: {len(plan.trials)} trials, {len(plan.generic)} shared generic phases",
             f"device profile {profile.name}: peak {profile.peak_flops:.3g} FLOP/s, "
             + (f"measured training throughput {measured} (MFU {profile.mfu} elsewhere)" if measured
                else f"MFU {profile.mfu}") + f"; {cfg.scaling.num_workers} workers per phase", "",
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
    extra = {}
    for p in plan.generic:
        top = max((w.optimizer_extra_params for w in p.work), default=0.0)
        if top > 0:
            extra[p.family] = max(extra.get(p.family, 0.0), top)
    with torch.device("meta"):  # counted, not allocated
        params = {key: count_params(build_model(getattr(cfg, key), cfg.tokenizer.vocab_size, cfg.data.seq_len))
                  for key in ("slm", "llm")}
    rows = stage_memory(cfg, params, extra)
    lines += ["", f"{'peak memory by stage':<34}{'where':<8}{'estimate':>13}  grows with"]
    lines += [r.line() for r in rows]
    device_peak = max(r.bytes for r in rows if r.where == "device") / GiB
    lines.append(f"largest per-device need: {device_peak:.1f} GiB")
    return "\n".join(lines)
