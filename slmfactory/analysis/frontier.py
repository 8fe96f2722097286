"""The frontier over a sweep's measured configurations (``measured.py`` reads them back
from MLflow): who is best at which cost (Pareto fronts, Figure 1's grid of recommendations
over inference classes and budget bins), the entropy gains of the experts' strategies, and
the cells the report's tables print.

Inference classes are the recipe's ``sweep.inference_caps`` (a model belongs to the smallest
cap that serves it) or, without caps, each distinct served-parameter count.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np

from slmfactory.analysis.measured import EXPERT_STRATEGIES, MeasuredConfig, is_seed, parse_settings
from slmfactory.analysis.recommend import Recommendation, recommend
from slmfactory.platform.cost import PAPER


MAX_BUDGET_BINS = 4


def pareto(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both cost and perplexity."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    front, best = [], math.inf
    for i in order:
        if points[i][1] < best:
            front.append(i)
            best = points[i][1]
    return front


def inference_classes(configs: list[MeasuredConfig], caps: tuple = ()) -> dict[float, list[MeasuredConfig]]:
    """Served-parameter classes: each configuration in the smallest cap that serves it
    (a model larger than every cap is its own class); without caps, one class per size."""
    caps = sorted(caps)
    out: dict[float, list[MeasuredConfig]] = {}
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


def fmt(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.3g}" if x else "0"


def ppl_cell(p: float, iv: tuple[float, float] | None) -> str:
    return f"{p:.2f} [{iv[0]:.2f}, {iv[1]:.2f}]" if iv else f"{p:.2f} [n/a]"


def macro_cell(c: MeasuredConfig) -> str:
    return ppl_cell(c.ppl_macro, c.interval)


def macro_of(values: dict[str, float]) -> float:
    """Macro perplexity of per-domain perplexities: exp of the mean log perplexity, the
    same average as the headline's exp(mean NLL)."""
    return math.exp(float(np.mean(np.log(list(values.values())))))


def _settings_seeds(c: MeasuredConfig) -> dict[str, str]:
    return {k: v for k, v in parse_settings(c.settings).items() if is_seed(k)}


def entropy_gains(configs: list[MeasuredConfig]) -> list[dict[str, Any]]:
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


def figure1_grid(configs: list[MeasuredConfig], in_domain: int, n_domains: int, cost: str,
                 inference_caps: tuple = (), convention: str = PAPER
                 ) -> tuple[list[float], np.ndarray, list[list[Recommendation]]]:
    """Figure 1's cells: inference classes x per-domain budget bins, each the recommendation
    of the configurations that fit (served parameters <= the class, per-domain cost under
    ``convention`` <= the bin's upper edge)."""
    rows = [c for c in configs if c.in_domain == in_domain and c.has_cost(cost, convention)]
    caps = list(inference_classes(rows, inference_caps))
    edges = budget_bins([c.per_domain(n_domains, cost, convention) for c in rows])
    cells = [[recommend(rows, cap, b * (1 + 1e-9), n_domains, in_domain, cost, convention) for b in edges]
             for cap in caps]
    return caps, edges, cells
