"""The report and the recommendation, read from a real MLflow store (sqlite in a tmp dir).

Each test writes trial runs carrying the trial-record contract (tags ``slmfactory.trial``,
``strategy``, ``domain``, budgets, ``settings``; metrics ``test_nll``, ``test_nll_se``,
``ppl/<d>``, costs in FLOPs and device-hours, …) with constructed numbers, so that what the
report must answer is known exactly. No Ray, no training.
"""

from __future__ import annotations

import math
import time

import numpy as np
import pytest

from slmfactory import cli
from slmfactory.analysis import figures as fg
from slmfactory.analysis import frontier as fr
from slmfactory.analysis import measured as ms
from slmfactory.analysis import recommend as rd
from slmfactory.analysis import report as rp
from slmfactory.platform.errors import SlmFactoryError
from slmfactory.trial import TRIAL_TAG

SIZE, BIG = 1000, 8000


def _log(client, exp_id, strategy, domain, nll, *, g="1e+06T", s="1e+04T", n=SIZE, settings="", se=0.01,
         params=1e6, flops=(0.0, 1e9), hours=None, extra=None, parent=None, old=False):
    """One finished trial run as ``pipeline.trial_record`` logs it (``old``: the fields runs
    had before the contract: no settings, intervals, spent budgets)."""
    from mlflow.entities import Metric, RunTag

    key = f"{strategy}|{domain}|{g}|{s}|{n}|{settings}"
    tags = {TRIAL_TAG: key, "strategy": strategy, "domain": domain, "in_domain_tokens": str(n),
            "generic_budget": g, "spec_budget": s}
    if parent:
        tags["mlflow.parentRunId"] = parent
    if not old:
        tags["settings"] = settings
    ppl = math.exp(nll)
    m = {f"ppl/{domain}": ppl, "test_nll": nll, "params": params, "cost/inference_flops_per_token": 2 * params,
         "cost/generic_flops": flops[0], "cost/spec_flops": flops[1]}
    if not old:
        m.update({"test_nll_se": se, f"ppl_lo/{domain}": math.exp(nll - 2 * se),
                  f"ppl_hi/{domain}": math.exp(nll + 2 * se)})
    if hours:
        m.update({"cost/generic_device_hours": hours[0], "cost/spec_device_hours": hours[1]})
    m.update(extra or {})
    run = client.create_run(exp_id, tags=tags)
    now = int(time.time() * 1000)
    client.log_batch(run.info.run_id, metrics=[Metric(k, float(v), now, 0) for k, v in m.items()],
                     tags=[RunTag(k, v) for k, v in tags.items()])
    client.set_terminated(run.info.run_id)
    return run.info.run_id


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One sqlite store, several experiments (creating the schema is the slow part)."""
    from slmfactory.platform.tracking import client_for, ensure_experiment

    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    client = client_for(uri)
    exps = {name: ensure_experiment(client, uri, name)
            for name in ("frontier", "seeds", "tables", "old", "interval", "conventions", "serving", "twice",
                         "exact")}
    return uri, client, exps


@pytest.fixture(scope="module")
def frontier(store):
    """A constructed frontier over domains a, b at in-domain size SIZE:
    - slm: a large generic cost (1e12 FLOPs, 10 device-hours) and a small spec cost, the best
      perplexity of the 1M class (NLL 5.0);
    - slm-is: no generic cost, a large spec cost (5e10 FLOPs, 0.01 device-hours), NLL 5.3;
    - llm: 5M parameters, NLL 5.005 — within slm's interval: a tie where both fit;
    and at size BIG only, slm-nopt with NLL 4.0 (it must not leak into SIZE's answers)."""
    uri, client, exps = store
    e = exps["frontier"]
    for d in ("a", "b"):
        _log(client, e, "slm", d, 5.0, flops=(1e12, 1e9), hours=(10.0, 0.001))
        _log(client, e, "slm-is", d, 5.3, g="none", flops=(0.0, 5e10), hours=(0.0, 0.01))
        _log(client, e, "llm", d, 5.005, params=5e6, flops=(5e12, 5e9), hours=(50.0, 0.005))
        _log(client, e, "slm-nopt", d, 4.0, g="none", n=BIG, flops=(0.0, 1e10), hours=(0.0, 0.002))
    return ms.load_configs(uri, "frontier")


def test_two_finished_runs_of_one_trial_are_refused_naming_the_key_and_both_runs(store):
    """A trial counts once: the frontier does not weigh one trial's measurement twice, nor
    pick one of its runs silently."""
    uri, client, exps = store
    e = exps["twice"]
    first = _log(client, e, "slm", "a", 5.0)
    _log(client, e, "slm", "b", 5.1)
    second = _log(client, e, "slm", "a", 5.2)  # the same trial key as the first
    with pytest.raises(SlmFactoryError) as err:
        ms.load_configs(uri, "twice")
    message = str(err.value)
    assert "trial slm|a|1e+06T|1e+04T|1000| has 2 finished runs" in message
    assert first in message and second in message and "mlflow runs delete" in message
    client.delete_run(second)  # what the message says to do
    assert [c.ppl["a"] for c in ms.load_configs(uri, "twice")] == [pytest.approx(math.exp(5.0))]


def _by(configs, strategy, n=SIZE):
    return next(c for c in configs if c.strategy == strategy and c.in_domain == n)


def test_recommend_changes_with_the_number_of_domains(frontier):
    # slm's 1e12 generic FLOPs spread over N domains: too much per domain at N = 1, cheap at N = 50.
    answers = {n: rd.recommend(frontier, 2e6, 1e11, n, in_domain=SIZE).best.strategy for n in ms.AMORTISATION_N}
    assert answers == {1: "slm-is", 7: "slm-is", 50: "slm"}


def test_recommend_changes_with_the_budget(frontier):
    assert rd.recommend(frontier, 2e6, 1e11, 1, in_domain=SIZE).best.strategy == "slm-is"
    assert rd.recommend(frontier, 2e6, 2e12, 1, in_domain=SIZE).best.strategy == "slm"
    assert rd.recommend(frontier, 2e6, 1e9, 1, in_domain=SIZE).best is None  # nothing that cheap


def test_recommend_prices_in_the_chosen_cost_unit(frontier):
    # Same N: in FLOPs slm's per-domain cost (1.4e11) fits 2e11; in device-hours it is
    # 10/7 h, over a 1 h budget, and slm-is (0.01 h) wins.
    assert rd.recommend(frontier, 2e6, 2e11, 7, in_domain=SIZE, cost="flops").best.strategy == "slm"
    assert rd.recommend(frontier, 2e6, 1.0, 7, in_domain=SIZE, cost="device_hours").best.strategy == "slm-is"


def test_recommend_answers_from_one_in_domain_size(frontier):
    # The largest measured size the user has at least: 5000 tokens -> the 1000-token sweep.
    rec = rd.recommend(frontier, 1e7, 1e13, 50, in_domain=5000)
    assert rec.in_domain == SIZE and {c.in_domain for c in rec.ranked} == {SIZE}
    assert rd.recommend(frontier, 1e7, 1e13, 50, in_domain=BIG).best.strategy == "slm-nopt"
    assert rd.recommend(frontier, 1e7, 1e13, 50).in_domain == BIG  # default: the largest measured
    with pytest.raises(SlmFactoryError, match="--in-domain"):
        rd.recommend(frontier, 1e7, 1e13, 50, in_domain=500)


def test_macro_interval_follows_the_stated_formula_and_contains_the_estimate(store):
    uri, client, exps = store
    e = exps["interval"]
    for d, nll, se in (("x", 5.0, 0.02), ("y", 6.0, 0.04), ("z", 7.0, 0.04)):
        _log(client, e, "slm-nopt", d, nll, g="none", se=se)
    (c,) = ms.load_configs(uri, "interval")
    se = math.sqrt(0.02 ** 2 + 0.04 ** 2 + 0.04 ** 2) / 3
    lo, hi = c.interval
    assert c.ppl_macro == pytest.approx(math.exp(6.0))
    assert (lo, hi) == pytest.approx((math.exp(6.0 - 1.96 * se), math.exp(6.0 + 1.96 * se)))
    assert lo < c.ppl_macro < hi


def test_overlapping_intervals_are_a_tie(frontier):
    # slm (5.0) and llm (5.005), SE 0.0071 each: their intervals overlap.
    tie = rd.recommend(frontier, 1e7, 1e13, 50, in_domain=SIZE)
    assert (tie.best.strategy, tie.runner_up.strategy, tie.tie) == ("slm", "llm", True)
    # slm and slm-is, 0.3 nats apart: not a tie.
    clear = rd.recommend(frontier, 2e6, 1e13, 50, in_domain=SIZE)
    assert (clear.best.strategy, clear.runner_up.strategy, clear.tie) == ("slm", "slm-is", False)


def _table_answers(table: str) -> dict[tuple, list[str]]:
    """(N, in-domain, class) -> the recommended strategy of each budget bin, in order."""
    out: dict[tuple, list[str]] = {}
    for line in table.splitlines()[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        out.setdefault((int(cells[0]), cells[1], cells[2]), []).append(cells[4].split()[0])
    return out


def test_recommendation_table_depends_on_n_budget_and_size(frontier):
    table = rp.recommendation_table(frontier)
    answers = _table_answers(table)
    # Three per-domain costs at 1000 tokens (slm-is, slm, llm): three log-spaced bins. The
    # 1M class: slm-is in the cheapest bin while slm's generic cost is shared by few
    # domains; slm in every bin at N = 50.
    assert answers[(1, "1,000", "<= 1M")] == ["slm-is", "slm", "slm"]
    assert answers[(7, "1,000", "<= 1M")] == ["slm-is", "slm", "slm"]
    assert answers[(50, "1,000", "<= 1M")] == ["slm", "slm", "slm"]
    assert answers[(50, "8,000", "<= 1M")] == ["slm-nopt"]
    # In the top bin the 5M class admits llm, tied with slm: marked; the 1M class's
    # runner-up there is slm-is, 0.3 nats worse: not a tie.
    top = [line for line in table.splitlines() if line.startswith("| 50 | 1,000 | <= 5M |")][-1]
    assert "| llm g1e+06T s1e+04T" in top and top.endswith("| **tie** |")
    top1m = [line for line in table.splitlines() if line.startswith("| 50 | 1,000 | <= 1M |")][-1]
    assert "| slm-is gnone s1e+04T" in top1m and top1m.endswith("| no |")


def test_two_seeds_are_two_rows_with_their_spread_and_ablations_stay_apart(store):
    uri, client, exps = store
    e = exps["seeds"]
    # The sweep's parent run (no trial tag) holds nested trial runs: only the trials count.
    parent = client.create_run(e, tags={"mlflow.runName": "sweep"}).info.run_id
    client.log_metric(parent, "test_nll", 1.0)
    client.set_terminated(parent)
    nll = {"finetune.seed=0": 5.0, "finetune.seed=1": 5.2, "cluster.k=64,finetune.seed=0": 4.5}
    for settings, v in nll.items():
        for d in ("a", "b"):
            _log(client, e, "slm-mix", d, v, settings=settings, parent=parent,
                 extra={"spent/generic_tokens": 1.2e6, "spent/spec_tokens": 9984})
    configs = ms.load_configs(uri, "seeds")
    assert sorted(c.settings for c in configs) == sorted(nll)
    spread = float(np.std([math.exp(5.0), math.exp(5.2)], ddof=1))
    by = {c.settings: c for c in configs}
    assert by["finetune.seed=0"].seed_spread == pytest.approx(spread)
    assert by["finetune.seed=1"].seed_spread == pytest.approx(spread)
    assert by["cluster.k=64,finetune.seed=0"].seed_spread is None  # an ablation, run once
    md = rp.markdown(configs)
    assert "seed spread" in md and md.count(f"| {spread:.3g} |") == 2
    # Rows show their settings and the spent budgets beside the nominal labels.
    for settings in nll:
        assert f"| slm-mix | {settings} | 1e+06T (1.2e+06 T spent) | 1e+04T (9.98e+03 T spent) |" in md


def test_runs_before_the_contract_still_report(store):
    uri, client, exps = store
    for d in ("a", "b"):
        _log(client, exps["old"], "slm", d, 5.0, old=True)
    (c,) = ms.load_configs(uri, "old")
    assert c.settings == "" and c.interval is None and c.spent_spec is None
    assert "| slm | - | 1e+06T | 1e+04T |" in rp.markdown([c]) and "[n/a]" in rp.markdown([c])


def _zero_marks(ax):
    return [col for col in ax.collections if col.get_gid() == fg.ZERO_GID]


def test_zero_costs_get_their_own_mark_at_the_left_edge(frontier, tmp_path):
    import matplotlib.pyplot as plt

    fig, _ = fg.plot_costs(frontier, SIZE, 7, "flops", tmp_path)
    try:
        generic = fig.axes[0]  # slm-is has no generic cost
        (mark,) = _zero_marks(generic)
        xs = mark.get_offsets()[:, 0]
        # One decade below the smallest positive generic cost (slm's 1e12), not at 10^0.
        assert list(xs) == [1e11] and generic.get_xlim()[0] < 1e11
        assert mark.get_offsets()[0, 1] == pytest.approx(_by(frontier, "slm-is").ppl_macro)
        ticks = dict(zip(generic.get_xticks(), (t.get_text() for t in generic.get_xticklabels())))
        assert ticks[1e11] == "0"
        assert not _zero_marks(fig.axes[1])  # every spec cost is positive
    finally:
        plt.close(fig)


def test_pareto_fronts_are_drawn_per_inference_class(frontier, tmp_path):
    import matplotlib.pyplot as plt

    fig, _ = fg.plot_costs(frontier, SIZE, 7, "flops", tmp_path)
    try:
        fronts = {ln.get_gid(): ln for ln in fig.axes[1].lines if (ln.get_gid() or "").startswith("pareto-")}
        assert set(fronts) == {"pareto-1e+06", "pareto-5e+06"}
        # llm (5M) is not on the 1M class's front, and is the 5M class's only point.
        llm = _by(frontier, "llm")
        assert llm.ppl_macro not in list(fronts["pareto-1e+06"].get_ydata())
        assert list(fronts["pareto-5e+06"].get_ydata()) == [llm.ppl_macro]
    finally:
        plt.close(fig)


def test_figure1_budget_ticks_are_distinct_bins(tmp_path):
    import matplotlib.pyplot as plt

    # Per-domain costs within 2% of each other: two significant digits would repeat 2.3e+11.
    close = [ms.MeasuredConfig(f"s{i}", "none", "1e+04T", SIZE, "", 1_000_000, 2e6, {"flops": (0.0, cost)},
                               {"a": 100.0 - i}, {"a": math.log(100.0 - i)})
             for i, cost in enumerate((2.30e11, 2.31e11, 2.32e11, 2.33e11, 2.34e11, 2.35e11))]
    fig, _ = fg.figure1(close, SIZE, 7, "flops", tmp_path)
    try:
        labels = [t.get_text() for t in fig.axes[0].get_xticklabels()]
        assert len(labels) == fr.MAX_BUDGET_BINS == len(set(labels))
    finally:
        plt.close(fig)


@pytest.fixture(scope="module")
def tables(store):
    """Three domains at one size: slm (with ppl before fine-tuning and generic ppl at two
    generic budgets), slm-mix and slm-pn with the domains' cluster entropies."""
    uri, client, exps = store
    e = exps["tables"]
    entropy = {"a": 0.5, "b": 1.0, "c": 2.0}
    mix = {"a": 4.9, "b": 4.95, "c": 5.1}   # gains fall with entropy
    pn = {"a": 5.1, "b": 4.95, "c": 4.9}    # gains rise with entropy
    for d in entropy:
        for g, gppl in (("1e+06T", 250.0), ("2e+06T", 220.0)):
            _log(client, e, "slm", d, 5.0, g=g, extra={"test_ppl_before": {"a": 300, "b": 400, "c": 500}[d],
                                                        "generic/generic_ppl": gppl})
        _log(client, e, "slm-mix", d, mix[d], settings="slm-mix.experts=4",
             extra={"domain_entropy": entropy[d], "generic/generic_ppl": 270.0})
        _log(client, e, "slm-pn", d, pn[d], extra={"domain_entropy": entropy[d]})
    return uri


def test_report_writes_tables_4_8_and_entropy_with_the_right_numbers(tables, tmp_path):
    out = tmp_path / "rep"
    # Through the command line, as a user runs it.
    assert cli.main(["report", "--set", f"tracking.uri={tables}", "--experiment", "tables",
                     "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    # Table 4: before = exp(mean log ppl) = (300·400·500)^(1/3), after = e^5.
    before = (300 * 400 * 500) ** (1 / 3)
    assert f"| 1,000 | slm | - | 1e+06T | 1e+04T | {before:.2f} | {math.exp(5):.2f} |" in md
    # Table 8: one column per generic budget; the mixture's value is routed.
    assert "| slm | - | 250.00 | 220.00 |" in md
    assert "| slm-mix (routed) | slm-mix.experts=4 | 270.00 | - |" in md
    # Entropy table: gain = 1 - ppl_x / ppl_slm, Spearman -1 (mix) and +1 (pn).
    assert f"| a | 0.500 | {math.exp(5):.2f} | {math.exp(4.9):.2f} | {1 - math.exp(-0.1):+.3f} |" in md
    gains = {g["config"].strategy: g["spearman"] for g in fr.entropy_gains(ms.load_configs(tables, "tables"))}
    assert gains == {"slm-mix": pytest.approx(-1.0), "slm-pn": pytest.approx(1.0)}
    assert "rho = -1.000" in md and "rho = 1.000" in md
    # One figure per in-domain size, N, cost unit (only FLOPs were logged here) and cost convention.
    pngs = {p.name for p in out.glob("*.png")}
    # Paper's convention: no suffix; measured: _measured.
    assert pngs == ({f"{kind}_n1000_N{n}_flops{suffix}.png" for kind in ("ppl_vs_cost", "figure1")
                     for n in ms.AMORTISATION_N for suffix in ("", "_measured")}
                    | {f"amortisation_n1000_flops{suffix}.png" for suffix in ("", "_measured")})
    assert "### Per-domain budget in FLOPs, paper costs" in md and "### Per-domain budget in FLOPs, measured costs" in md


def _recommend(capsys, uri, *args):
    rc = cli.main(["recommend", "--set", f"tracking.uri={uri}", "--experiment", "frontier", *args])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def test_recommend_command_prints_the_answer_its_interval_and_tie(store, frontier, capsys):
    uri = store[0]
    base = ["--inference-params", "2e6", "--spec-budget", "1e11", "--in-domain", "1000"]
    rc, out, _ = _recommend(capsys, uri, *base, "--domains", "1")
    lo, hi = _by(frontier, "slm-is").interval
    assert rc == 0 and "recommended: slm-is" in out and f"[95% {lo:.2f}, {hi:.2f}]" in out
    rc, out, _ = _recommend(capsys, uri, *base, "--domains", "50")
    assert rc == 0 and "recommended: slm " in out
    rc, out, _ = _recommend(capsys, uri, "--inference-params", "2e6", "--spec-budget", "1e13", "--domains", "50",
                            "--in-domain", "1000")
    assert "runner-up: slm-is" in out and "not a tie" in out
    rc, out, _ = _recommend(capsys, uri, "--inference-params", "1e7", "--spec-budget", "1e13", "--domains", "50",
                            "--in-domain", "1000")
    assert "runner-up: llm" in out and "tie: the intervals overlap" in out
    rc, out, _ = _recommend(capsys, uri, *base, "--domains", "7", "--cost", "device_hours")
    assert rc == 0 and "device-hours" in out  # the unit as it reads


@pytest.fixture(scope="module")
def conventions(store):
    """slm-is at in-domain size BIG: its generic cost is its embedding of the generic corpus
    (2e12 FLOPs, 4 device-hours, logged as ``cost/clustering_generic_*``), its specialisation
    5e10 FLOPs; slm at SIZE: a generic phase (1e12) and no clustering."""
    uri, client, exps = store
    e = exps["conventions"]
    embed = {"cost/clustering_generic_flops": 2e12, "cost/clustering_generic_device_hours": 4.0}
    for d in ("a", "b"):
        _log(client, e, "slm-is", d, 5.3, g="none", n=BIG, flops=(2e12, 5e10), hours=(4.0, 0.01), extra=embed)
        _log(client, e, "slm", d, 5.0, flops=(1e12, 1e9), hours=(10.0, 0.001))
    return ms.load_configs(uri, "conventions")


def test_cost_conventions_differ_for_slm_is_only(conventions):
    slm_is, slm = _by(conventions, "slm-is", BIG), _by(conventions, "slm")
    assert slm_is.generic("flops", "measured") == 2e12 and slm_is.generic("flops", "paper") == 0.0
    assert slm_is.generic("device_hours", "paper") == 0.0 and slm_is.spec("device_hours", "paper") == 0.01
    assert slm.costs_in("paper") == slm.costs_in("measured") == {"flops": (1e12, 1e9), "device_hours": (10.0, 0.001)}
    # Within 1e11 per domain only under the paper's convention.
    assert rd.recommend(conventions, 2e6, 1e11, 1, in_domain=BIG, convention="paper").best is slm_is
    assert rd.recommend(conventions, 2e6, 1e11, 1, in_domain=BIG, convention="measured").best is None


def _per_domain(out: str) -> str:
    return next(line for line in out.splitlines() if "per-domain cost" in line)


@pytest.mark.parametrize("strategy,size", [("slm-is", BIG), ("slm", SIZE)])
def test_recommend_costs_paper_and_measured(store, conventions, capsys, strategy, size):
    """`recommend --costs paper|measured`: slm-is's per-domain cost drops its generic
    embedding under paper (5e10 against 2.05e12 at N = 1); slm's is the same under both."""
    base = ["--set", f"tracking.uri={store[0]}", "--experiment", "conventions", "--inference-params", "2e6",
            "--spec-budget", "1e13", "--domains", "1", "--in-domain", str(size)]
    lines = {}
    for conv in ("paper", "measured"):
        assert cli.main(["recommend", *base, "--costs", conv]) == 0
        out = capsys.readouterr().out
        assert f"recommended: {strategy} " in out and f"({conv} costs)" in out
        lines[conv] = _per_domain(out)
    paper = float(lines["paper"].split(": ")[1].split()[0])
    measured = float(lines["measured"].split(": ")[1].split()[0])
    if strategy == "slm-is":
        assert (paper, measured) == (5e10, 2.05e12)
    else:
        assert paper == measured == 1.001e12


@pytest.mark.parametrize("flag,value", [("--cost", "joules"), ("--domains", "0"), ("--spec-budget", "abc"),
                                        ("--inference-params", "-1"), ("--in-domain", "10"),
                                        ("--costs", "actual"), ("--inference-cost", "-1"),
                                        ("--inference-cost", "cheap"), ("--inference-task", "train")])
def test_recommend_bad_values_are_one_line_naming_the_flag(store, frontier, capsys, flag, value):
    args = {"--inference-params": "2e6", "--spec-budget": "1e11", "--domains": "7", flag: value}
    rc, _, err = _recommend(capsys, store[0], *(x for kv in args.items() for x in kv))
    assert rc == 2 and err.count("\n") == 1 and err.startswith("slmfactory: error: ") and flag in err


def _serving(generate: float, score: float) -> dict:
    """A trial's measured serving cost as ``phases.finish`` logs it: device-hours per
    million tokens (and the tokens/s they follow from)."""
    return {"serving/generate_device_hours_per_mtok": generate, "serving/score_device_hours_per_mtok": score,
            "serving/generate_tokens_per_s": 1e6 / 3600 / generate, "serving/score_tokens_per_s": 1e6 / 3600 / score}


@pytest.fixture(scope="module")
def serving(store):
    """At in-domain size SIZE, over domains a and b, all within any training budget:
    - llm: the best perplexity (NLL 4.9) and 5 device-hours per million generated tokens;
    - slm: NLL 5.0, 0.5 device-hours per million generated tokens (a tenth of llm's);
    - slm-nopt: NLL 4.0, its models' serving never measured (exported without it);
    - slm-is: NLL 5.3, measured on domain a only (so, as a configuration, not measured)."""
    from mlflow.entities import RunTag

    uri, client, exps = store
    e = exps["serving"]
    for d in ("a", "b"):
        for strategy, nll, extra, params in (("llm", 4.9, _serving(5.0, 0.05), 5e6), ("slm", 5.0, _serving(0.5, 0.01), 1e6),
                                             ("slm-nopt", 4.0, {}, 1e6),
                                             ("slm-is", 5.3, _serving(0.4, 0.01) if d == "a" else {}, 1e6)):
            run_id = _log(client, e, strategy, d, nll, params=params, flops=(1e9, 1e9), hours=(0.1, 0.1), extra=extra)
            if extra:
                client.set_tag(run_id, "serving_machine", "Test CPU, 2 cores, bf16 matrix units: none, 1 torch thread(s)")
    return ms.load_configs(uri, "serving")


def test_recommend_inference_cost_filters_by_the_measured_serving_cost(serving):
    """``inference_cost``: a configuration fits when its measured cost per million tokens is
    within it (device-hours, or priced at the price per device-hour); one whose models were
    not all measured never fits."""
    slm, llm = _by(serving, "slm"), _by(serving, "llm")
    assert slm.serving == {"generate": pytest.approx(0.5), "score": pytest.approx(0.01)}
    assert not _by(serving, "slm-nopt").serving and not _by(serving, "slm-is").serving  # unmeasured, half-measured
    assert "Test CPU, 2 cores" in slm.serving_machine
    assert rd.recommend(serving, 1e7, 1e12, 1).best.strategy == "slm-nopt"  # no serving limit: the best perplexity
    assert rd.recommend(serving, 1e7, 1e12, 1, inference_cost=10.0).best is llm
    assert rd.recommend(serving, 1e7, 1e12, 1, inference_cost=1.0).best is slm  # llm's 5 device-hours too dear
    assert rd.recommend(serving, 1e7, 1e12, 1, inference_cost=0.1).best is None
    # Scoring is cheaper: at 0.06 device-hours per million scored tokens, llm fits again.
    assert rd.recommend(serving, 1e7, 1e12, 1, inference_cost=0.06, inference_task="score").best is llm
    # Priced at 0.1 per device-hour: llm costs 0.5 per million generated tokens, slm 0.05.
    assert rd.recommend(serving, 1e7, 1e12, 1, inference_cost=0.1, price_per_device_hour=0.1).best is slm
    assert rd.recommend(serving, 1e7, 1e12, 1, inference_cost=0.6, price_per_device_hour=0.1).best is llm
    with pytest.raises(SlmFactoryError, match="--inference-task 'train'"):
        rd.recommend(serving, 1e7, 1e12, 1, inference_cost=1.0, inference_task="train")


def test_report_table_has_a_measured_serving_cost_column(serving):
    table = rp.markdown(serving)
    header = next(line for line in table.splitlines() if line.startswith("| strategy"))
    assert header.endswith("| serving cost / M tokens generate / score (device-hours) |")
    rows = {line.split(" | ")[0][2:]: line for line in table.splitlines() if line.startswith("| ") and "---" not in line}
    assert rows["slm"].endswith("| 0.5 / 0.01 |") and rows["llm"].endswith("| 5 / 0.05 |")
    assert rows["slm-nopt"].endswith("| - / - |") and rows["slm-is"].endswith("| - / - |")
    assert "measured once at export" in table and "on Test CPU, 2 cores" in table
    priced = rp.markdown(serving, price_per_device_hour=0.1)
    assert "(price at 0.1 / device-hour) |" in priced and "| 0.05 / 0.001 |" in priced and "| 0.5 / 0.005 |" in priced


def test_recommend_command_answers_within_an_inference_cost(store, serving, capsys):
    uri = store[0]
    base = ["--set", f"tracking.uri={uri}", "--experiment", "serving", "--inference-params", "1e7",
            "--spec-budget", "1e12", "--domains", "1"]
    assert cli.main(["recommend", *base, "--inference-cost", "1"]) == 0
    out = capsys.readouterr().out
    assert "recommended: slm " in out
    assert ("serving cost (device-hours): 5.000e-01 per million generated tokens, 1.000e-02 per million scored "
            "tokens (<= 1 asked); measured on Test CPU, 2 cores") in out
    assert cli.main(["recommend", *base, "--inference-cost", "0.6",
                     "--set", "serving.price_per_device_hour=0.1"]) == 0
    out = capsys.readouterr().out
    assert "recommended: llm " in out and "serving cost (at 0.1 per device-hour): 5.000e-01 per million generated" in out
    assert cli.main(["recommend", *base, "--inference-cost", "0.01"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "<= 0.01 (device-hours) per million generated tokens" in err
    # An experiment whose models were never measured: said so, not "nothing fits".
    assert cli.main(["recommend", "--set", f"tracking.uri={uri}", "--experiment", "frontier", "--inference-params",
                     "1e7", "--spec-budget", "1e13", "--domains", "1", "--in-domain", "1000",
                     "--inference-cost", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--inference-cost: no configuration of 'frontier'" in err
    assert "has a measured serving cost" in err


def test_budgets_are_read_from_exact_tags_and_labels_only_display_them(store):
    """Runs hold their budgets exactly (``1048577`` tokens, with the unit); the configurations
    read back carry the exact budgets, show the label, order budgets by value, and keep the
    tags that find the runs again. A run logged with a label (before the exact tags) reads too."""
    from slmfactory.analysis.report import table_generic
    from slmfactory.trial import Budget

    uri, client, exps = store
    exact = {"generic_budget_unit": "tokens", "spec_budget_unit": "tokens"}
    for g, nll in (("1048577", 4.0), ("999999", 4.2)):
        rid = _log(client, exps["exact"], "slm", "a", nll, g=g, s="65537", extra={"generic/generic_ppl": nll * 10})
        for k, v in exact.items():
            client.set_tag(rid, k, v)
    _log(client, exps["exact"], "slm-nopt", "a", 4.5, g="none", s="6.55e+04T")  # a label: logged before
    configs = {(c.strategy, c.generic_budget): c for c in ms.load_configs(uri, "exact")}
    big = configs[("slm", "1.05e+06T")]
    assert big.budgets == (Budget("tokens", 1048577.0), Budget("tokens", 65537.0))
    assert big.budget_tags == ("1048577", "65537") and big.spec_budget == "6.55e+04T"
    assert configs[("slm", "1e+06T")].budgets[0].value == 999999
    old = configs[("slm-nopt", "none")]
    assert old.budgets == (None, Budget("tokens", 65500.0)) and old.budget_tags == ("none", "6.55e+04T")
    header = table_generic(list(configs.values())).splitlines()[0]
    assert header.index("1e+06T") < header.index("1.05e+06T")
