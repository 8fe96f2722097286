"""``slmfactory calibrate``: this machine's training rate at a recipe's own shapes as
device-profile rows that record the machine; the sweep's warning when the recipe's profile
was measured elsewhere (or names no machine); a phase's measured rate against the profile's."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from slmfactory.platform.config import load_config
from slmfactory.platform.cost import TRAIN, CostRecord, Work, projected_tokens_per_s
from slmfactory.platform.errors import ConfigError
from slmfactory.platform.machine import describe, differences, machine_warning, this_machine

from .conftest import REPO, TINY

DEMO = REPO / "configs" / "demo.yaml"
ELSEWHERE = {"cpu": "Intel(R) Xeon(R) Platinum 8488C", "cpu_flags": ["avx2", "avx512f", "avx512_bf16", "amx_tile",
                                                                      "amx_bf16"],
             "bf16_matrix": "amx_bf16", "cores": 2, "gpu": "", "torch": "2.13.0+cpu", "threads": 2}


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "slmfactory.cli", *args], capture_output=True, text=True,
                          timeout=300, cwd=REPO)


def one_line_error(out, *needles):
    assert out.returncode == 2, (out.stdout, out.stderr[-2000:])
    assert "Traceback" not in out.stderr
    lines = [line for line in out.stderr.splitlines() if line.startswith("slmfactory: error:")]
    assert len(lines) == 1, out.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def dry_run(cfg) -> str:
    """The dry run's text for ``cfg`` (no corpus needed, nothing started)."""
    from slmfactory.sweeps.run import run_sweep

    lines: list[str] = []
    cfg = cfg.replace(**{"sweep.strategies": ["slm", "llm"], "sweep.domains": ["legal"]})
    assert run_sweep(cfg, dry_run=True, log=lines.append, recipe="configs/tiny.yaml") is None
    return "\n".join(lines)


def profile_file(tmp_path, machine: dict, name: str = "profile.json"):
    path = tmp_path / name
    path.write_text(json.dumps([{"params": 164160.0, "train_tokens_per_s": 20000.0, "source": "elsewhere",
                                 "machine": machine}]))
    return path


def test_calibrate_writes_rows_the_recipe_loads_and_the_dry_run_prices_with(tmp_path):
    from slmfactory.models.train.calibration import calibrate, write_profile
    from slmfactory.models.train.phases import lm_flops_per_token

    cfg = load_config(TINY, {"workdir": str(tmp_path / "work")})
    measured = calibrate(cfg, steps=2, log=None)
    # tiny's slm and llm: two shapes, each on the path auto takes for its 40-step pretraining (eager, fp32).
    assert [m.model for m in measured] == ["slm", "llm"]
    for m in measured:
        assert m.tokens_per_s > 0 and len(m.rounds) == 2 and m.plan == "fp32, eager"
        fpt, _, params = lm_flops_per_token(cfg, m.model)
        assert m.compute_params == params
        assert m.projected_tokens_per_s == pytest.approx(projected_tokens_per_s(cfg.device, params, fpt))
        assert m.ratio == pytest.approx(m.tokens_per_s / m.projected_tokens_per_s)
    path = write_profile(measured, tmp_path / "out" / "cpu.json")
    rows = json.loads(path.read_text())
    here = this_machine()
    for row, m in zip(rows, measured):
        assert row["params"] == m.compute_params and row["train_tokens_per_s"] == round(m.tokens_per_s, 1)
        machine = row["machine"]
        assert {machine[k] for k in ("cpu", "bf16_matrix", "cores", "gpu", "torch")} == \
            {here[k] for k in ("cpu", "bf16_matrix", "cores", "gpu", "torch")}
        assert set(machine["cpu_flags"]) <= {"avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16"}
        assert machine["threads"] >= 1 and "recipe tiny" in row["source"]
    # The file is a device profile: loaded, priced with alone, and what the dry run prints.
    calibrated = load_config(TINY, {"workdir": str(tmp_path / "work"), "device.throughput_file": str(path),
                                    "device.throughput": []})
    assert [r.train_tokens_per_s for r in calibrated.device.rows()] == [row["train_tokens_per_s"] for row in rows]
    assert calibrated.device.rows()[0].machine == rows[0]["machine"]
    assert projected_tokens_per_s(calibrated.device, measured[0].compute_params, 1.0) == \
        pytest.approx(rows[0]["train_tokens_per_s"])
    text = dry_run(calibrated)
    assert f"0.164M: {rows[0]['train_tokens_per_s']:,.0f} tok/s" in text, text[:600]
    assert f"0.59M: {rows[1]['train_tokens_per_s']:,.0f} tok/s" in text
    assert machine_warning(calibrated.device, here) is None and "warning" not in text


