"""docs/results.md: regenerated from its CSV byte for byte, its numbers equal to the CSV's (and
to MLflow's where the store exists), and the claim rules on synthetic sets whose verdict is
known (confirmed, refuted and inconclusive cases each). Fast: no Ray, no training."""

from __future__ import annotations

import dataclasses
import math
import os
import re
from pathlib import Path

import pytest

from slmfactory.sweeps import results, results_claims as rc, results_page
from slmfactory.sweeps.frontier import Config
from slmfactory.trial import experiment_name

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

REPO = Path(__file__).resolve().parents[1]
STUDY = REPO / "configs" / "study.yaml"
DEMO = REPO / "configs" / "demo.yaml"
CSV = REPO / "docs" / "study-runs.csv"
PAGE = REPO / "docs" / "results.md"


def _cfg(path: Path):
    from slmfactory.platform.config import load_config

    return load_config(path)


def _store(cfg) -> Path | None:
    uri = cfg.tracking_uri
    path = Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None
    return path if path is not None and path.is_file() else None


# -- (a) the committed page is what its CSV gives ----------------------------------------

def _committed():
    if not CSV.is_file() or not PAGE.is_file():
        pytest.skip(f"{CSV.relative_to(REPO)} / {PAGE.relative_to(REPO)} not committed yet (run "
                    "`python scripts/results.py -c configs/study.yaml --export docs/study-runs.csv`)")
    return _cfg(STUDY), results.read_csv(CSV)


def test_page_regenerates_byte_for_byte():
    cfg, rows = _committed()
    page = results_page.render_page(rows, cfg, csv_label="docs/study-runs.csv", config_label="configs/study.yaml",
                                    stages=results.read_stages(CSV), fig_rel="results")
    assert page == PAGE.read_text()


# -- (b) numbers on the page equal the CSV's (and MLflow's) -------------------------------

def _appendix(page: str) -> dict[tuple, str]:
    """The appendix table: (strategy, settings, generic, spec, in-domain) -> 'ppl [lo, hi]'."""
    body = page.split("## Appendix: every configuration", 1)[1]
    out = {}
    for line in body.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 12 and re.fullmatch(r"[\d,]+", cells[4]):
            out[(cells[0], "" if cells[1] == "-" else cells[1], cells[2], cells[3], int(cells[4].replace(",", "")))] \
                = cells[6]
    return out


def _expected_macro(rows: list[dict]) -> dict[tuple, str]:
    """Macro ppl [95%] computed here, independently of the package, from the CSV rows."""
    domains = {r["domain"] for r in rows}
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["strategy"], r["settings"], r["generic_budget"], r["spec_budget"],
                           r["in_domain_tokens"]), []).append(r)
    out = {}
    for key, rs in groups.items():
        if {r["domain"] for r in rs} != domains:
            continue
        nll = sum(r["test_nll"] for r in rs) / len(rs)
        se = math.sqrt(sum(r["test_nll_se"] ** 2 for r in rs)) / len(rs)
        out[key] = f"{math.exp(nll):.2f} [{math.exp(nll - 1.96 * se):.2f}, {math.exp(nll + 1.96 * se):.2f}]"
    return out


