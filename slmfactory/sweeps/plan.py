"""A sweep's trial plan: the recipe's ``sweep:`` grid expanded into trials, the generic
phases they share, each phase's projected FLOPs and device-hours (priced by the device
profile from each phase's :class:`~slmfactory.platform.cost.Work`), and the peak memory
each stage needs.

A trial is (strategy, domain, generic budget, specialisation budget, in-domain size). Its
run config is the base recipe with those five set; everything else (stage keys, resume,
costs) follows from the config, so a trial is reproducible on its own with
``slmfactory train`` and the overrides it prints.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from slmfactory.platform.config import RunConfig
from slmfactory.platform.cost import Work, device_seconds
from slmfactory.platform.errors import ConfigError
from slmfactory.platform.stages import digest


@dataclass(frozen=True)
class Budget:
    """A phase budget in tokens or in FLOPs (FLOPs compare strategies at equal cost)."""

    unit: str  # "tokens" | "flops"
    value: float

    def label(self) -> str:
        return f"{self.value:.3g}{'F' if self.unit == 'flops' else 'T'}"

    def overrides(self, section: str) -> dict:
        if self.unit == "tokens":
            return {f"{section}.max_tokens": int(self.value), f"{section}.max_flops": 0.0}
        # The FLOP budget decides; max_tokens (the recipe's) stays as an upper bound.
        return {f"{section}.max_flops": float(self.value)}


@dataclass(frozen=True)
class Trial:
    strategy: str
    domain: str
    generic: Budget
    spec: Budget
    in_domain: int

    @property
    def key(self) -> str:
        """Stable across runs and resumes: the MLflow run of a trial is found by it."""
        return digest("trial", self.strategy, self.domain, self.generic, self.spec, self.in_domain)

    @property
    def name(self) -> str:
        return (f"{self.strategy}-{self.domain}-g{self.generic.label()}-s{self.spec.label()}"
                f"-n{self.in_domain}")

    def overrides(self) -> dict:
        return {"strategy.name": self.strategy, "data.domain": self.domain,
                "data.domain_train_tokens": self.in_domain,
                **self.generic.overrides("pretrain"), **self.spec.overrides("finetune")}

    def config(self, base: RunConfig) -> RunConfig:
        return base.replace(**self.overrides())


@dataclass
class GenericPhase:
    """A generic phase the plan shares: one (strategy family, generic budget)."""

    family: str
    budget: Budget
    strategy: str
    """A strategy that trains it (the driver runs its ``pretrain``)."""
    trials: int
    work: list[Work]

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


def sweep_name(cfg: RunConfig) -> str:
    return cfg.sweep.name or cfg.name


def experiment_name(cfg: RunConfig) -> str:
    """The sweep's MLflow experiment (what ``report``, ``recommend`` and ``serve`` read)."""
    return f"{cfg.tracking.experiment}-{sweep_name(cfg)}"


def budget_of(tcfg) -> Budget:
    """The budget a TrainConfig spends: its FLOP cap if set, else its token budget."""
    return Budget("flops", float(tcfg.max_flops)) if tcfg.max_flops else Budget("tokens", float(tcfg.max_tokens))


def trial_of(cfg: RunConfig) -> Trial:
    """The trial a run config is (``slmfactory train`` logs under the same key a sweep would)."""
    return Trial(cfg.strategy.name, cfg.data.domain, budget_of(cfg.pretrain), budget_of(cfg.finetune),
                 cfg.data.domain_train_tokens)


def _budgets(tokens: tuple, flops: tuple, default: Budget) -> list[Budget]:
    out = [Budget("tokens", float(v)) for v in tokens] + [Budget("flops", float(v)) for v in flops]
    return out or [default]


def plan_sweep(cfg: RunConfig, domains_available: list[str]) -> SweepPlan:
    """Expand ``cfg.sweep`` into trials; every error names its ``sweep.*`` key and comes
    before any trial starts."""
    from slmfactory.models.strategies import get_strategy

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
    trials = [Trial(st, d, g, sp, n) for st, g, sp, n, d in itertools.product(s.strategies, generic, spec, sizes,
                                                                               domains)]
    phases: dict[tuple[str, Budget], GenericPhase] = {}
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
        key = (family, t.generic)
        if key not in phases:
            phases[key] = GenericPhase(family, t.generic, t.strategy, 0, g_work)
        phases[key].trials += 1
        generic_of[t.key] = f"{family}@{t.generic.label()}"
    return SweepPlan(name=sweep_name(cfg), trials=trials, generic=list(phases.values()),
                     spec_work=spec_work, generic_of=generic_of)


def hours(work: list[Work], profile) -> float:
    return sum(device_seconds(w, profile) for w in work) / 3600.0


def describe(plan: SweepPlan, cfg: RunConfig) -> str:
    """The dry-run's text: trials, the shared generic phases, projected FLOPs and
    device-hours per phase and in total, and the peak memory of each stage."""
    import torch

    from slmfactory.models.lm import build_model, count_params
    from slmfactory.platform.footprint import GiB, stage_memory

    profile = cfg.device
    measured = ", ".join(f"{r.params / 1e6:,.0f}M: {r.train_tokens_per_s:,.0f} tok/s" for r in profile.rows())
    lines = [f"sweep {plan.name!r}: {len(plan.trials)} trials, {len(plan.generic)} shared generic phases",
             f"device profile {profile.name}: peak {profile.peak_flops:.3g} FLOP/s, "
             + (f"measured training throughput {measured} (MFU {profile.mfu} elsewhere)" if measured
                else f"MFU {profile.mfu}") + f"; {cfg.scaling.num_workers} workers per phase", "",
             f"{'generic phase':<28}{'trials':>7}{'tokens':>12}{'FLOPs':>12}{'hours':>11}"]
    for p in plan.generic:
        tokens = sum(w.tokens for w in p.work)
        lines.append(f"{p.family + '@' + p.budget.label():<28}{p.trials:>7}{tokens:>12.3g}{p.flops:>12.3e}"
                     f"{hours(p.work, profile):>11.2f}")
    lines += ["", f"{'trial':<52}{'generic phase':<24}{'spec FLOPs':>12}{'hours':>11}"]
    for t in plan.trials:
        work = plan.spec_work[t.key]
        lines.append(f"{t.name:<52}{plan.generic_of[t.key] or '-':<24}{sum(w.flops for w in work):>12.3e}"
                     f"{hours(work, profile):>11.2f}")
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
