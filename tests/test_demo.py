"""The demo pipeline end to end on the tiny recipe: pretrain, fine-tune, report, track."""

from __future__ import annotations

import json

from transformers import AutoModelForCausalLM

from slmfactory.pipeline import run_demo


def test_demo_finetuning_lowers_domain_perplexity(tiny_cfg):
    cfg = tiny_cfg.replace(**{"tracking.enabled": True})
    lines: list[str] = []
    out = run_demo(cfg, log=lines.append)
    rows = out["rows"]
    random_g, random_d = rows["random init"]
    pre_g, pre_d = rows["pretrained SLM"]
    ft_g, ft_d = rows["fine-tuned on legal"]
    assert pre_g < random_g and pre_d < random_d          # generic pretraining helps everywhere
    assert ft_d < pre_d                                   # specialisation helps the domain
    text = "\n".join(lines)
    assert "generic ppl" in text and "cost records:" in text and "FLOPs" in text
    # The specialised model is a plain HF folder with its cost record.
    model = AutoModelForCausalLM.from_pretrained(str(out["model"].path))
    assert model.num_parameters() == out["model"].params
    meta = json.loads((out["model"].path / "slmfactory.json").read_text())
    assert meta["spec_cost"]["flops"] > 0 and meta["generic_cost"]["flops"] > 0
    # MLflow (sqlite) holds the run with the documented metric names.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=cfg.tracking_uri)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    (run,) = client.search_runs([exp.experiment_id])
    assert run.data.metrics["ppl/legal"] == out["model"].metrics["test_ppl"]
    assert run.data.params["strategy.name"] == "slm"
    assert "cost/generic_flops" in run.data.metrics and "cost/inference_flops_per_token" in run.data.metrics


def test_demo_rerun_reuses_the_generic_phase(tiny_cfg):
    lines: list[str] = []
    run_demo(tiny_cfg, log=lines.append)
    lines.clear()
    run_demo(tiny_cfg, log=lines.append)
    assert any("reusing generic phase" in l for l in lines)
