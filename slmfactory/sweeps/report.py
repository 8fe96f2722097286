"""``slmfactory report`` and ``slmfactory recommend``: read a sweep back from MLflow.

Each trial's run holds one (strategy, budgets, in-domain size, domain) perplexity and its
costs. A *configuration* is a trial without its domain; its macro perplexity is
exp(mean over domains of the test NLL) (PAPER.md's headline metric), its generic cost is
the shared phase's (paid once), its specialisation cost the mean over domains (paid per
domain), its inference cost the served model's FLOPs per token. Over N domains a
configuration costs C(N) = C_generic + N · C_spec, so the budget one domain carries is
C_spec + C_generic / N: that is the "specialisation budget" axis of the paper's Figure 1
here, and the winner in a cell is the lowest macro perplexity that fits both budgets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from slmfactory.platform.errors import DataError

from slmfactory.sweeps.tracking import TRIAL_TAG

REPORT_TAG = "slmfactory.report"
AMORTISATION_N = (1, 7, 50)
COSTS = {"generic": "generic FLOPs", "spec": "specialisation FLOPs per domain",
         "inference": "inference FLOPs per token", "total": "total FLOPs over the sweep's domains"}


@dataclass
class Config:
    """One configuration: a strategy at given budgets and in-domain size, over domains."""

    strategy: str
    generic_budget: str
    spec_budget: str
    in_domain: int
    params: int
    inference: float
    generic: float
    spec: float
    ppl: dict[str, float]
    nll: dict[str, float]

    @property
    def ppl_macro(self) -> float:
        return math.exp(float(np.mean(list(self.nll.values()))))

    @property
    def label(self) -> str:
        return f"{self.strategy} g{self.generic_budget} s{self.spec_budget}"

    def total(self, n: int) -> float:
        return self.generic + n * self.spec

    def per_domain(self, n: int) -> float:
        return self.spec + self.generic / n


def load_configs(uri: str, experiment: str) -> list[Config]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        names = [e.name for e in client.search_experiments()]
        raise DataError(f"MLflow experiment {experiment!r} not found at {uri} (experiments: {', '.join(names) or 'none'})")
    runs = client.search_runs([exp.experiment_id], filter_string="attributes.status = 'FINISHED'",
                              max_results=50000)
    groups: dict[tuple, Config] = {}
    for r in runs:
        t, m = r.data.tags, r.data.metrics
        if TRIAL_TAG not in t or "test_nll" not in m:
            continue
        key = (t["strategy"], t["generic_budget"], t["spec_budget"], int(t["in_domain_tokens"]))
        c = groups.setdefault(key, Config(t["strategy"], t["generic_budget"], t["spec_budget"], key[3],
                                          int(m["params"]), m["cost/inference_flops_per_token"], 0.0, 0.0, {}, {}))
        d = t["domain"]
        c.ppl[d], c.nll[d] = m[f"ppl/{d}"], m["test_nll"]
        c.generic = max(c.generic, m.get("cost/generic_flops", 0.0))
        c.spec += m["cost/spec_flops"]  # summed here, averaged below
    for c in groups.values():
        c.spec /= len(c.nll)
    if not groups:
        raise DataError(f"MLflow experiment {experiment!r}: no finished sweep trials to report on")
    # Macro perplexity compares like with like: keep configurations measured on every domain.
    domains = set().union(*(c.nll for c in groups.values()))
    return sorted((c for c in groups.values() if set(c.nll) == domains), key=lambda c: c.ppl_macro)


def pareto(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both cost and perplexity."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    front, best = [], math.inf
    for i in order:
        if points[i][1] < best:
            front.append(i)
            best = points[i][1]
    return front


def recommend(configs: list[Config], inference_params: float, spec_budget: float, domains: int) -> list[Config]:
    """Configurations that fit (served parameters <= ``inference_params``, per-domain budget
    C_spec + C_generic / N <= ``spec_budget``), best macro perplexity first."""
    fit = [c for c in configs if c.params <= inference_params and c.per_domain(domains) <= spec_budget]
    return sorted(fit, key=lambda c: c.ppl_macro)


def _fmt(x: float) -> str:
    return f"{x:.3g}" if x else "0"


def markdown(configs: list[Config], n_domains: int) -> str:
    domains = sorted(configs[0].nll)
    out = []
    for n in sorted({c.in_domain for c in configs}):
        rows = [c for c in configs if c.in_domain == n]
        out += [f"### In-domain size {n:,} tokens ({len(domains)} domains: {', '.join(domains)})", "",
                "| strategy | generic budget | spec. budget | params | macro ppl | " + " | ".join(domains)
                + " | generic FLOPs | spec. FLOPs / domain | inference FLOPs / token | "
                + " | ".join(f"C({k})" for k in AMORTISATION_N) + " |",
                "|" + "---|" * (9 + len(domains) + len(AMORTISATION_N))]
        for c in rows:
            out.append(f"| {c.strategy} | {c.generic_budget} | {c.spec_budget} | {c.params / 1e6:.2f}M | "
                       f"**{c.ppl_macro:.2f}** | " + " | ".join(f"{c.ppl[d]:.2f}" for d in domains)
                       + f" | {_fmt(c.generic)} | {_fmt(c.spec)} | {_fmt(c.inference)} | "
                       + " | ".join(_fmt(c.total(k)) for k in AMORTISATION_N) + " |")
        out.append("")
    return "\n".join(out)


def _cost(c: Config, which: str, n_domains: int) -> float:
    return {"generic": c.generic, "spec": c.spec, "inference": c.inference, "total": c.total(n_domains)}[which]


def plot_costs(configs: list[Config], n_domains: int, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    strategies = sorted({c.strategy for c in configs})
    colour = {s: f"C{i % 10}" for i, s in enumerate(strategies)}
    for n in sorted({c.in_domain for c in configs}):
        rows = [c for c in configs if c.in_domain == n]
        fig, axes = plt.subplots(1, 4, figsize=(18, 4.2))
        for ax, which in zip(axes, COSTS):
            pts = [(max(_cost(c, which, n_domains), 1.0), c.ppl_macro) for c in rows]
            for c, (x, y) in zip(rows, pts):
                ax.scatter(x, y, color=colour[c.strategy], s=28)
            front = pareto(pts)
            ax.plot([pts[i][0] for i in front], [pts[i][1] for i in front], "k--", lw=1, label="Pareto front")
            ax.set_xscale("log")
            ax.set_xlabel(COSTS[which])
            ax.set_ylabel("macro perplexity")
        handles = [plt.Line2D([], [], marker="o", ls="", color=colour[s], label=s) for s in strategies]
        axes[0].legend(handles=handles + [plt.Line2D([], [], ls="--", color="k", label="Pareto front")], fontsize=7)
        fig.suptitle(f"Perplexity against cost, in-domain size {n:,} tokens")
        fig.tight_layout()
        path = out / f"ppl_vs_cost_n{n}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def figure1(configs: list[Config], n_domains: int, out: Path, inference_caps: tuple = ()) -> Path:
    """The paper's Figure 1 from measurements: the winning strategy per (inference budget,
    per-domain budget) cell, for ``n_domains`` domains."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    caps = sorted(set(inference_caps) or {c.params for c in configs})
    budgets = sorted({c.per_domain(n_domains) for c in configs})
    strategies = sorted({c.strategy for c in configs})
    grid = np.full((len(caps), len(budgets)), -1)
    labels = [["" for _ in budgets] for _ in caps]
    for i, cap in enumerate(caps):
        for j, b in enumerate(budgets):
            best = recommend(configs, cap, b * (1 + 1e-9), n_domains)
            if best:
                grid[i, j] = strategies.index(best[0].strategy)
                labels[i][j] = f"{best[0].strategy}\n{best[0].ppl_macro:.1f}"
    fig, ax = plt.subplots(figsize=(1.3 * len(budgets) + 3, 0.8 * len(caps) + 2))
    cmap = matplotlib.colormaps["tab10"].resampled(max(len(strategies), 2))
    shown = np.ma.masked_less(grid, 0)
    ax.imshow(shown, cmap=cmap, vmin=0, vmax=max(len(strategies) - 1, 1), aspect="auto", origin="lower")
    for i in range(len(caps)):
        for j in range(len(budgets)):
            ax.text(j, i, labels[i][j] or "none fits", ha="center", va="center", fontsize=7)
    ax.set_xticks(range(len(budgets)), [f"{b:.2g}" for b in budgets], rotation=30, fontsize=7)
    ax.set_yticks(range(len(caps)), [f"{c / 1e6:.2f}M" for c in caps], fontsize=7)
    ax.set_xlabel(f"per-domain budget: spec. FLOPs + generic FLOPs / {n_domains}")
    ax.set_ylabel("inference budget (served parameters)")
    ax.set_title(f"Which strategy wins (macro ppl), {n_domains} domains", fontsize=9)
    fig.tight_layout()
    path = out / f"figure1_N{n_domains}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_amortisation(configs: list[Config], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    best: dict[str, Config] = {}
    for c in configs:  # the best configuration of each strategy
        if c.strategy not in best or c.ppl_macro < best[c.strategy].ppl_macro:
            best[c.strategy] = c
    n = np.arange(1, max(AMORTISATION_N) + 1)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (s, c) in enumerate(sorted(best.items())):
        ax.plot(n, c.generic + n * c.spec, color=f"C{i % 10}", label=f"{s} (ppl {c.ppl_macro:.1f})")
        ax.scatter(AMORTISATION_N, [c.total(k) for k in AMORTISATION_N], color=f"C{i % 10}", s=16)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("number of domains N")
    ax.set_ylabel("C(N) = C_generic + N C_spec (FLOPs)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / "amortisation.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def recommendation_table(configs: list[Config], n_domains: tuple[int, ...] = AMORTISATION_N) -> str:
    """For each N and each inference cap, the best configuration with no budget limit
    other than the inference one, and its runner-up."""
    caps = sorted({c.params for c in configs})
    lines = ["| domains N | inference cap | recommended | macro ppl | C(N) FLOPs | runner-up |", "|---|---|---|---|---|---|"]
    for n in n_domains:
        for cap in caps:
            ranked = sorted((c for c in configs if c.params <= cap), key=lambda c: (c.ppl_macro, c.total(n)))
            if not ranked:
                continue
            best = ranked[0]
            runner = next((c for c in ranked[1:] if c.strategy != best.strategy), None)
            lines.append(f"| {n} | {cap / 1e6:.2f}M | {best.label} | {best.ppl_macro:.2f} | {_fmt(best.total(n))} | "
                         + (f"{runner.label} ({runner.ppl_macro:.2f})" if runner else "-") + " |")
    return "\n".join(lines)


def write_report(uri: str, experiment: str, out: Path, inference_caps: tuple = (),
                 log_to_mlflow: bool = True) -> dict[str, Any]:
    """Tables and plots into ``out`` (and, logged, to the experiment's report run)."""
    configs = load_configs(uri, experiment)
    out.mkdir(parents=True, exist_ok=True)
    n_domains = len(configs[0].nll)
    files = plot_costs(configs, n_domains, out)
    files += [figure1(configs, n, out, inference_caps) for n in sorted({1, n_domains, 50})]
    files.append(plot_amortisation(configs, out))
    table = markdown(configs, n_domains)
    rec = recommendation_table(configs)
    (out / "report.md").write_text(f"# Sweep report: {experiment}\n\n{table}\n\n## Recommendation\n\n{rec}\n\n"
                                   + "\n".join(f"![{p.stem}]({p.name})" for p in files) + "\n")
    files.append(out / "report.md")
    if log_to_mlflow:
        from slmfactory.platform.tracking import MlflowTracker, client_for, ensure_experiment

        client = client_for(uri)
        exp_id = ensure_experiment(client, uri, experiment)
        old = client.search_runs([exp_id], filter_string=f"tags.`{REPORT_TAG}` = '1'", max_results=1)
        tracker = MlflowTracker(uri, experiment, "report", {REPORT_TAG: "1"},
                                run_id=old[0].info.run_id if old else None)
        tracker.log_artifact(out, "report")
        tracker.close()
    return {"configs": configs, "files": files, "table": table, "recommendation": rec}
