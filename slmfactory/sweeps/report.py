"""``slmfactory report`` and ``slmfactory recommend``: read a sweep back from MLflow.

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
of the paper's Figure 1 here. One N set, :data:`AMORTISATION_N`, is used by every table and
figure. Inference classes are the recipe's ``sweep.inference_caps`` (a model belongs to the
smallest cap that serves it) or, without caps, each distinct served-parameter count.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from slmfactory.platform.errors import DataError, SlmFactoryError
from slmfactory.platform.tracking import MlflowTracker, client_for, ensure_experiment
from slmfactory.trial import TRIAL_TAG

REPORT_TAG = "slmfactory.report"
AMORTISATION_N = (1, 7, 50)
Z95 = 1.96
COST_UNITS = ("flops", "device-hours")
UNIT_LABEL = {"flops": "FLOPs", "device-hours": "device-hours"}
_COST_METRIC = {"flops": "flops", "device-hours": "device_hours"}
MAX_BUDGET_BINS = 4
EXPERT_STRATEGIES = ("slm-mix", "slm-pn")


def _is_seed(key: str) -> bool:
    return key.endswith("seed")


def parse_settings(settings: str) -> dict[str, str]:
    return dict(p.split("=", 1) for p in settings.split(",") if p)


@dataclass
class Config:
    """One configuration: a strategy at given budgets, in-domain size and settings, over domains."""

    strategy: str
    generic_budget: str
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
        """95% interval of the macro perplexity: exp(macro NLL ± 1.96 · SE)."""
        se = self.se_macro
        if se is None:
            return None
        return math.exp(self.nll_macro - Z95 * se), math.exp(self.nll_macro + Z95 * se)

    @property
    def replicate_key(self) -> tuple:
        """The configuration without its seeds: rows sharing it are replicates."""
        rest = ",".join(f"{k}={v}" for k, v in sorted(parse_settings(self.settings).items()) if not _is_seed(k))
        return (self.strategy, self.generic_budget, self.spec_budget, self.in_domain, rest)

    @property
    def label(self) -> str:
        return (f"{self.strategy} g{self.generic_budget} s{self.spec_budget}"
                + (f" [{self.settings}]" if self.settings else ""))

    def generic(self, cost: str = "flops") -> float:
        return self.costs.get(cost, (0.0, 0.0))[0]

    def spec(self, cost: str = "flops") -> float:
        return self.costs.get(cost, (0.0, 0.0))[1]

    def total(self, n: int, cost: str = "flops") -> float:
        return self.generic(cost) + n * self.spec(cost)

    def per_domain(self, n: int, cost: str = "flops") -> float:
        return self.spec(cost) + self.generic(cost) / n


def _generic_ppl(m: dict[str, float]) -> float | None:
    # The contract's name first; runs logged before it carry the phase's own names.
    if "generic/generic_ppl" in m:
        return m["generic/generic_ppl"]
    if "generic/routed_generic_ppl" in m:
        return m["generic/routed_generic_ppl"]
    if "generic/generic_valid_nll" in m:
        return math.exp(m["generic/generic_valid_nll"])
    return None


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def load_configs(uri: str, experiment: str) -> list[Config]:
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
    groups: dict[tuple, Config] = {}
    spent: dict[tuple, dict[str, list[float]]] = {}
    for r in runs:
        t, m = r.data.tags, r.data.metrics
        if TRIAL_TAG not in t or "test_nll" not in m:
            continue
        settings = t.get("settings", "")
        key = (t["strategy"], t["generic_budget"], t["spec_budget"], int(t["in_domain_tokens"]), settings)
        c = groups.setdefault(key, Config(*key, params=int(m["params"]), inference=m["cost/inference_flops_per_token"],
                                          costs={}, ppl={}, nll={}))
        d = t["domain"]
        c.ppl[d], c.nll[d] = m[f"ppl/{d}"], m["test_nll"]
        for name, target in (("test_nll_se", c.se), (f"ppl_lo/{d}", c.ppl_lo), (f"ppl_hi/{d}", c.ppl_hi),
                             ("test_ppl_before", c.ppl_before), ("domain_entropy", c.entropy)):
            if name in m:
                target[d] = m[name]
        c.generic_ppl = _generic_ppl(m) if c.generic_ppl is None else c.generic_ppl
        acc = spent.setdefault(key, {})
        for unit, metric in _COST_METRIC.items():
            if f"cost/spec_{metric}" in m:
                acc.setdefault(f"g:{unit}", []).append(m.get(f"cost/generic_{metric}", 0.0))
                acc.setdefault(f"s:{unit}", []).append(m[f"cost/spec_{metric}"])
        for name in ("spent/generic_tokens", "spent/spec_tokens", "epochs/generic", "epochs/spec"):
            if name in m:
                acc.setdefault(name, []).append(m[name])
    if not groups:
        raise DataError(f"MLflow experiment {experiment!r}: no finished sweep trials to report on")
    for key, c in groups.items():
        acc = spent[key]
        # The generic phase is shared (paid once: the max over its trials); specialisation is
        # paid per domain (the mean over domains).
        c.costs = {u: (max(acc[f"g:{u}"]), float(np.mean(acc[f"s:{u}"]))) for u in COST_UNITS if f"s:{u}" in acc}
        c.spent_generic = _mean(acc.get("spent/generic_tokens", []))
        c.spent_spec = _mean(acc.get("spent/spec_tokens", []))
        c.epochs_generic = _mean(acc.get("epochs/generic", []))
        c.epochs_spec = _mean(acc.get("epochs/spec", []))
    # Macro perplexity compares like with like: keep configurations measured on every domain.
    domains = set().union(*(c.nll for c in groups.values()))
    configs = [c for c in groups.values() if set(c.nll) == domains]
    set_seed_spread(configs)
    return sorted(configs, key=lambda c: (c.in_domain, c.ppl_macro))


def set_seed_spread(configs: list[Config]) -> None:
    """``seed_spread``: the sample standard deviation (ddof=1) of macro perplexity over the
    rows that differ only in ``*seed`` settings; None for a configuration run once."""
    reps: dict[tuple, list[Config]] = {}
    for c in configs:
        reps.setdefault(c.replicate_key, []).append(c)
    for group in reps.values():
        spread = float(np.std([c.ppl_macro for c in group], ddof=1)) if len(group) > 1 else None
        for c in group:
            c.seed_spread = spread


def has_seeds(configs: list[Config]) -> bool:
    return any(_is_seed(k) for c in configs for k in parse_settings(c.settings))


def pareto(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both cost and perplexity."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    front, best = [], math.inf
    for i in order:
        if points[i][1] < best:
            front.append(i)
            best = points[i][1]
    return front


def overlaps(a: Config, b: Config) -> bool:
    """Whether two configurations' macro-perplexity intervals overlap (unknown: no)."""
    ia, ib = a.interval, b.interval
    return ia is not None and ib is not None and ia[0] <= ib[1] and ib[0] <= ia[1]


