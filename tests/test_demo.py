"""`make demo` end to end on the tiny recipe: corpus -> tokenizer -> sweep (Ray Tune, MLflow)
-> report -> recommendation, and a rerun that trains nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from slmfactory.demo import run_demo


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_demo_runs_the_platform_and_a_rerun_trains_nothing(tiny_cfg):
    cfg = tiny_cfg.replace(**{"tracking.enabled": True, "sweep.strategies": ["slm", "slm-is"],
                              "sweep.domains": ["legal", "religion"]})
    lines: list[str] = []
    out = run_demo(cfg, log=lines.append)
    text = "\n".join(lines)
    assert "Recommendation (from the measured frontier):" in text and "| slm |" in text
    assert "plots and tables:" in text and "slmfactory ui" in text
    report = out["report"]
    assert {p.name for p in report["files"]} >= {"amortisation_n20000_flops.png", "report.md",
                                                 "ppl_vs_cost_n20000_N7_flops.png", "figure1_n20000_N50_flops.png"}
    assert all(p.is_file() for p in report["files"])
    records = out["outcome"].records
    assert len(records) == 4
    # Every specialised model is a plain HF folder with its cost record.
    rec = next(r for r in records.values() if r.tags["strategy"] == "slm")
    model = AutoModelForCausalLM.from_pretrained(rec.model_path)
    assert model.num_parameters() == rec.metrics["params"]
    meta = json.loads((Path(rec.model_path) / "slmfactory.json").read_text())
    assert meta["spec_cost"]["flops"] > 0 and meta["generic_cost"]["flops"] > 0

    markers = {p: p.stat().st_mtime_ns for p in (cfg.root / "train").glob("*/stage.json")}
    # One shared generic phase, slm-is's per-domain pretraining on resampled data (its Ray
    # Data resampling ran on the driver, never inside a Tune slot), four fine-tunes.
    assert len(markers) == 7
    lines.clear()
    run_demo(cfg, log=lines.append)
    assert any("reusing generic phase" in l for l in lines)
    # Nothing trained again: the same seven finished training stages, untouched.
    assert {p: p.stat().st_mtime_ns for p in (cfg.root / "train").glob("*/stage.json")} == markers
