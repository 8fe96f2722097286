"""The report's figures (matplotlib, drawn off-screen): perplexity against each cost with
its Pareto fronts (``plot_costs``), the paper's Figure 1 from the measurements
(``figure1``) and the amortisation plot (``plot_amortisation``). What they draw is computed
in :mod:`slmfactory.analysis.frontier`. Every figure draws costs under one named convention
(``paper`` or ``measured``, ``platform.cost.COST_CONVENTIONS``): it says which in its title
and its file name (``_measured``; the paper's carry no suffix).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from slmfactory.analysis.frontier import distinct_labels, figure1_grid, inference_classes, macro_cell, pareto
from slmfactory.analysis.measured import AMORTISATION_N, UNIT_LABEL, MeasuredConfig
from slmfactory.platform.cost import PAPER


def file_suffix(convention: str) -> str:
    """A figure's file-name suffix for its cost convention: none for ``paper`` (the convention
    claims are decided under, and the names figures had before there were two), ``_measured``."""
    return "" if convention == PAPER else f"_{convention}"


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return matplotlib, plt


ZERO_GID = "zero-cost"

STRATEGY_COLOUR = {"slm": "C0", "slm-nopt": "C7", "llm": "C3", "llm-lora": "C6", "slm-is": "C2", "slm-d": "C5",
                   "slm-mix": "C1", "slm-pn": "C4"}
"""One colour per strategy in every figure (report, paper axes, study pages): a reader learns it once."""


def colour_of(strategy: str) -> str:
    """The strategy's colour (``STRATEGY_COLOUR``; one outside it gets a spare)."""
    return STRATEGY_COLOUR.get(strategy, "C8" if hash(strategy) % 2 else "C9")


def colour_map(strategies: list[str]):
    """A matplotlib colormap whose i-th colour is ``strategies[i]``'s (for ``imshow`` grids)."""
    from matplotlib.colors import ListedColormap

    return ListedColormap([colour_of(s) for s in strategies] or ["C0"])


def place_zero(xs: list[float]) -> tuple[list[float], float | None]:
    """Positions on a log axis for costs that may be 0: positive costs stay, a 0 goes one
    decade below the smallest positive cost (the axis's left edge, labelled "0"), never at
    10^0. Returns the positions and the zero position (None when no cost is 0)."""
    pos = [x for x in xs if x > 0]
    if not any(x <= 0 for x in xs):
        return list(xs), None
    x0 = 10 ** (math.floor(math.log10(min(pos))) - 1) if pos else 0.0  # all 0: a linear axis
    return [x if x > 0 else x0 for x in xs], x0