@dataclass
class Recommendation:
    """The best fitting configuration, the best of another strategy, and whether the two
    are a tie (overlapping intervals)."""

    ranked: list[Config]
    in_domain: int | None
    cost: str

    @property
    def best(self) -> Config | None:
        return self.ranked[0] if self.ranked else None

    @property
    def runner_up(self) -> Config | None:
        # The question is which *strategy*: the runner-up is the best of another strategy.
        return next((c for c in self.ranked[1:] if c.strategy != self.ranked[0].strategy), None)

    @property
    def tie(self) -> bool:
        return self.runner_up is not None and overlaps(self.best, self.runner_up)


def pick_in_domain(configs: list[Config], in_domain: int | None) -> int:
    """The measured in-domain size to answer from: the largest measured <= ``in_domain``
    (the user has at least that much data), the largest measured when not given."""
    sizes = sorted({c.in_domain for c in configs})
    if in_domain is None:
        return sizes[-1]
    fit = [s for s in sizes if s <= in_domain]
    if not fit:
        raise SlmFactoryError(f"--in-domain {in_domain:g}: no measured in-domain size is that small "
                              f"(measured: {', '.join(f'{s:,}' for s in sizes)} tokens)")
    return fit[-1]


def recommend(configs: list[Config], inference_params: float, spec_budget: float, domains: int,
              in_domain: int | None = None, cost: str = "flops") -> Recommendation:
    """Configurations of the chosen in-domain size that fit (served parameters <=
    ``inference_params``, per-domain budget C_spec + C_generic / N <= ``spec_budget`` in
    ``cost`` units), best macro perplexity first; see :class:`Recommendation`."""
    if cost not in COST_UNITS:
        raise SlmFactoryError(f"--cost {cost!r}: expected one of {', '.join(COST_UNITS)}")
    size = pick_in_domain(configs, in_domain)
    fit = [c for c in configs if c.in_domain == size and cost in c.costs and c.params <= inference_params
           and c.per_domain(domains, cost) <= spec_budget]
    return Recommendation(sorted(fit, key=lambda c: (c.ppl_macro, c.total(domains, cost))), size, cost)


