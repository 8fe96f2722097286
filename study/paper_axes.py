"""Figure 1 on the paper's axes: generic budget (x) by specialisation budget (y) at the SLM's
inference size, for N domains; each cell names the strategy with the lowest macro perplexity.

The cell (G, S) is a budget: a generic phase of G tokens, paid once and shared by the N domains,
and S specialisation tokens per domain. Under the paper's cost rule C(N) = C_generic + N C_spec
(``platform.cost``'s *paper* convention: embedding the generic corpus is nobody's cost, so
slm-is and slm-nopt have C_generic = 0), one domain carries

    B(G, S, N) = c_spec(S) + c_generic(G) / N

where c_generic(G) is slm's measured generic FLOPs at G and c_spec(S) what S specialisation
tokens cost at the SLM's size: S times the median specialisation FLOPs per spent token of the
slm and slm-nopt configurations (both under the paper's convention). The budget S, not what a
configuration spent: early stopping spends less than S, and a cell must not shrink with it.

Who shares a cell (what that budget buys):

- a strategy with a generic phase (slm, slm-mix, slm-pn, slm-d) enters with its configurations
  whose generic phase read G tokens and whose specialisation budget is at most S (a smaller
  specialisation fits a larger budget). It is placed by the tokens its phase read, as the
  paper places each method at its pretraining budget; its own FLOPs at G differ from slm's
  (clustering and routing for slm-mix/slm-pn, the teacher for slm-d: the *Costs* section);
- a strategy without one (slm-is, slm-nopt) has no x coordinate: it enters every column with
  its specialisation budgets up to S, as the paper draws it, and also with any larger budget
  S' whose per-domain cost fits B(G, S, N): the domain's share of the generic budget is what
  slm-is may spend on its own resampled pretraining instead. That share is c_generic(G) / N: at
  N = 1 a domain carries the whole generic phase, at N = 50 a fiftieth, which is how N moves
  the map (only these strategies' entries change with N).

Within a cell each strategy is represented by its lowest macro perplexity; the cell's winner is
the lowest of those, with the runner-up (another strategy) beside it and *tie* where their 95%
intervals overlap.

Only configurations serving at the SLM's size (``claims.small_params``) enter; seeds are
pooled (``frontier.pool_seeds``). A cell compares macro perplexities over the same domains:
the full grid uses the configurations measured on every domain, and a configuration measured
on a subset of domains is compared only in a grid over that subset (:func:`domain_subsets`),
where everything else is re-averaged over the same subset.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from slmfactory.analysis import frontier, measured
from slmfactory.analysis.measured import AMORTISATION_N, MeasuredConfig, pool_seeds
from slmfactory.platform.cost import PAPER
from study import claims as rc
from study.results import budget_value, configs_from_rows

def short_budget(label: str) -> str:
    """``2e+07T`` -> ``20M``, ``1.64e+04T`` -> ``16k``, ``1.5e+06T`` -> ``1.5M`` (``none`` stays):
    a budget as a reader says it."""
    v = budget_value(label)
    if v <= 0:
        return label
    for div, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if v >= div:
            x = v / div
            return (f"{x:.0f}" if x >= 10 else f"{x:.3g}") + suffix
    return f"{v:.0f}"


NO_GENERIC = ("slm-is", "slm-nopt")
"""Strategies whose whole cost is per domain (C_generic = 0 under the paper's convention)."""
COST = "flops"


@dataclass
class AxesCell:
    generic: str
    spec: str
    budget: float | None
    """B(G, S, N): the per-domain budget in FLOPs (paper's convention); None when G or S has no
    reference cost."""
    contenders: list[MeasuredConfig] = field(default_factory=list)
    """The best configuration of each strategy in the cell, best macro perplexity first."""

    @property
    def best(self) -> MeasuredConfig | None:
        return self.contenders[0] if self.contenders else None

    @property
    def runner_up(self) -> MeasuredConfig | None:
        return self.contenders[1] if len(self.contenders) > 1 else None

    @property
    def tie(self) -> bool:
        return self.runner_up is not None and measured.overlaps(self.best, self.runner_up)


@dataclass
class AxesGrid:
    n_domains: int
    in_domain: int
    domains: tuple[str, ...]
    generics: list[str]
    specs: list[str]
    cells: dict[tuple[str, str], AxesCell]
    c_generic: dict[str, float]
    c_spec: dict[str, float]


def _reference_costs(small: list[MeasuredConfig]) -> tuple[dict[str, float], dict[str, float]]:
    c_gen: dict[str, float] = {}
    for c in small:
        if c.strategy == "slm" and c.generic_budget != "none" and c.has_cost(COST, PAPER):
            g = c.generic(COST, PAPER)
            c_gen[c.generic_budget] = min(g, c_gen.get(c.generic_budget, math.inf))
    rates = sorted(c.spec(COST, PAPER) / c.spent_spec for c in small
                   if c.strategy in ("slm", "slm-nopt") and c.spent_spec and c.has_cost(COST, PAPER))
    rate = rates[len(rates) // 2] if rates else None  # FLOPs per specialisation token at the SLM's size
    c_spec = {c.spec_budget: budget_value(c.spec_budget) * rate for c in small} if rate else {}
    return c_gen, c_spec


def paper_axes_grid(configs: list[MeasuredConfig], in_domain: int, n_domains: int) -> AxesGrid:
    """The grid for one in-domain size and N, from configurations measured on the same domains
    (see the module's docstring for who enters a cell)."""
    pooled = pool_seeds([c for c in configs if c.in_domain == in_domain])
    cap = rc.small_params(pooled)
    small = [c for c in pooled if cap is not None and c.params <= cap]
    domains = tuple(sorted(small[0].nll)) if small else ()
    c_gen, c_spec = _reference_costs(small)
    generics = sorted({c.generic_budget for c in small if c.strategy not in NO_GENERIC and c.generic_budget != "none"},
                      key=budget_value)
    specs = sorted({c.spec_budget for c in small}, key=budget_value)
    cells = {}
    for g in generics:
        for s in specs:
            budget = c_spec[s] + c_gen[g] / n_domains if g in c_gen and s in c_spec else None
            within = [c for c in small if budget_value(c.spec_budget) <= budget_value(s)]
            fit = [c for c in within if c.strategy not in NO_GENERIC and c.generic_budget == g]
            fit += [c for c in within if c.strategy in NO_GENERIC]
            fit += [c for c in small if c.strategy in NO_GENERIC and budget_value(c.spec_budget) > budget_value(s)
                    and budget is not None and c.has_cost(COST, PAPER)
                    and c.per_domain(n_domains, COST, PAPER) <= budget * (1 + 1e-9)]
            by: dict[str, MeasuredConfig] = {}
            for c in fit:
                if c.strategy not in by or (c.ppl_macro, c.label) < (by[c.strategy].ppl_macro, by[c.strategy].label):
                    by[c.strategy] = c
            cells[(g, s)] = AxesCell(g, s, budget, sorted(by.values(), key=lambda c: (c.ppl_macro, c.label)))
    return AxesGrid(n_domains, in_domain, domains, generics, specs, cells, c_gen, c_spec)


SUBSET_MIN_CONFIGS = 2
"""A domain subset gets its own grid when at least this many configurations were measured on
exactly it: a planned subset (slm-is and slm-nopt at their large budgets), not one unfinished
configuration caught part-way through its domains."""


def domain_subsets(rows: list[dict]) -> list[tuple[str, ...]]:
    """The proper subsets of the domains on which configurations were measured without the
    others (slm-is on three domains, on one; at least ``SUBSET_MIN_CONFIGS`` of them), largest
    first: each gets its own grid."""
    domains = tuple(sorted({r["domain"] for r in rows}))
    count: dict[tuple[str, ...], int] = {}
    for ds in _measured_on(rows).values():
        if ds and ds != domains:
            count[ds] = count.get(ds, 0) + 1
    return sorted((ds for ds, k in count.items() if k >= SUBSET_MIN_CONFIGS), key=lambda t: (-len(t), t))


def subset_configs(rows: list[dict], domains: tuple[str, ...]) -> list[MeasuredConfig]:
    """Configurations measured on every domain of ``domains``, their macro perplexity over
    those domains only."""
    return configs_from_rows([r for r in rows if r["domain"] in domains])


def grids(rows: list[dict], configs: list[MeasuredConfig]) -> list[tuple[tuple[str, ...] | None, int, list[AxesGrid]]]:
    """(domain subset or None for every domain, in-domain size, one grid per N) in page order:
    every domain at each in-domain size, then each subset at the in-domain sizes where a
    configuration measured only on it exists."""
    out = []
    for n in rc.sizes(configs):
        out.append((None, n, [paper_axes_grid(configs, n, k) for k in AMORTISATION_N]))
    measured_on = _measured_on(rows)
    for sub in domain_subsets(rows):
        sizes = sorted({r["in_domain_tokens"] for r in rows if measured_on[_key(r)] == sub})
        sub_configs = subset_configs(rows, sub)
        for n in sizes:
            if any(c.in_domain == n for c in sub_configs):
                out.append((sub, n, [paper_axes_grid(sub_configs, n, k) for k in AMORTISATION_N]))
    # A grid needs a generic budget (a column) and a specialisation budget (a row).
    return [(sub, n, gs) for sub, n, gs in out if gs[0].generics and gs[0].specs]


def _key(r: dict) -> tuple:
    return (r["strategy"], r["generic_budget"], r["spec_budget"], r["in_domain_tokens"], r["settings"])


def _measured_on(rows: list[dict]) -> dict[tuple, tuple[str, ...]]:
    """configuration -> the domains it was measured on."""
    seen: dict[tuple, set[str]] = {}
    for r in rows:
        seen.setdefault(_key(r), set()).add(r["domain"])
    return {k: tuple(sorted(v)) for k, v in seen.items()}


def figure_name(sub: tuple[str, ...] | None, in_domain: int) -> str:
    return f"paper_axes_n{in_domain}_{'all' if sub is None else '-'.join(sub)}.png"


def cell_text(cell: AxesCell, markdown: bool = True) -> str:
    b = cell.best
    if b is None:
        return "-"
    where = f" s{b.spec_budget}" if b.spec_budget != cell.spec else ""
    name = f"**{b.strategy}**{where}" if markdown else f"{b.strategy}{where}"
    text = f"{name} {b.ppl_macro:.2f}"
    if cell.runner_up is not None:
        r = cell.runner_up
        text += (" (tie: " if cell.tie else " (next: ") + f"{r.strategy}" + (
            f" s{r.spec_budget}" if r.spec_budget != cell.spec else "") + f" {r.ppl_macro:.2f})"
    is_ = next((c for c in cell.contenders[2:] if c.strategy == "slm-is"), None)
    if is_ is not None:  # importance sampling is the paper's answer at large S: always shown
        text += f"; slm-is" + (f" s{is_.spec_budget}" if is_.spec_budget != cell.spec else "") + f" {is_.ppl_macro:.2f}"
    return text


def table(grid: AxesGrid) -> str:
    """The grid as markdown: rows the specialisation budgets (largest first, as the y axis
    reads), columns the generic budgets."""
    head = ["spec. budget S \\ generic budget G"] + [
        f"G = {g} ({frontier.fmt(grid.c_generic.get(g))} FLOPs; /N = {frontier.fmt(_per(grid, g))})"
        for g in grid.generics]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in reversed(grid.specs):
        lines.append(f"| S = {s} ({frontier.fmt(grid.c_spec.get(s))} FLOPs/domain) | "
                     + " | ".join(cell_text(grid.cells[(g, s)]) for g in grid.generics) + " |")
    return "\n".join(lines)


def _per(grid: AxesGrid, g: str) -> float | None:
    c = grid.c_generic.get(g)
    return None if c is None else c / grid.n_domains


def winners(grid: AxesGrid) -> dict[str, int]:
    """strategy -> how many cells it wins."""
    out: dict[str, int] = {}
    for cell in grid.cells.values():
        if cell.best is not None:
            out[cell.best.strategy] = out.get(cell.best.strategy, 0) + 1
    return dict(sorted(out.items(), key=lambda kv: (-kv[1], kv[0])))


def draw(grids_n: list[AxesGrid], path: Path, title: str, bar: float | None = None, bar_text: str = "") -> Path:
    """One panel per N: the grid coloured by the winning strategy (one colour per strategy,
    ``figures.STRATEGY_COLOUR``), each cell labelled. With ``bar``, a cell whose winner's macro
    perplexity is not below it is drawn blank (``bar_text`` says what the bar is)."""
    import numpy as np

    from slmfactory.analysis.figures import colour_map, colour_of, pyplot

    matplotlib, plt = pyplot()
    strategies = sorted({c.strategy for g in grids_n for cell in g.cells.values() for c in cell.contenders})
    cmap = colour_map(strategies)

    def shown(cell: AxesCell) -> MeasuredConfig | None:
        b = cell.best
        return None if b is None or (bar is not None and b.ppl_macro >= bar) else b
    g0 = grids_n[0]
    fig, axes = plt.subplots(1, len(grids_n), figsize=(3.2 * len(grids_n) * max(1, len(g0.generics)) / 2 + 1,
                                                       0.55 * len(g0.specs) + 2.2), squeeze=False)
    for ax, grid in zip(axes[0], grids_n):
        m = np.full((len(grid.specs), len(grid.generics)), -1)
        for (g, s), cell in grid.cells.items():
            if shown(cell) is not None:
                m[grid.specs.index(s), grid.generics.index(g)] = strategies.index(cell.best.strategy)
        ax.imshow(np.ma.masked_less(m, 0), cmap=cmap, vmin=0, vmax=max(len(strategies) - 1, 1), aspect="auto",
                  origin="lower", interpolation="nearest")
        for (g, s), cell in grid.cells.items():
            b = shown(cell)
            text = ("-" if cell.best is None else "blank") if b is None else (
                f"{b.strategy}" + (f"\ns{short_budget(b.spec_budget)}" if b.spec_budget != s else "")
                + f"\n{b.ppl_macro:.1f}" + ("\ntie" if cell.tie else ""))
            ax.text(grid.generics.index(g), grid.specs.index(s), text, ha="center", va="center", fontsize=6)
        ax.set_xticks(range(len(grid.generics)), [short_budget(g) for g in grid.generics], fontsize=7)
        ax.set_yticks(range(len(grid.specs)), [short_budget(s) for s in grid.specs], fontsize=7)
        ax.set_xlabel("generic budget G (tokens, paid once)", fontsize=7)
        ax.set_ylabel("specialisation budget S (tokens per domain)", fontsize=7)
        ax.set_title(f"N = {grid.n_domains}", fontsize=8)
    handles = [plt.Rectangle((0, 0), 1, 1, color=colour_of(s)) for s in strategies]
    fig.legend(handles, strategies, loc="lower center", ncol=len(strategies), fontsize=7)
    fig.suptitle(title + (f"\nblank: the winner is not below {bar_text} ({bar:.1f})" if bar is not None else ""),
                 fontsize=8)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
