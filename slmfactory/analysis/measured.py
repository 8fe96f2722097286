"""A sweep read back from MLflow as measured configurations (``load_configs``): what a
configuration is, its macro perplexity and interval, its costs under either convention, and
its seeds pooled.

Separate from the frontier (``frontier.py``) and the recommendation (``recommend.py``): what a
configuration is and how it is read back is shared by every reader of a sweep (the report,
the figures, the study's pages).

Each trial's run holds one (configuration, domain) measurement. A *configuration* is a
trial without its domain: (strategy, generic budget, specialisation budget, in-domain
size, settings), where ``settings`` are the grid settings beyond those axes (``cluster.k=64,
finetune.seed=1``). Two seeds of one configuration are two configurations (two rows); rows
that differ only in keys ending in ``seed`` are replicates, and their spread is reported.

Macro perplexity and its interval. A configuration's macro NLL is the mean over its D
domains of each domain's mean per-token test NLL, and its macro perplexity is
exp(macro NLL) (the paper's headline metric, docs/paper.md#macro-perplexity). Each trial logs ``test_nll_se``, the bootstrap
standard error of its mean NLL over test sequences; the domains' test sets are independent,
so SE(macro NLL) = sqrt(sum_d se_d^2) / D, and the macro perplexity's 95% interval is
exp(macro NLL ± 1.96 · SE). A per-domain cell shows the trial's own bootstrap percentile
interval ``ppl [lo, hi]``. Two configurations *tie* when the winner's interval overlaps the
runner-up's: the measurement does not separate them. Runs logged before these metrics
existed have no interval (shown as ``n/a``) and never tie.

Costs. In either unit (``flops`` or ``device-hours``), a configuration's generic cost is its
shared generic phase's (paid once, the max over its trials), its specialisation cost the
mean over domains (paid per domain). Over N domains it costs C(N) = C_generic + N · C_spec,
so the budget one domain carries is C_spec + C_generic / N: the "specialisation budget" axis
of the paper's Figure 1 here. Every cost is read under one of two named conventions
(``platform.cost.COST_CONVENTIONS``): *measured* (everything logged) and *paper* (the generic
corpus's embedding, ``cost/clustering_generic_*``, taken out of the generic cost, as the paper
sets C_generic(slm-is) = 0); :func:`apply_conventions` derives the paper's from the measured.

Seeds. Where a configuration ran with two or more seeds, :func:`pool_seeds` makes one
configuration of them whose interval is the *union* of the seeds' intervals (lowest lower
bound to highest upper bound), so it is at least as wide as the seeds' spread, around
exp(mean over seeds of the macro NLL). One N set, :data:`AMORTISATION_N`, is used by every table and
figure.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from slmfactory.platform.cost import MEASURED, PAPER, SERVING_TASKS, check_convention, check_task, generic_under
from slmfactory.platform.errors import DataError
from slmfactory.trial import TRIAL_TAG, Budget, TrialRecord


AMORTISATION_N = TrialRecord.AMORTISATION_N
"""The numbers of domains every table and figure amortises the generic phase over (the
record's: the same N as its ``cost/total_flops_N<n>`` metrics)."""


Z95 = 1.96


COST_UNITS = tuple(u for u in TrialRecord.COST_UNITS if u != "wall_seconds")
"""The cost units a budget is given in (``--cost``): the record's, spelt as its metrics are."""


UNIT_LABEL = {"flops": "FLOPs", "device_hours": "device-hours"}
"""How each unit reads in a table or a plot."""
_SPENT_METRICS = (TrialRecord.spent_tokens_metric("generic"), TrialRecord.spent_tokens_metric("spec"),
                  TrialRecord.EPOCHS_GENERIC, TrialRecord.EPOCHS_SPEC)
"""What each phase trained on: tokens spent and epochs over its data (generic, then spec)."""


EXPERT_STRATEGIES = ("slm-mix", "slm-pn")


def is_seed(key: str) -> bool:
    return key.endswith("seed")


SELECTED_ON_VALIDATION = ("finetune.lr",)
"""Grid settings chosen per domain on the validation split, never compared as configurations:
a sweep that runs ``finetune.lr`` as an axis keeps, for each domain, the run whose fine-tune
reached the lowest validation NLL (test perplexity never picks a hyperparameter)."""


def select_on_validation(items: list, describe) -> list[tuple[Any, str, str]]:
    """``items`` (runs or CSV rows) with the :data:`SELECTED_ON_VALIDATION` settings chosen.

    ``describe(item) -> (configuration key without settings, domain, settings, valid NLL)``.
    Items whose settings differ only in those keys compete per domain and the lowest valid NLL
    wins (ties: the first in settings order). Returns ``(item, settings without those keys,
    the chosen ones)`` for the winners and, unchanged, for every item without such a key."""
    groups: dict[tuple, list[tuple[Any, str, str, float]]] = {}
    out: list[tuple[Any, str, str]] = []
    for item in items:
        key, domain, settings, valid = describe(item)
        parsed = parse_settings(settings)
        chosen = {k: v for k, v in parsed.items() if k in SELECTED_ON_VALIDATION}
        if not chosen:
            out.append((item, settings, ""))
            continue
        rest = ",".join(f"{k}={v}" for k, v in sorted(parsed.items()) if k not in chosen)
        picked = ",".join(f"{k}={v}" for k, v in sorted(chosen.items()))
        if valid is None or not math.isfinite(valid):
            raise DataError(f"{key} on {domain} [{settings}]: no validation NLL to choose {picked} on")
        groups.setdefault((key, domain, rest), []).append((item, rest, picked, valid))
    for candidates in groups.values():
        item, rest, picked, _ = min(sorted(candidates, key=lambda c: c[2]), key=lambda c: c[3])
        # A single candidate chose nothing: its key is dropped from the settings all the same
        # (one configuration whatever the grid ran), but only a real choice is named.
        out.append((item, rest, picked if len(candidates) > 1 else ""))
    return out


def parse_settings(settings: str) -> dict[str, str]:
    return dict(p.split("=", 1) for p in settings.split(",") if p)


def seeds_text(seeds: tuple[str, ...]) -> str:
    """``("pretrain.seed=0", "pretrain.seed=1")`` -> ``pretrain.seed=0, 1`` (one seed key);
    several keys stay whole, separated by ``|``."""
    parsed = [parse_settings(s) for s in seeds]
    keys = {tuple(p) for p in parsed}
    if len(keys) == 1 and len(next(iter(keys))) == 1:
        (key,) = next(iter(keys))
        return f"{key}=" + ", ".join(p[key] for p in parsed)
    return " | ".join(seeds)


@dataclass
class MeasuredConfig:
    """One measured configuration (read back from its trials' runs, not a recipe's
    ``RunConfig``): a strategy at given budgets, in-domain size and settings, over domains."""

    strategy: str
    generic_budget: str
    """The generic budget's label (``Budget.label``, ``none``): display and grouping only;
    the number is ``budgets[0]``."""
    spec_budget: str
    in_domain: int
    settings: str
    params: int
    inference: float
    # unit -> (generic cost paid once, specialisation cost per domain)
    costs: dict[str, tuple[float, float]]
    ppl: dict[str, float]
    nll: dict[str, float]
    se: dict[str, float] = field(default_factory=dict)
    ppl_lo: dict[str, float] = field(default_factory=dict)
    ppl_hi: dict[str, float] = field(default_factory=dict)
    ppl_before: dict[str, float] = field(default_factory=dict)
    entropy: dict[str, float] = field(default_factory=dict)
    generic_ppl: float | None = None
    spent_generic: float | None = None
    spent_spec: float | None = None
    epochs_generic: float | None = None
    epochs_spec: float | None = None
    seed_spread: float | None = None
    embed_generic: dict[str, float] = field(default_factory=dict)
    """unit -> the generic corpus's embedding inside the generic cost (strategies that cluster)."""
    paper_costs: dict[str, tuple[float, float]] | None = None
    """``costs`` under the paper's convention (:func:`apply_conventions`); None: not derived."""
    seeds: tuple[str, ...] = ()
    """The seed settings pooled into this configuration (:func:`pool_seeds`); () for one run."""
    pooled_interval: tuple[float, float] | None = None
    entropy_k: int | None = None
    """How many clusters ``entropy`` is over (None: not logged)."""
    selected: dict[str, str] = field(default_factory=dict)
    """domain -> the settings chosen on validation for it (``finetune.lr=0.003``; empty: none)."""
    serving: dict[str, float] = field(default_factory=dict)
    """task (``generate``, ``score``) -> device-hours per million tokens of serving its models,
    the mean over its domains' models of each one's measured rate (``serving/*``; empty: the
    runs measured none)."""
    serving_machine: str = ""
    """What the serving rates were measured on (the runs' ``serving_machine`` tags, joined)."""
    budgets: tuple[Budget | None, Budget | None] | None = None
    """The generic (None: no generic phase) and specialisation budgets, exact, from the runs'
    tags (``Budget.from_tags``): what orders budgets. Not given (a configuration built from a
    CSV of labels): read from the labels, by ``Budget.from_tags`` too."""
    budget_tags: tuple[str, str] = ("", "")
    """The two budget tags as the runs hold them (exact; a label in runs logged before): what
    finds the runs again (``sweeps.records.trial_model_uri``)."""

    def __post_init__(self) -> None:
        if self.budgets is None:
            R = TrialRecord
            self.budgets = (Budget.from_tags({R.GENERIC_BUDGET: self.generic_budget}, "generic"),
                            Budget.from_tags({R.SPEC_BUDGET: self.spec_budget}, "spec"))
        if not any(self.budget_tags):
            self.budget_tags = (self.generic_budget, self.spec_budget)

    def has_serving_cost(self, task: str = "generate") -> bool:
        return task in self.serving

    def serving_cost(self, task: str = "generate", price_per_device_hour: float = 0.0) -> float:
        """Cost per million ``task`` tokens: device-hours, or (``price_per_device_hour`` > 0)
        their price."""
        hours = self.serving[check_task(task)]
        return hours * price_per_device_hour if price_per_device_hour > 0 else hours

    @property
    def n_seeds(self) -> int:
        return max(1, len(self.seeds))

    @property
    def nll_macro(self) -> float:
        return float(np.mean(list(self.nll.values())))

    @property
    def ppl_macro(self) -> float:
        return math.exp(self.nll_macro)

    @property
    def se_macro(self) -> float | None:
        if set(self.se) != set(self.nll):
            return None  # a domain without its standard error: no honest interval
        return math.sqrt(sum(s * s for s in self.se.values())) / len(self.nll)

    @property
    def interval(self) -> tuple[float, float] | None:
        """95% interval of the macro perplexity: exp(macro NLL ± 1.96 · SE); for seeds pooled
        by :func:`pool_seeds`, the union of the seeds' intervals."""
        if self.seeds:
            return self.pooled_interval
        se = self.se_macro
        if se is None:
            return None
        return math.exp(self.nll_macro - Z95 * se), math.exp(self.nll_macro + Z95 * se)

    @property
    def replicate_key(self) -> tuple:
        """The configuration without its seeds: rows sharing it are replicates."""
        rest = ",".join(f"{k}={v}" for k, v in sorted(parse_settings(self.settings).items()) if not is_seed(k))
        return (self.strategy, self.generic_budget, self.spec_budget, self.in_domain, rest)

    @property
    def label(self) -> str:
        pooled = f"{self.n_seeds} seeds: {seeds_text(self.seeds)}" if self.seeds else ""
        inside = "; ".join(x for x in (self.settings, pooled) if x)
        return f"{self.strategy} g{self.generic_budget} s{self.spec_budget}" + (f" [{inside}]" if inside else "")

    def costs_in(self, convention: str = MEASURED) -> dict[str, tuple[float, float]]:
        """unit -> (generic, specialisation per domain) under ``convention``."""
        if check_convention(convention, "convention") == MEASURED:
            return self.costs
        if self.paper_costs is None:
            apply_conventions([self])
        return self.paper_costs

    def has_cost(self, cost: str, convention: str = MEASURED) -> bool:
        return cost in self.costs_in(convention)

    def generic(self, cost: str = "flops", convention: str = MEASURED) -> float:
        return self.costs_in(convention).get(cost, (0.0, 0.0))[0]

    def spec(self, cost: str = "flops", convention: str = MEASURED) -> float:
        return self.costs_in(convention).get(cost, (0.0, 0.0))[1]

    def total(self, n: int, cost: str = "flops", convention: str = MEASURED) -> float:
        return self.generic(cost, convention) + n * self.spec(cost, convention)

    def per_domain(self, n: int, cost: str = "flops", convention: str = MEASURED) -> float:
        return self.spec(cost, convention) + self.generic(cost, convention) / n


def entropy_clusters(strategy: str, params: dict[str, Any]) -> int | None:
    """How many clusters a trial's ``domain_entropy`` is over, from its flattened config
    (run params, or the recipe with the trial's settings): slm-mix and slm-pn assign the
    domain to their experts' clustering (k = ``strategy.<name>.experts``); every other
    strategy that clusters (slm-is) uses the recipe's ``cluster.k``. For runs logged before
    trials logged ``domain_entropy_k`` themselves."""
    key = f"strategy.{strategy}.experts" if strategy in EXPERT_STRATEGIES else "cluster.k"
    value = params.get(key)
    return int(float(value)) if value not in (None, "") else None


def generic_ppl(m: dict[str, float]) -> float | None:
    """The generic phase's validation perplexity: the contract's ``generic/generic_ppl``
    (routed for slm-mix/slm-pn) first; runs logged before it carry the phase's own names."""
    R = TrialRecord
    if R.GENERIC_PPL in m:
        return m[R.GENERIC_PPL]
    if R.ROUTED_GENERIC_PPL in m:
        return m[R.ROUTED_GENERIC_PPL]
    if R.GENERIC_VALID_NLL in m:
        return math.exp(m[R.GENERIC_VALID_NLL])
    return None


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def refuse_duplicate_trials(experiment: str, runs) -> None:
    """A trial counts once: two finished runs of one trial key (logged by an older version,
    or by hand; the platform finds a trial's run by its key before creating one) would weigh
    its measurement twice in a configuration's costs and pick between them silently. Which
    one is right is the user's call, so this is an error naming the key and the runs, not a
    rule that keeps one."""
    by_key: dict[str, list[str]] = {}
    for r in runs:
        by_key.setdefault(r.data.tags[TRIAL_TAG], []).append(r.info.run_id)
    twice = {k: sorted(ids) for k, ids in sorted(by_key.items()) if len(ids) > 1}
    if twice:
        key, ids = next(iter(twice.items()))
        more = f" ({len(twice) - 1} more trials have several)" if len(twice) > 1 else ""
        raise DataError(f"MLflow experiment {experiment!r}: trial {key} has {len(ids)} finished runs "
                        f"({', '.join(ids)}){more}; a trial counts once: delete all but one "
                        f"(`mlflow runs delete --run-id RUN_ID`) and rerun")


def load_configs(uri: str, experiment: str) -> list[MeasuredConfig]:
    """Every finished trial run of ``experiment`` (runs tagged ``slmfactory.trial``; a sweep's
    parent run and the report run are skipped), grouped into configurations measured on every
    domain, sorted by in-domain size then macro perplexity."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        names = [e.name for e in client.search_experiments()]
        raise DataError(f"MLflow experiment {experiment!r} not found at {uri} (experiments: {', '.join(names) or 'none'})")
    runs = client.search_runs([exp.experiment_id], filter_string="attributes.status = 'FINISHED'",
                              max_results=50000)
    groups: dict[tuple, MeasuredConfig] = {}
    spent: dict[tuple, dict[str, list[float]]] = {}
    R = TrialRecord

    def describe(r):
        t = r.data.tags
        return ((t[R.STRATEGY], t[R.GENERIC_BUDGET], t[R.SPEC_BUDGET], t[R.IN_DOMAIN_TOKENS]), t[R.DOMAIN],
                t.get(R.SETTINGS, ""), r.data.metrics.get(R.VALID_NLL))

    trials = [r for r in runs if TRIAL_TAG in r.data.tags and R.TEST_NLL in r.data.metrics]
    refuse_duplicate_trials(experiment, trials)
    for r, settings, picked in select_on_validation(trials, describe):
        t, m = r.data.tags, r.data.metrics
        generic, spec = Budget.from_tags(t, "generic"), Budget.from_tags(t, "spec")
        key = (t[R.STRATEGY], t[R.GENERIC_BUDGET], t[R.SPEC_BUDGET], int(t[R.IN_DOMAIN_TOKENS]), settings)
        c = groups.setdefault(key, MeasuredConfig(
            t[R.STRATEGY], generic.label() if generic else "none", spec.label(), int(t[R.IN_DOMAIN_TOKENS]), settings,
            params=int(m[R.PARAMS]), inference=m[R.INFERENCE_FLOPS_PER_TOKEN], costs={}, ppl={}, nll={},
            budgets=(generic, spec), budget_tags=(t[R.GENERIC_BUDGET], t[R.SPEC_BUDGET])))
        d = t[R.DOMAIN]
        c.ppl[d], c.nll[d] = m[R.ppl_metric(d)], m[R.TEST_NLL]
        if picked:
            c.selected[d] = picked
        for name, target in ((R.TEST_NLL_SE, c.se), (R.ppl_lo_metric(d), c.ppl_lo), (R.ppl_hi_metric(d), c.ppl_hi),
                             (R.TEST_PPL_BEFORE, c.ppl_before), (R.DOMAIN_ENTROPY, c.entropy)):
            if name in m:
                target[d] = m[name]
        if R.DOMAIN_ENTROPY in m:
            k = m.get(R.DOMAIN_ENTROPY_K)
            k = k if k is not None else entropy_clusters(t[R.STRATEGY], r.data.params)
            c.entropy_k = None if k is None else int(k)
        c.generic_ppl = generic_ppl(m) if c.generic_ppl is None else c.generic_ppl
        acc = spent.setdefault(key, {})
        for unit in COST_UNITS:
            if R.cost_metric("spec", unit) in m:
                acc.setdefault(f"g:{unit}", []).append(m.get(R.cost_metric("generic", unit), 0.0))
                acc.setdefault(f"s:{unit}", []).append(m[R.cost_metric("spec", unit)])
            if R.clustering_cost_metric("generic", unit) in m:
                acc.setdefault(f"e:{unit}", []).append(m[R.clustering_cost_metric("generic", unit)])
        for name in _SPENT_METRICS:
            if name in m:
                acc.setdefault(name, []).append(m[name])
        for task in SERVING_TASKS:
            if R.serving_cost_metric(task) in m:
                acc.setdefault(f"serving:{task}", []).append(m[R.serving_cost_metric(task)])
        if t.get(R.SERVING_MACHINE):
            acc.setdefault("serving_machine", []).append(t[R.SERVING_MACHINE])
    if not groups:
        raise DataError(f"MLflow experiment {experiment!r}: no finished sweep trials to report on")
    for key, c in groups.items():
        acc = spent[key]
        # The generic phase is shared (paid once: the max over its trials); specialisation is
        # paid per domain (the mean over domains).
        c.costs = {u: (max(acc[f"g:{u}"]), float(np.mean(acc[f"s:{u}"]))) for u in COST_UNITS if f"s:{u}" in acc}
        c.embed_generic = {u: max(acc[f"e:{u}"]) for u in COST_UNITS if f"e:{u}" in acc}
        c.spent_generic, c.spent_spec, c.epochs_generic, c.epochs_spec = (_mean(acc.get(name, []))
                                                                          for name in _SPENT_METRICS)
        # Every domain's model measured, or the configuration has no serving cost (a mean over
        # some of its models would price the configuration by the ones that happened to be).
        c.serving = {task: float(np.mean(acc[f"serving:{task}"])) for task in SERVING_TASKS
                     if len(acc.get(f"serving:{task}", [])) == len(c.nll)}
        c.serving_machine = "; ".join(sorted(set(acc.get("serving_machine", []))))
    # Macro perplexity compares like with like: keep configurations measured on every domain.
    domains = set().union(*(c.nll for c in groups.values()))
    configs = [c for c in groups.values() if set(c.nll) == domains]
    set_seed_spread(configs)
    apply_conventions(configs)
    return sorted(configs, key=lambda c: (c.in_domain, c.ppl_macro))


def apply_conventions(configs: list[MeasuredConfig]) -> None:
    """Set each configuration's ``paper_costs``: its measured costs with the generic corpus's
    embedding (``embed_generic``) taken out of the generic cost; a configuration that clusters
    nothing costs the same under both conventions.

    Runs logged before ``cost/clustering_generic_device_hours`` existed carry the embedding in
    FLOPs only. Its device-hours are then those of a configuration whose whole generic cost
    is that same embedding (slm-is: generic FLOPs equal to its embedding FLOPs; the same
    work, so the same projected hours); without one, the paper's device-hours are left out
    (the configuration has no ``device-hours`` under ``paper``)."""
    pure = {}
    for c in configs:
        e = c.embed_generic.get("flops")
        if e and "device_hours" in c.costs and "flops" in c.costs and math.isclose(c.generic("flops"), e, rel_tol=1e-9):
            pure[round(e)] = c.generic("device_hours")
    for c in configs:
        embed = dict(c.embed_generic)
        if embed.get("flops") and "device_hours" not in embed and round(embed["flops"]) in pure:
            embed["device_hours"] = pure[round(embed["flops"])]
        clusters = bool(embed.get("flops"))
        c.paper_costs = {u: (generic_under(PAPER, g, embed[u]) if clusters else g, s)
                         for u, (g, s) in c.costs.items() if not clusters or u in embed}


def pool_seeds(configs: list[MeasuredConfig]) -> list[MeasuredConfig]:
    """One configuration per replicate group (rows that differ only in ``*seed`` settings):
    a group of one is returned as it is; two or more seeds become one configuration whose
    per-domain NLL is the mean over the seeds, whose interval is the union of the seeds'
    intervals (None when a seed has none), whose costs are the seeds' mean, and whose
    ``seeds`` name them. The union is at least as wide as the seeds' spread of macro
    perplexity: a verdict never separates what a second seed would not."""
    groups: dict[tuple, list[MeasuredConfig]] = {}
    for c in configs:
        groups.setdefault(c.replicate_key, []).append(c)
    out = []
    for group in groups.values():
        if len(group) == 1:
            out.append(group[0])
            continue
        group = sorted(group, key=lambda c: c.settings)
        first = group[0]
        ivs = [c.interval for c in group]
        union = (min(iv[0] for iv in ivs), max(iv[1] for iv in ivs)) if all(ivs) else None
        nll = {d: float(np.mean([c.nll[d] for c in group])) for d in first.nll}

        def mean_costs(get) -> dict[str, tuple[float, float]]:
            units = set.intersection(*(set(get(c)) for c in group))
            return {u: (float(np.mean([get(c)[u][0] for c in group])), float(np.mean([get(c)[u][1] for c in group])))
                    for u in units}

        pooled = MeasuredConfig(first.strategy, first.generic_budget, first.spec_budget, first.in_domain,
                                first.replicate_key[-1], first.params, first.inference, mean_costs(lambda c: c.costs),
                                {d: math.exp(v) for d, v in nll.items()}, nll,
                                ppl_before=({d: math.exp(float(np.mean([math.log(c.ppl_before[d]) for c in group])))
                                             for d in first.ppl_before}
                                            if all(set(c.ppl_before) == set(first.ppl_before) for c in group) else {}),
                                entropy=dict(first.entropy), entropy_k=first.entropy_k,
                                generic_ppl=_mean([c.generic_ppl for c in group if c.generic_ppl is not None]),
                                seed_spread=first.seed_spread, embed_generic=dict(first.embed_generic),
                                paper_costs=mean_costs(lambda c: c.costs_in(PAPER)),
                                seeds=tuple(",".join(f"{k}={v}" for k, v in sorted(parse_settings(c.settings).items())
                                                     if is_seed(k)) for c in group),
                                pooled_interval=union,
                                serving={task: float(np.mean([c.serving[task] for c in group])) for task in SERVING_TASKS
                                         if all(task in c.serving for c in group)},
                                serving_machine="; ".join(sorted({c.serving_machine for c in group
                                                                  if c.serving_machine})),
                                budgets=first.budgets, budget_tags=first.budget_tags)
        out.append(pooled)
    return sorted(out, key=lambda c: (c.in_domain, c.ppl_macro))


def set_seed_spread(configs: list[MeasuredConfig]) -> None:
    """``seed_spread``: the sample standard deviation (ddof=1) of macro perplexity over the
    rows that differ only in ``*seed`` settings; None for a configuration run once."""
    reps: dict[tuple, list[MeasuredConfig]] = {}
    for c in configs:
        reps.setdefault(c.replicate_key, []).append(c)
    for group in reps.values():
        spread = float(np.std([c.ppl_macro for c in group], ddof=1)) if len(group) > 1 else None
        for c in group:
            c.seed_spread = spread


def has_seeds(configs: list[MeasuredConfig]) -> bool:
    return any(is_seed(k) for c in configs for k in parse_settings(c.settings))


def overlaps(a: MeasuredConfig, b: MeasuredConfig) -> bool:
    """Whether two configurations' macro-perplexity intervals overlap (unknown: no)."""
    ia, ib = a.interval, b.interval
    return ia is not None and ib is not None and ia[0] <= ib[1] and ib[0] <= ia[1]