def inference_classes(configs: list[Config], caps: tuple = ()) -> dict[float, list[Config]]:
    """Served-parameter classes: each configuration in the smallest cap that serves it
    (a model larger than every cap is its own class); without caps, one class per size."""
    caps = sorted(caps)
    out: dict[float, list[Config]] = {}
    for c in configs:
        bound = next((cap for cap in caps if cap >= c.params), c.params)
        out.setdefault(float(bound), []).append(c)
    return dict(sorted(out.items()))


def budget_bins(costs: list[float], max_bins: int = MAX_BUDGET_BINS) -> np.ndarray:
    """Upper edges of log-spaced bins over the measured positive per-domain costs: a cell
    of a bin answers with what fits within its upper edge."""
    pos = np.array(sorted({x for x in costs if x > 0}))
    if len(pos) == 0:
        return np.array([0.0])
    if len(pos) == 1:
        return pos
    edges = np.geomspace(pos[0], pos[-1], min(max_bins, len(pos)) + 1)
    edges[-1] = pos[-1]  # the top edge is a measured cost exactly (geomspace rounds)
    return edges[1:]


def distinct_labels(values, fmt: str = "g", prefix: str = "") -> list[str]:
    """Tick labels with the fewest significant digits (from 2) that tell the values apart."""
    for digits in range(2, 10):
        labels = [prefix + format(v, f".{digits}{fmt}") for v in values]
        if len(set(labels)) == len(labels):
            return labels
    return labels


def _fmt(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.3g}" if x else "0"


def _ppl_cell(p: float, iv: tuple[float, float] | None) -> str:
    return f"{p:.2f} [{iv[0]:.2f}, {iv[1]:.2f}]" if iv else f"{p:.2f} [n/a]"


def _macro_cell(c: Config) -> str:
    return _ppl_cell(c.ppl_macro, c.interval)


def _domain_cell(c: Config, d: str) -> str:
    iv = (c.ppl_lo[d], c.ppl_hi[d]) if d in c.ppl_lo and d in c.ppl_hi else None
    return _ppl_cell(c.ppl[d], iv)


def _budget_cell(nominal: str, spent: float | None) -> str:
    return nominal + (f" ({spent:.3g} T spent)" if spent is not None else "")