def test_the_sweep_warns_when_the_profile_was_measured_on_another_machine(tmp_path):
    here = this_machine()
    cfg = load_config(TINY, {"workdir": str(tmp_path), "device.throughput_file": str(profile_file(tmp_path, ELSEWHERE))})
    text = dry_run(cfg)
    (line,) = [line for line in text.splitlines() if line.startswith("warning:")]
    assert "device profile 'cpu-2core' was measured on another machine (Intel(R) Xeon(R) Platinum 8488C" in line
    assert f"not this one ({describe(here)}" in line
    assert "`slmfactory calibrate -c configs/tiny.yaml`" in line
    # The same CPU model with other matrix units, or cores, is another machine too.
    if here["cpu"] != ELSEWHERE["cpu"]:
        assert "cpu" in differences(ELSEWHERE, here)
    assert differences({**here, "cores": here["cores"] + 6}, here) == ["cores"]
    assert differences({**here, "bf16_matrix": "none"}, here) == ["bf16_matrix"]
    assert differences({**here, "gpu": "NVIDIA H100 80GB HBM3"}, here) == ["gpu"]
    assert differences(here, {**here, "gpu": "NVIDIA H100 80GB HBM3"}) == ["gpu"]
    assert differences({**here, "threads": 7, "torch": "2.0", "measured": "yesterday"}, here) == []
    # A profile measured here: no warning.
    same = load_config(TINY, {"workdir": str(tmp_path),
                              "device.throughput_file": str(profile_file(tmp_path, here, "here.json"))})
    assert machine_warning(same.device, here) is None
    assert "warning" not in dry_run(same)


def test_rows_that_name_no_machine_warn_with_what_their_source_says():
    here = this_machine()
    text = machine_warning(load_config(DEMO).device, here, "configs/demo.yaml")
    assert text.startswith("device profile 'cpu-2core' names no machine for 3 of its 3 rows (measured on, per their "
                           "source: \"bench/cpu_step.py 2026-12-06, 2-core Xeon")
    assert f"this machine is {describe(here)}" in text and "`slmfactory calibrate -c configs/demo.yaml`" in text
    # No measured rows at all (tiny): nominal, so measured on no machine.
    nominal = machine_warning(load_config(TINY).device, here)
    assert "has no measured rows (nominal: peak 2.15e+11 FLOP/s at MFU 0.6)" in nominal


def test_a_phase_rate_against_the_profile():
    from slmfactory.sweeps.run import rate_line

    cfg = load_config(TINY, {"device.throughput": [{"params": 1e6, "train_tokens_per_s": 20000.0}]})
    # 1M tokens of a 1M-parameter model: the profile says 50 s; it took 200 s (4x slower).
    cost = CostRecord.of("pretrain/slm", Work(TRAIN, 1_000_000, 6e12, 1e6, steps=100), 200.0, cfg.device)
    line = rate_line("slm@1e+06T", cost, cfg, "configs/x.yaml")
    assert line.startswith("[sweep] generic phase slm@1e+06T trained at 5,000 tokens/s (1.00M parameters, 200 s of "
                           "wall time) where device profile cpu-2core projects 20,000 (50 s): measured / profile 0.25x")
    assert "`slmfactory calibrate -c configs/x.yaml`" in line
    close = CostRecord.of("pretrain/slm", Work(TRAIN, 1_000_000, 6e12, 1e6, steps=100), 45.0, cfg.device)
    assert "1.11x" in rate_line("slm@1e+06T", close, cfg) and "calibrate" not in rate_line("slm@1e+06T", close, cfg)


def test_bad_input_names_the_field(tmp_path):
    one_line_error(run_cli("calibrate", "-c", str(TINY), "--steps", "0"), "--steps 0", "positive integer")
    one_line_error(run_cli("calibrate", "-c", str(TINY), "--steps", "many"), "--steps 'many'")
    one_line_error(run_cli("calibrate", "-c", str(TINY), "--out", str(tmp_path)), f"--out {tmp_path}", "a folder")
    one_line_error(run_cli("calibrate", "-c", str(TINY), "--set", "device.throughput_file=/nonexistent.json"),
                   "device.throughput_file: /nonexistent.json is not a file")
    bad = profile_file(tmp_path, {"cpu": {"model": "x"}}, "bad.json")
    with pytest.raises(ConfigError, match=r"device\.throughput_file\[0\]\.machine\.cpu: expected a string"):
        load_config(TINY, {"device.throughput_file": str(bad)}).device.rows()
    with pytest.raises(ConfigError, match=r"device\.throughput\[0\]\.machine: expected a mapping"):
        load_config(TINY, {"device.throughput": [{"params": 1, "train_tokens_per_s": 1, "machine": "here"}]})
    with pytest.raises(ConfigError, match=r"^sweep\.max_failures: expected >= -1"):
        load_config(TINY, {"sweep.max_failures": -2})
    assert load_config(TINY).sweep.max_failures == 1