def _draw_cost_panel(ax, rows: list[MeasuredConfig], costs: list[float], classes: dict[float, list[MeasuredConfig]],
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


def plot_costs(configs: list[MeasuredConfig], in_domain: int, n_domains: int, cost: str, out: Path,
               inference_caps: tuple = (), convention: str = PAPER):
    """Macro perplexity (with its interval) against generic, specialisation, inference and
    per-domain cost for one in-domain size, N, cost unit and convention; Pareto fronts per
    inference class."""
    matplotlib, plt = pyplot()
    rows = [c for c in configs if c.in_domain == in_domain and c.has_cost(cost, convention)]
    strategies = sorted({c.strategy for c in configs})
    colour = {s: colour_of(s) for s in strategies}
    classes = inference_classes(rows, inference_caps)
    unit = UNIT_LABEL[cost]
    panels = [([c.generic(cost, convention) for c in rows], f"generic {unit} (paid once)"),
              ([c.spec(cost, convention) for c in rows], f"specialisation {unit} per domain"),
              ([c.inference for c in rows], "inference FLOPs per token"),
              ([c.per_domain(n_domains, cost, convention) for c in rows],
               f"per-domain {unit}: spec. + generic / {n_domains}")]
    fig, axes = plt.subplots(1, len(panels), figsize=(19, 4.4))
    for ax, (costs, xlabel) in zip(axes, panels):
        _draw_cost_panel(ax, rows, costs, classes, colour, xlabel)
    handles = [plt.Line2D([], [], marker="o", ls="", color=colour[s], label=s) for s in strategies]
    handles.append(plt.Line2D([], [], marker="<", ls="", mfc="none", color="k", label="cost 0"))
    axes[0].legend(handles=handles + axes[0].get_legend_handles_labels()[0], fontsize=7)
    fig.suptitle(f"Macro perplexity (95% interval) against cost ({convention} costs), in-domain {in_domain:,} tokens, "
                 f"N = {n_domains}")
    fig.tight_layout()
    path = out / f"ppl_vs_cost_n{in_domain}_N{n_domains}_{cost}{file_suffix(convention)}.png"
    fig.savefig(path, dpi=100)
    return fig, path


def figure1(configs: list[MeasuredConfig], in_domain: int, n_domains: int, cost: str, out: Path,
            inference_caps: tuple = (), convention: str = PAPER):
    """The paper's Figure 1 from measurements: the winner per (inference class, per-domain
    budget bin) cell for N domains, with its interval; overlapping intervals are marked tie."""
    matplotlib, plt = pyplot()
    caps, edges, cells = figure1_grid(configs, in_domain, n_domains, cost, inference_caps, convention)
    strategies = sorted({c.strategy for c in configs})
    grid = np.full((len(caps), len(edges)), -1)
    fig, ax = plt.subplots(figsize=(1.8 * len(edges) + 3, 0.9 * len(caps) + 2))
    for i, row in enumerate(cells):
        for j, rec in enumerate(row):
            if rec.best is not None:
                grid[i, j] = strategies.index(rec.best.strategy)
    ax.imshow(np.ma.masked_less(grid, 0), cmap=colour_map(strategies), vmin=0, vmax=max(len(strategies) - 1, 1),
              aspect="auto", origin="lower", interpolation="nearest")
    for i, row in enumerate(cells):
        for j, rec in enumerate(row):
            b = rec.best
            text = "none fits" if b is None else f"{b.strategy}\n{macro_cell(b)}" + (
                f"\ntie: {rec.runner_up.strategy}" if rec.tie else "")
            ax.text(j, i, text, ha="center", va="center", fontsize=6)
    ax.set_xticks(range(len(edges)), distinct_labels(edges, prefix="<="), rotation=30, fontsize=7)
    ax.set_yticks(range(len(caps)), [f"{s}M" for s in distinct_labels([c / 1e6 for c in caps], prefix="<=")],
                  fontsize=7)
    unit = UNIT_LABEL[cost]
    ax.set_xlabel(f"per-domain budget bin: spec. {unit} + generic {unit} / {n_domains}")
    ax.set_ylabel("inference class (served parameters)")
    ax.set_title(f"Which strategy wins (macro ppl [95%]), N = {n_domains}, in-domain {in_domain:,} tokens, "
                 f"{convention} costs", fontsize=9)
    fig.tight_layout()
    path = out / f"figure1_n{in_domain}_N{n_domains}_{cost}{file_suffix(convention)}.png"
    fig.savefig(path, dpi=100)
    return fig, path


def plot_amortisation(configs: list[MeasuredConfig], in_domain: int, cost: str, out: Path, convention: str = PAPER):
    """C(N) = C_generic + N C_spec of each strategy's best configuration at one in-domain size."""
    _, plt = pyplot()
    best: dict[str, MeasuredConfig] = {}
    for c in configs:
        if c.in_domain == in_domain and c.has_cost(cost, convention) and (
                c.strategy not in best or c.ppl_macro < best[c.strategy].ppl_macro):
            best[c.strategy] = c
    n = np.arange(1, max(AMORTISATION_N) + 1)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for s, c in sorted(best.items()):
        ax.plot(n, c.generic(cost, convention) + n * c.spec(cost, convention), color=colour_of(s),
                label=f"{s} ({macro_cell(c)})")
        ax.scatter(AMORTISATION_N, [c.total(k, cost, convention) for k in AMORTISATION_N], color=colour_of(s), s=16)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("number of domains N")
    ax.set_ylabel(f"C(N) = C_generic + N C_spec ({UNIT_LABEL[cost]}, {convention} costs)")
    ax.set_title(f"Amortisation, in-domain {in_domain:,} tokens, {convention} costs", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / f"amortisation_n{in_domain}_{cost}{file_suffix(convention)}.png"
    fig.savefig(path, dpi=100)
    return fig, path