def markdown(configs: list[Config], n_domains: int | None = None) -> str:
    """Every configuration per in-domain size: settings, nominal and spent budgets, macro
    perplexity with its interval (and the seed spread where the sweep has seeds),
    per-domain perplexity with its bootstrap interval, costs and C(N) for N in AMORTISATION_N."""
    domains = sorted(configs[0].nll)
    seeds = has_seeds(configs)
    out = []
    for n in sorted({c.in_domain for c in configs}):
        rows = [c for c in configs if c.in_domain == n]
        head = (["strategy", "settings", "generic budget", "spec. budget", "params", "macro ppl [95%]"]
                + (["seed spread"] if seeds else []) + domains
                + ["epochs g/s", "generic FLOPs", "spec. FLOPs / domain", "generic dev-h", "spec. dev-h / domain",
                   "inference FLOPs / token"] + [f"C({k}) FLOPs" for k in AMORTISATION_N])
        out += [f"### In-domain size {n:,} tokens ({len(domains)} domains: {', '.join(domains)})", "",
                "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for c in rows:
            cells = ([c.strategy, c.settings or "-", _budget_cell(c.generic_budget, c.spent_generic),
                      _budget_cell(c.spec_budget, c.spent_spec), f"{c.params / 1e6:.2f}M", f"**{_macro_cell(c)}**"]
                     + ([_fmt(c.seed_spread)] if seeds else []) + [_domain_cell(c, d) for d in domains]
                     + [f"{_fmt(c.epochs_generic)}/{_fmt(c.epochs_spec)}", _fmt(c.generic("flops")),
                        _fmt(c.spec("flops")), _fmt(c.generic("device-hours")), _fmt(c.spec("device-hours")),
                        _fmt(c.inference)] + [_fmt(c.total(k)) for k in AMORTISATION_N])
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def _macro_of(values: dict[str, float]) -> float:
    """Macro perplexity of per-domain perplexities: exp of the mean log perplexity, the
    same average as the headline's exp(mean NLL)."""
    return math.exp(float(np.mean(np.log(list(values.values())))))


def table_before_after(configs: list[Config]) -> str:
    """The paper's Table 4 (docs/paper.md#table-4), its analogue: macro perplexity before and after fine-tuning, per
    configuration and in-domain size (strategies with a generic initialisation only)."""
    lines = ["| in-domain tokens | strategy | settings | generic budget | spec. budget | before fine-tuning | "
             "after fine-tuning | change |", "|---|---|---|---|---|---|---|---|"]
    for c in sorted(configs, key=lambda c: (c.in_domain, c.strategy, c.generic_budget, c.spec_budget, c.settings)):
        if set(c.ppl_before) != set(c.nll):
            continue  # no generic init (slm-nopt) or an older run
        before = _macro_of(c.ppl_before)
        lines.append(f"| {c.in_domain:,} | {c.strategy} | {c.settings or '-'} | {c.generic_budget} | "
                     f"{c.spec_budget} | {before:.2f} | {c.ppl_macro:.2f} | {c.ppl_macro / before - 1:+.1%} |")
    return "\n".join(lines)


def table_generic(configs: list[Config]) -> str:
    """The paper's Table 8 (docs/paper.md#table-8), its analogue: generic validation perplexity of each generic phase
    (routed for slm-mix/slm-pn: each sequence scored by its cluster's expert), by generic
    budget. A phase is shared by its configurations: one value per (strategy, settings, budget)."""
    phases: dict[tuple[str, str], dict[str, float]] = {}
    for c in configs:
        if c.generic_ppl is None or c.generic_budget == "none":
            continue
        # Fine-tuning and in-domain data settings come after the generic phase: they do not
        # make another phase (finetune.seed=1 shares seed 0's pretraining).
        rest = ",".join(f"{k}={v}" for k, v in sorted(parse_settings(c.settings).items())
                        if not k.startswith(("finetune.", "data.")))
        phases.setdefault((c.strategy, rest), {}).setdefault(c.generic_budget, c.generic_ppl)
    budgets = sorted({b for v in phases.values() for b in v}, key=lambda b: float(b.rstrip("TF")))
    lines = ["| strategy | settings | " + " | ".join(f"generic ppl at {b}" for b in budgets) + " |",
             "|" + "---|" * (2 + len(budgets))]
    for (s, rest), by in sorted(phases.items()):
        name = s + (" (routed)" if s in EXPERT_STRATEGIES else "")
        lines.append(f"| {name} | {rest or '-'} | " + " | ".join(f"{by[b]:.2f}" if b in by else "-" for b in budgets)
                     + " |")
    return "\n".join(lines)


def _settings_seeds(c: Config) -> dict[str, str]:
    return {k: v for k, v in parse_settings(c.settings).items() if _is_seed(k)}


def entropy_gains(configs: list[Config]) -> list[dict[str, Any]]:
    """For each slm-mix/slm-pn configuration, each domain's cluster entropy and its gain over
    ``slm`` at the same budgets, in-domain size and seeds (gain = 1 - ppl_x / ppl_slm), with
    Spearman's rank correlation of gain against entropy when there are >= 3 domains."""
    from scipy.stats import spearmanr

    out = []
    for x in configs:
        if x.strategy not in EXPERT_STRATEGIES or not x.entropy:
            continue
        same = [c for c in configs if c.strategy == "slm" and (c.generic_budget, c.spec_budget, c.in_domain)
                == (x.generic_budget, x.spec_budget, x.in_domain)]
        slm = next((c for c in same if _settings_seeds(c) == _settings_seeds(x)), same[0] if same else None)
        if slm is None:
            continue
        domains = sorted(d for d in x.entropy if d in slm.ppl)
        rows = [(d, x.entropy[d], slm.ppl[d], x.ppl[d], 1 - x.ppl[d] / slm.ppl[d]) for d in domains]
        rho = p = None
        if len(rows) >= 3:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # constant input: scipy warns and returns nan
                res = spearmanr([r[4] for r in rows], [r[1] for r in rows])
            rho, p = float(res.statistic), float(res.pvalue)
        out.append({"config": x, "slm": slm, "rows": rows, "spearman": rho, "p": p})
    return out


def table_entropy(configs: list[Config]) -> str:
    parts = []
    for g in entropy_gains(configs):
        x, slm = g["config"], g["slm"]
        parts += [f"**{x.label}** vs **{slm.label}**, in-domain {x.in_domain:,} tokens", "",
                  "| domain | cluster entropy (nats) | slm ppl | " + f"{x.strategy} ppl | gain over slm |",
                  "|---|---|---|---|---|"]
        parts += [f"| {d} | {h:.3f} | {ps:.2f} | {px:.2f} | {gain:+.3f} |" for d, h, ps, px, gain in g["rows"]]
        if g["spearman"] is not None:
            parts.append(f"\nSpearman rank correlation of gain with entropy: rho = {g['spearman']:.3f} "
                         f"(p = {g['p']:.3g}, {len(g['rows'])} domains)")
        else:
            parts.append(f"\nSpearman rank correlation: needs >= 3 domains ({len(g['rows'])} here)")
        parts.append("")
    return "\n".join(parts) or "(no slm-mix/slm-pn configuration with a logged domain entropy and a matching slm)"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return matplotlib, plt


ZERO_GID = "zero-cost"


def place_zero(xs: list[float]) -> tuple[list[float], float | None]:
    """Positions on a log axis for costs that may be 0: positive costs stay, a 0 goes one
    decade below the smallest positive cost (the axis's left edge, labelled "0"), never at
    10^0. Returns the positions and the zero position (None when no cost is 0)."""
    pos = [x for x in xs if x > 0]
    if not any(x <= 0 for x in xs):
        return list(xs), None
    x0 = 10 ** (math.floor(math.log10(min(pos))) - 1) if pos else 0.0  # all 0: a linear axis
    return [x if x > 0 else x0 for x in xs], x0


def _draw_cost_panel(ax, rows: list[Config], costs: list[float], classes: dict[float, list[Config]],
                     colour: dict[str, str], xlabel: str) -> None:
    xs, x0 = place_zero(costs)
    idx = {id(c): i for i, c in enumerate(rows)}
    for c, x, raw in zip(rows, xs, costs):
        if raw > 0:
            ax.scatter(x, c.ppl_macro, color=colour[c.strategy], s=28)
        iv = c.interval
        if iv:
            ax.plot([x, x], iv, color=colour[c.strategy], lw=0.8)
    zeros = [i for i, raw in enumerate(costs) if raw <= 0]
    if zeros:
        # Their own marker at the left edge: a cost of 0 has no place on a log axis.
        ax.scatter([x0] * len(zeros), [rows[i].ppl_macro for i in zeros], marker="<", s=50, facecolors="none",
                   edgecolors=[colour[rows[i].strategy] for i in zeros], gid=ZERO_GID)
        ax.axvline(x0 * 2, color="0.7", lw=0.6, ls=":")
    styles = ["--", ":", "-.", (0, (5, 1))]
    for k, (bound, members) in enumerate(classes.items()):
        mine = [idx[id(c)] for c in members if id(c) in idx]
        front = pareto([(costs[i], rows[i].ppl_macro) for i in mine])
        pts = [mine[j] for j in front]
        ax.plot([xs[i] for i in pts], [rows[i].ppl_macro for i in pts], color="k", ls=styles[k % len(styles)], lw=1,
                label=f"Pareto front, <= {bound / 1e6:.3g}M params", gid=f"pareto-{bound:g}")
    if any(x > 0 for x in costs):
        from matplotlib.ticker import NullFormatter

        ax.set_xscale("log")
        # Labelled minor ticks (2x10^11, 3x10^11, ...) overlap within a decade: decades only.
        ax.xaxis.set_minor_formatter(NullFormatter())
        if x0 is not None:
            ax.set_xlim(left=x0 / 2)
            ticks = [t for t in ax.get_xticks() if t > 2 * x0]
            ax.set_xticks([x0] + ticks, ["0"] + [f"$10^{{{math.log10(t):.0f}}}$" for t in ticks])
            ax.set_xlim(left=x0 / 2, right=max(xs) * 2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("macro perplexity")


def plot_costs(configs: list[Config], in_domain: int, n_domains: int, cost: str, out: Path,
               inference_caps: tuple = ()):
    """Macro perplexity (with its interval) against generic, specialisation, inference and
    per-domain cost for one in-domain size, N and cost unit; Pareto fronts per inference class."""
    matplotlib, plt = _pyplot()
    rows = [c for c in configs if c.in_domain == in_domain and cost in c.costs]
    strategies = sorted({c.strategy for c in configs})
    colour = {s: f"C{i % 10}" for i, s in enumerate(strategies)}
    classes = inference_classes(rows, inference_caps)
    unit = UNIT_LABEL[cost]
    panels = [([c.generic(cost) for c in rows], f"generic {unit} (paid once)"),
              ([c.spec(cost) for c in rows], f"specialisation {unit} per domain"),
              ([c.inference for c in rows], "inference FLOPs per token"),
              ([c.per_domain(n_domains, cost) for c in rows], f"per-domain {unit}: spec. + generic / {n_domains}")]
    fig, axes = plt.subplots(1, len(panels), figsize=(19, 4.4))
    for ax, (costs, xlabel) in zip(axes, panels):
        _draw_cost_panel(ax, rows, costs, classes, colour, xlabel)
    handles = [plt.Line2D([], [], marker="o", ls="", color=colour[s], label=s) for s in strategies]
    handles.append(plt.Line2D([], [], marker="<", ls="", mfc="none", color="k", label="cost 0"))
    axes[0].legend(handles=handles + axes[0].get_legend_handles_labels()[0], fontsize=7)
    fig.suptitle(f"Macro perplexity (95% interval) against cost, in-domain {in_domain:,} tokens, N = {n_domains}")
    fig.tight_layout()
    path = out / f"ppl_vs_cost_n{in_domain}_N{n_domains}_{cost}.png"
    fig.savefig(path, dpi=100)
    return fig, path


def figure1_grid(configs: list[Config], in_domain: int, n_domains: int, cost: str,
                 inference_caps: tuple = ()) -> tuple[list[float], np.ndarray, list[list[Recommendation]]]:
    """Figure 1's cells: inference classes x per-domain budget bins, each the recommendation
    of the configurations that fit (served parameters <= the class, per-domain cost <= the
    bin's upper edge)."""
    rows = [c for c in configs if c.in_domain == in_domain and cost in c.costs]
    caps = list(inference_classes(rows, inference_caps))
    edges = budget_bins([c.per_domain(n_domains, cost) for c in rows])
    cells = [[recommend(rows, cap, b * (1 + 1e-9), n_domains, in_domain, cost) for b in edges] for cap in caps]
    return caps, edges, cells


def figure1(configs: list[Config], in_domain: int, n_domains: int, cost: str, out: Path,
            inference_caps: tuple = ()):
    """The paper's Figure 1 from measurements: the winner per (inference class, per-domain
    budget bin) cell for N domains, with its interval; overlapping intervals are marked tie."""
    matplotlib, plt = _pyplot()
    caps, edges, cells = figure1_grid(configs, in_domain, n_domains, cost, inference_caps)
    strategies = sorted({c.strategy for c in configs})
    grid = np.full((len(caps), len(edges)), -1)
    fig, ax = plt.subplots(figsize=(1.8 * len(edges) + 3, 0.9 * len(caps) + 2))
    for i, row in enumerate(cells):
        for j, rec in enumerate(row):
            if rec.best is not None:
                grid[i, j] = strategies.index(rec.best.strategy)
    cmap = matplotlib.colormaps["tab10"].resampled(max(len(strategies), 2))
    ax.imshow(np.ma.masked_less(grid, 0), cmap=cmap, vmin=0, vmax=max(len(strategies) - 1, 1), aspect="auto",
              origin="lower")
    for i, row in enumerate(cells):
        for j, rec in enumerate(row):
            b = rec.best
            text = "none fits" if b is None else f"{b.strategy}\n{_macro_cell(b)}" + (
                f"\ntie: {rec.runner_up.strategy}" if rec.tie else "")
            ax.text(j, i, text, ha="center", va="center", fontsize=6)
    ax.set_xticks(range(len(edges)), distinct_labels(edges, prefix="<="), rotation=30, fontsize=7)
    ax.set_yticks(range(len(caps)), [f"{s}M" for s in distinct_labels([c / 1e6 for c in caps], prefix="<=")],
                  fontsize=7)
    unit = UNIT_LABEL[cost]
    ax.set_xlabel(f"per-domain budget bin: spec. {unit} + generic {unit} / {n_domains}")
    ax.set_ylabel("inference class (served parameters)")
    ax.set_title(f"Which strategy wins (macro ppl [95%]), N = {n_domains}, in-domain {in_domain:,} tokens",
                 fontsize=9)
    fig.tight_layout()
    path = out / f"figure1_n{in_domain}_N{n_domains}_{cost}.png"
    fig.savefig(path, dpi=100)
    return fig, path


def plot_amortisation(configs: list[Config], in_domain: int, cost: str, out: Path):
    """C(N) = C_generic + N C_spec of each strategy's best configuration at one in-domain size."""
    _, plt = _pyplot()
    best: dict[str, Config] = {}
    for c in configs:
        if c.in_domain == in_domain and cost in c.costs and (
                c.strategy not in best or c.ppl_macro < best[c.strategy].ppl_macro):
            best[c.strategy] = c
    n = np.arange(1, max(AMORTISATION_N) + 1)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (s, c) in enumerate(sorted(best.items())):
        ax.plot(n, c.generic(cost) + n * c.spec(cost), color=f"C{i % 10}", label=f"{s} ({_macro_cell(c)})")
        ax.scatter(AMORTISATION_N, [c.total(k, cost) for k in AMORTISATION_N], color=f"C{i % 10}", s=16)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("number of domains N")
    ax.set_ylabel(f"C(N) = C_generic + N C_spec ({UNIT_LABEL[cost]})")
    ax.set_title(f"Amortisation, in-domain {in_domain:,} tokens", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / f"amortisation_n{in_domain}_{cost}.png"
    fig.savefig(path, dpi=100)
    return fig, path


def recommendation_table(configs: list[Config], cost: str = "flops", inference_caps: tuple = ()) -> str:
    """For each N in AMORTISATION_N, in-domain size, inference class and per-domain budget
    bin: the best fitting configuration with its interval, C(N), the runner-up (best of
    another strategy) and whether the two tie."""
    unit = UNIT_LABEL[cost]
    lines = [f"| domains N | in-domain | inference class | per-domain budget ({unit}) | recommended | "
             f"macro ppl [95%] | C(N) {unit} | runner-up | tie |", "|---|---|---|---|---|---|---|---|---|"]
    for n in AMORTISATION_N:
        for size in sorted({c.in_domain for c in configs}):
            caps, edges, cells = figure1_grid(configs, size, n, cost, inference_caps)
            budget_labels = distinct_labels(edges, prefix="<= ")
            for cap, row in zip(caps, cells):
                for label, rec in zip(budget_labels, row):
                    b, r = rec.best, rec.runner_up
                    if b is None:
                        lines.append(f"| {n} | {size:,} | <= {cap / 1e6:.3g}M | {label} | none fits | - | - | - | - |")
                        continue
                    lines.append(f"| {n} | {size:,} | <= {cap / 1e6:.3g}M | {label} | {b.label} | {_macro_cell(b)} | "
                                 f"{_fmt(b.total(n, cost))} | "
                                 + (f"{r.label} ({_macro_cell(r)})" if r else "-")
                                 + f" | {'**tie**' if rec.tie else 'no'} |")
    return "\n".join(lines)


def write_report(uri: str, experiment: str, out: Path, inference_caps: tuple = (),
                 log_to_mlflow: bool = True) -> dict[str, Any]:
    """Tables and plots into ``out`` (and, logged, to the experiment's report run)."""
    _, plt = _pyplot()
    configs = load_configs(uri, experiment)
    out.mkdir(parents=True, exist_ok=True)
    units = [u for u in COST_UNITS if any(u in c.costs and c.spec(u) > 0 for c in configs)]
    files = []
    for size in sorted({c.in_domain for c in configs}):
        for cost in units:
            for n in AMORTISATION_N:
                for draw in (plot_costs, figure1):
                    fig, path = draw(configs, size, n, cost, out, inference_caps)
                    plt.close(fig)
                    files.append(path)
            fig, path = plot_amortisation(configs, size, cost, out)
            plt.close(fig)
            files.append(path)
    table = markdown(configs)
    rec = "\n\n".join(f"### Per-domain budget in {UNIT_LABEL[u]}\n\n{recommendation_table(configs, u, inference_caps)}"
                      for u in units)
    doc = (f"# Sweep report: {experiment}\n\n"
           f"Macro perplexity = exp(mean over domains of the test NLL); 95% interval exp(NLL ± 1.96 SE), "
           f"SE = sqrt(sum of the domains' bootstrap SE^2) / D; per-domain cells: the bootstrap percentile "
           f"interval over test sequences. A **tie**: the winner's interval overlaps the runner-up's.\n\n"
           f"{table}\n\n## Recommendation\n\n{rec}\n\n"
           f"## Perplexity before and after fine-tuning (the paper's Table 4, docs/paper.md#table-4)\n\n{table_before_after(configs)}\n\n"
           f"## Generic perplexity of each generic phase (the paper's Table 8, docs/paper.md#table-8)\n\n{table_generic(configs)}\n\n"
           f"## Cluster entropy and the experts' gain over slm\n\n{table_entropy(configs)}\n\n"
           + "\n".join(f"![{p.stem}]({p.name})" for p in files) + "\n")
    (out / "report.md").write_text(doc)
    files.append(out / "report.md")
    if log_to_mlflow:
        client = client_for(uri)
        exp_id = ensure_experiment(client, uri, experiment)
        old = client.search_runs([exp_id], filter_string=f"tags.`{REPORT_TAG}` = '1'", max_results=1)
        tracker = MlflowTracker(uri, experiment, "report", {REPORT_TAG: "1"},
                                run_id=old[0].info.run_id if old else None)
        tracker.log_artifact(out, "report")
        tracker.close()
    return {"configs": configs, "files": files, "table": table, "recommendation": rec}
