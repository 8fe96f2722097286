"""The recommendation: the measured configurations that fit an inference size, a per-domain
budget and N domains, best macro perplexity first (``recommend``): the best, the best of
another strategy, and whether the two tie (overlapping intervals); ``recommend_from_mlflow``
answers from a sweep's runs in MLflow, saying why when nothing fits (``slmfactory recommend``).

Separate from the frontier (``frontier.py``, whose Figure 1 cells are recommendations) so the
question ``slmfactory recommend`` asks is answered in one small module.
"""

from __future__ import annotations

from dataclasses import dataclass

from slmfactory.analysis.measured import COST_UNITS, UNIT_LABEL, MeasuredConfig, load_configs, overlaps
from slmfactory.platform.cost import PAPER, check_convention, check_task
from slmfactory.platform.errors import SlmFactoryError


@dataclass
class Recommendation:
    """The best fitting configuration, the best of another strategy, and whether the two
    are a tie (overlapping intervals)."""

    ranked: list[MeasuredConfig]
    in_domain: int | None
    cost: str
    convention: str = PAPER

    @property
    def best(self) -> MeasuredConfig | None:
        return self.ranked[0] if self.ranked else None

    @property
    def runner_up(self) -> MeasuredConfig | None:
        # The question is which *strategy*: the runner-up is the best of another strategy.
        return next((c for c in self.ranked[1:] if c.strategy != self.ranked[0].strategy), None)

    @property
    def tie(self) -> bool:
        return self.runner_up is not None and overlaps(self.best, self.runner_up)


def pick_in_domain(configs: list[MeasuredConfig], in_domain: int | None) -> int:
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


def recommend(configs: list[MeasuredConfig], inference_params: float, spec_budget: float, domains: int,
              in_domain: int | None = None, cost: str = "flops", convention: str = PAPER,
              inference_cost: float | None = None, inference_task: str = "generate",
              price_per_device_hour: float = 0.0) -> Recommendation:
    """Configurations of the chosen in-domain size that fit (served parameters <=
    ``inference_params``, per-domain budget C_spec + C_generic / N <= ``spec_budget`` in
    ``cost`` units under cost ``convention``, and with ``inference_cost``, a measured serving
    cost per million ``inference_task`` tokens <= it: device-hours, or their price at
    ``price_per_device_hour`` when that is > 0), best macro perplexity first; see
    :class:`Recommendation`. A configuration whose runs measured no serving cost never fits
    an ``inference_cost``."""
    if cost not in COST_UNITS:
        raise SlmFactoryError(f"--cost {cost!r}: expected one of {', '.join(COST_UNITS)}")
    check_convention(convention)
    check_task(inference_task, "--inference-task")
    size = pick_in_domain(configs, in_domain)
    fit = [c for c in configs if c.in_domain == size and c.has_cost(cost, convention) and c.params <= inference_params
           and c.per_domain(domains, cost, convention) <= spec_budget
           and (inference_cost is None or (c.has_serving_cost(inference_task)
                                           and c.serving_cost(inference_task, price_per_device_hour) <= inference_cost))]
    return Recommendation(sorted(fit, key=lambda c: (c.ppl_macro, c.total(domains, cost, convention))), size, cost,
                          convention)


def serving_unit_label(price_per_device_hour: float) -> str:
    """What a serving cost is in: device-hours, or their price when ``price_per_device_hour`` > 0."""
    return f"at {price_per_device_hour:g} per device-hour" if price_per_device_hour > 0 else "device-hours"


def recommend_from_mlflow(uri: str, experiment: str, inference_params: float, spec_budget: float, domains: int,
                          in_domain: int | None = None, cost: str = "flops", convention: str = PAPER,
                          inference_cost: float | None = None, inference_task: str = "generate",
                          price_per_device_hour: float = 0.0) -> Recommendation:
    """:func:`recommend` over the configurations of ``experiment`` in the MLflow store at
    ``uri`` (:func:`~slmfactory.analysis.measured.load_configs`). When none fits, one
    ``SlmFactoryError`` line saying why: with ``inference_cost``, that no configuration of the
    chosen in-domain size has a measured serving cost; else the limits nothing meets."""
    configs = load_configs(uri, experiment)
    rec = recommend(configs, inference_params, spec_budget, domains, in_domain, cost, convention, inference_cost,
                    inference_task, price_per_device_hour)
    if rec.best is None:
        if inference_cost is not None and not any(c.has_serving_cost(inference_task) for c in configs
                                                  if c.in_domain == rec.in_domain):
            raise SlmFactoryError(f"--inference-cost: no configuration of {experiment!r} (in-domain "
                                  f"{rec.in_domain:,} tokens) has a measured serving cost (its models were exported "
                                  f"with serving.cost_measure_s 0, or before serving costs were measured)")
        per_m = f"per million {'generated' if inference_task == 'generate' else 'scored'} tokens"
        raise SlmFactoryError(f"recommend: no measured configuration of {experiment!r} (in-domain {rec.in_domain:,} "
                              f"tokens) serves with <= {inference_params:.3g} parameters within {spec_budget:.3g} "
                              f"{UNIT_LABEL[cost]} per domain"
                              + (f" and <= {inference_cost:.3g} ({serving_unit_label(price_per_device_hour)}) {per_m}"
                                 if inference_cost is not None else ""))
    return rec