def _cross_check(page: str, rows: list[dict], cfg) -> int:
    shown, expected = _appendix(page), _expected_macro(rows)
    assert shown and set(shown) == set(expected)
    for key, value in expected.items():
        assert shown[key] == value, key
    # Table 8: slm's generic ppl per budget as the CSV has it.
    t8 = page.split("(the paper's Table 8, docs/paper.md#table-8)", 1)[1].split("\n## ", 1)[0]
    head = next(line for line in t8.splitlines() if line.startswith("| strategy |"))
    budgets = [h.strip().removeprefix("generic ppl at ") for h in head.strip("|").split("|")[2:]]
    checked = 0
    for line in t8.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] != "slm":
            continue
        for b, v in zip(budgets, cells[2:]):
            if v != "-":
                csv_values = {f"{r['generic_ppl']:.2f}" for r in rows if r["strategy"] == "slm"
                              and r["generic_budget"] == b and r["generic_ppl"] is not None}
                assert v in csv_values, (b, v, csv_values)
                checked += 1
    assert checked
    store = _store(cfg)
    if store is not None:  # the CSV's values are MLflow's, exactly
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=cfg.tracking_uri)
        sample = rows[:: max(1, len(rows) // 12)]
        for r in sample:
            m = client.get_run(r["run_id"]).data.metrics
            d = r["domain"]
            assert (m["test_nll"], m["test_nll_se"], m[f"ppl/{d}"], m["cost/spec_flops"]) == \
                (r["test_nll"], r["test_nll_se"], r["ppl"], r["spec_flops"]), r["run_id"]
            assert m.get("test_ppl_before") == r["ppl_before"]
    return len(expected)


def test_committed_page_numbers_equal_csv_and_mlflow():
    cfg, rows = _committed()
    assert _cross_check(PAGE.read_text(), rows, cfg) > 0


def test_demo_export_page_and_loader_agree_with_mlflow(tmp_path):
    """The same cross-check on a fresh export of the demo store (when it exists), and the
    CSV's configurations equal ``frontier.load_configs``'s."""
    cfg = _cfg(DEMO)
    if _store(cfg) is None:
        pytest.skip(f"no demo store at {cfg.tracking_uri} (`make demo` writes it)")
    from slmfactory.sweeps.frontier import load_configs

    rows = results.export_rows(cfg.tracking_uri, experiment_name(cfg))
    path = results.write_csv(rows, tmp_path / "demo-runs.csv")
    back = results.read_csv(path)
    assert back == rows
    page = results_page.render_page(back, cfg, csv_label="demo-runs.csv", config_label="configs/demo.yaml")
    assert _cross_check(page, back, cfg) > 0
    mine = {(c.strategy, c.generic_budget, c.spec_budget, c.in_domain, c.settings): c
            for c in results.configs_from_rows(back)}
    theirs = {(c.strategy, c.generic_budget, c.spec_budget, c.in_domain, c.settings): c
              for c in load_configs(cfg.tracking_uri, experiment_name(cfg))}
    assert set(mine) == set(theirs)
    for k, c in theirs.items():
        m = mine[k]
        assert (m.ppl, m.nll, m.se, m.ppl_before, m.entropy, m.params) == (c.ppl, c.nll, c.se, c.ppl_before,
                                                                           c.entropy, c.params)
        assert m.ppl_macro == pytest.approx(c.ppl_macro, rel=1e-12)
        for u in c.costs:
            assert m.costs[u] == pytest.approx(c.costs[u], rel=1e-12)
        assert m.spent_generic == pytest.approx(c.spent_generic) if c.spent_generic is not None else True


def test_csv_round_trip_is_exact(tmp_path):
    row = {c: None for c in results.COLUMNS}
    row.update(run_id="r1", trial_key="k", strategy="slm", domain="legal", generic_budget="8e+06T",
               spec_budget="1.64e+04T", in_domain_tokens=40000, settings="pretrain.seed=0", pretrain_seed="0",
               ppl=0.1 + 0.2, test_nll=1 / 3, test_nll_se=1e-17, params=262144.0, start_ms=1, end_ms=2)
    back = results.read_csv(results.write_csv([row], tmp_path / "x.csv"))
    assert back == [row]


def test_stage_log(tmp_path):
    log = tmp_path / "sweep.log"
    log.write_text("\n".join([
        "23:50:00 [study] corpus start", "23:50:30 corpus built in 30s",
        "23:51:00 [study] corpus done; sweep start", "23:51:40 slmfactory: error: boom",
        "23:51:50 [study] sweep done rc=2",
        "23:55:00 [study] sweep start (again)", "23:56:00 [cluster] windows: 10 windows", "23:58:00 [cluster] kmeans",
        "23:59:00 [resample] legal: 10 windows", "23:59:30 [sweep] generic phase 1/2: slm@1e+06T (shared by 4)",
        "00:10:00 [sweep] generic phase 2/2: slm@8e+06T (shared by 4)", "00:30:00 [sweep] 4 trials on Ray Tune",
        "00:40:00 [sweep    600s] 1/4 done, 0 running | finished slm-legal: ppl 30.00",
        "00:41:00 [sweep    660s] 1/4 done | FAILED slm-code: oops", "00:50:00 [study] sweep done rc=0", ""]))
    st = results.parse_stage_log(log)
    by = {s["stage"]: s["seconds"] for s in st["stages"]}
    assert by["corpus build"] == 60
    assert by["sweep setup (Ray, plan, tokenizer)"] == 50 + 60
    assert by["clustering (windows, embedding, k-means, assignment)"] == 180
    assert by["generic phase slm@1e+06T"] == 630  # across midnight
    assert by["trials (specialisation, on Ray Tune)"] == 1200
    assert st["sweep_attempts"] == 2 and st["trials_finished_lines"] == 1 and st["trials_failed_lines"] == 1
    assert not st["still_running"] and st["total_seconds"] == sum(by.values())
    results.write_stages(st, tmp_path / "runs.csv")
    assert results.read_stages(tmp_path / "runs.csv") == st


# -- (c) the claim rules on synthetic configurations --------------------------------------

SMALL, LARGE = 1_000_000, 5_000_000
DOMAINS = ("a", "b", "c")


def conf(strategy: str, ppl, g: str = "8e+06T", s: str = "1.6e+04T", n: int = 40_000, se: float = 0.01,
         params: int = SMALL, cost: tuple[float, float] = (0.0, 1.0), settings: str = "", gppl=None,
         entropy=None) -> Config:
    """A configuration with macro ppl ``ppl`` (or per-domain ppls) and an interval of about
    ±1.1% (se 0.01 per domain over 3 domains)."""
    ppls = dict(ppl) if isinstance(ppl, dict) else {d: float(ppl) for d in DOMAINS}
    return Config(strategy, g, s, n, settings, params, 2.0 * params, {"flops": cost}, ppls,
                  {d: math.log(p) for d, p in ppls.items()}, se={d: se for d in ppls}, generic_ppl=gppl,
                  entropy=entropy or {})


def test_compare_and_combine():
    a, b, c = conf("slm", 100), conf("slm-mix", 110), conf("slm-pn", 100.3)
    assert rc.compare(a, b) == "better" and rc.compare(b, a) == "worse" and rc.compare(a, c) == "overlap"
    assert rc.compare(a, dataclasses.replace(b, se={})) == "unknown"
    P = rc.Part
    assert rc.combine([P("1", "confirmed", "x"), P("2", "inconclusive", "intervals overlap")]) == "confirmed"
    assert rc.combine([P("1", "refuted", "x"), P("2", "inconclusive", "y")]) == "refuted"
    assert rc.combine([P("1", "refuted", "x"), P("2", "confirmed", "y")]).startswith("inconclusive (mixed")
    assert rc.combine([]) == "inconclusive (cells missing: every part)"
    assert rc.combine([P("1", "inconclusive", "regime not reached")]) == "inconclusive (regime not reached)"


LARGEST, SMALLEST = "1.31e+05T", "1.6e+04T"


@pytest.mark.parametrize("is_ppl,verdict", [(90, "confirmed"), (110, "refuted"), (100.3, "inconclusive (intervals")])
def test_claim1_is_best_small(is_ppl, verdict):
    configs = [conf("slm-is", is_ppl, g="none", s=LARGEST), conf("slm", 100, s=LARGEST),
               conf("slm-mix", 105, s=LARGEST),
               conf("slm", 50, s=SMALLEST),  # another spec budget: not compared
               conf("llm", 60, s=LARGEST, params=LARGE)]  # not a small model
    assert rc.claim_is_best_small(configs).verdict.startswith(verdict)


def test_claim1_missing():
    configs = [conf("slm-is", 90, g="none", s=SMALLEST), conf("slm", 100, s=LARGEST)]
    assert rc.claim_is_best_small(configs).verdict == "inconclusive (cells missing: slm-is at 1.31e+05T, n=40,000)"


@pytest.mark.parametrize("mix_ppl,slm_g,verdict", [
    (90, (50.0, 40.0), "confirmed"), (110, (50.0, 40.0), "refuted"), (100.3, (50.0, 40.0), "inconclusive (intervals"),
    (90, (40.0, 41.0), "inconclusive (regime not reached)")])
def test_claim2_experts_beat_slm(mix_ppl, slm_g, verdict):
    configs = [conf("slm", 100, g="1e+06T", gppl=slm_g[0]), conf("slm", 100, g="8e+06T", gppl=slm_g[1]),
               conf("slm-mix", mix_ppl, g="8e+06T", gppl=35.0), conf("slm", 60, g="8e+06T", s=LARGEST, gppl=slm_g[1]),
               conf("slm-mix", 200, g="8e+06T", s=LARGEST, gppl=35.0)]  # the larger spec budget does not count
    claim = rc.claim_experts_beat_slm(configs)
    assert claim.verdict.startswith(verdict)
    if "regime" in verdict:
        assert claim.parts[0].raw == "confirmed"


def test_decision_gate():
    base = [conf("slm", 100, g="1e+06T", gppl=50.0), conf("slm", 100, g="8e+06T", gppl=40.0)]
    assert rc.decision_gate(base + [conf("slm-mix", 90, gppl=35.0), conf("slm-pn", 90, gppl=45.0)]).passed == \
        {"slm-mix": True, "slm-pn": False}
    assert rc.decision_gate(base[1:] + [conf("slm-mix", 90, gppl=35.0)]).passed == {"slm-mix": None}
    flat = [conf("slm", 100, g="1e+06T", gppl=40.0), conf("slm", 100, g="8e+06T", gppl=40.0),
            conf("slm-mix", 90, gppl=35.0)]
    gate = rc.decision_gate(flat)
    assert gate.passed == {"slm-mix": False} and gate.falls is False


@pytest.mark.parametrize("d_ppl,alts,verdict", [
    (100, [("slm", 90, (10.0, 2.0))], "confirmed"),
    (80, [("slm", 90, (10.0, 2.0)), ("llm", 95, (50.0, 8.0))], "refuted"),
    (100, [("slm", 100.3, (10.0, 2.0))], "inconclusive (intervals overlap)"),
    (100, [("slm", 50, (1e6, 1e6))], "inconclusive (cells missing"),  # nothing as cheap
])
def test_claim3_distillation(d_ppl, alts, verdict):
    configs = [conf("slm-d", d_ppl, cost=(100.0, 10.0))]
    configs += [conf(s, p, cost=c, params=LARGE if s == "llm" else SMALL) for s, p, c in alts]
    assert rc.claim_distillation_loses(configs).verdict.startswith(verdict)


@pytest.mark.parametrize("slm,verdict", [
    (conf("slm", 100.2, cost=(100.0, 1.0)), "confirmed"),  # 101 > 10 at N=1, 3 < 10 at N=50
    (conf("slm", 100.2, cost=(1000.0, 1.0)), "refuted"),  # still 21 > 10 at N=50
    (conf("slm", 150, cost=(100.0, 1.0)), "refuted"),  # does not reach slm-is's ppl
    (conf("slm", 100.2, cost=(1.0, 1.0)), "inconclusive (slm-is is not the cheapest"),  # cheaper already at N=1
])
def test_claim4_is_loses_with_n(slm, verdict):
    configs = [conf("slm-is", 100, g="none", cost=(0.0, 10.0)), slm]
    assert rc.claim_is_loses_with_n(configs).verdict.startswith(verdict)


SIX = ("d1", "d2", "d3", "d4", "d5", "d6")


def _entropy_set(gains, slm_g=(50.0, 40.0)):
    ent = dict(zip(SIX, (0.1, 0.5, 0.9, 1.3, 1.7, 2.1)))
    slm = {d: 100.0 for d in SIX}
    mix = {d: 100.0 * (1 - g) for d, g in zip(SIX, gains)}
    return [conf("slm", slm, g="1e+06T", gppl=slm_g[0]), conf("slm", slm, g="8e+06T", gppl=slm_g[1]),
            conf("slm-mix", mix, g="8e+06T", gppl=35.0, entropy=ent)]


@pytest.mark.parametrize("gains,slm_g,verdict", [
    ((0.30, 0.25, 0.20, 0.15, 0.10, 0.05), (50.0, 40.0), "confirmed"),
    ((0.05, 0.10, 0.15, 0.20, 0.25, 0.30), (50.0, 40.0), "refuted"),
    ((0.10, 0.30, 0.05, 0.25, 0.15, 0.20), (50.0, 40.0), "inconclusive (rank correlation not significant"),
    ((0.30, 0.25, 0.20, 0.15, 0.10, 0.05), (40.0, 41.0), "inconclusive (regime not reached)"),
])
def test_claim5_entropy(gains, slm_g, verdict):
    configs = _entropy_set(gains, slm_g)
    assert rc.claim_entropy(configs).verdict.startswith(verdict)


def test_spearman_exact_p():
    assert rc.spearman_p([1, 2, 3], [3, 2, 1]) == pytest.approx(1 / 3)  # scipy's t approximation says 0
    assert rc.spearman_p(list(range(6)), list(range(6))) == pytest.approx(2 / 720)
    assert rc.spearman_critical(6) == pytest.approx(0.8857, abs=1e-4) and rc.spearman_critical(4) is None


@pytest.mark.parametrize("nopt,verdict", [(200, "confirmed"), (50, "refuted"), (100.3, "inconclusive (intervals")])
def test_claim6_pretraining_helps(nopt, verdict):
    configs = [conf("slm", 100), conf("slm", 300, g="1e+06T"), conf("slm-nopt", nopt, g="none"),
               conf("slm", 10, n=250_000), conf("slm-nopt", 5, g="none", n=250_000)]  # a larger in-domain size
    claim = rc.claim_pretraining_helps(configs)
    assert claim.verdict.startswith(verdict)
    assert all("n=40,000" in p.name for p in claim.parts)


def test_claim6_missing():
    assert rc.claim_pretraining_helps([conf("slm", 100)]).verdict.startswith("inconclusive (cells missing: slm-nopt")


def test_page_renders_synthetic_rows(tmp_path):
    """The page from a small synthetic CSV: every claim section is there, and the header names
    the command and the CSV."""
    rows = []
    for c in [conf("slm", 100, gppl=40.0), conf("slm-is", 90, g="none"), conf("slm-nopt", 150, g="none")]:
        for d in DOMAINS:
            rows.append({col: None for col in results.COLUMNS} | {
                "run_id": f"{c.strategy}-{d}", "strategy": c.strategy, "domain": d, "generic_budget": c.generic_budget,
                "spec_budget": c.spec_budget, "in_domain_tokens": c.in_domain, "settings": "", "ppl": c.ppl[d],
                "test_nll": c.nll[d], "test_nll_se": 0.01, "params": float(c.params), "inference_flops_per_token": 2e6,
                "generic_flops": 0.0, "spec_flops": 1e12, "generic_ppl": c.generic_ppl})
    path = results.write_csv(rows, tmp_path / "runs.csv")
    page = results_page.render_page(results.read_csv(path), _cfg(STUDY), csv_label="x/runs.csv",
                                    config_label="configs/study.yaml")
    assert "`python scripts/results.py -c configs/study.yaml --from-csv x/runs.csv`" in page.split("\n")[2]
    for k in range(1, 7):
        assert f"### Claim {k}:" in page
    assert "| 6 | Generic pretraining" in page and "**confirmed**" in page
