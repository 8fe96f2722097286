"""``make try``: from nothing but the package, a served model answers a completion. The
real command (``slmfactory try --once``) in a subprocess: the sample corpus, one slm trial,
Ray Serve with the trained model and the completion it sends itself through HTTP."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import REPO
from .local_cluster import free_port

pytestmark = [pytest.mark.ray, pytest.mark.server, pytest.mark.slow, pytest.mark.timeout(900)]


def test_try_trains_serves_and_answers_a_completion(tmp_path: Path):
    port = free_port()
    # The recipe as shipped, with a shorter pretraining: what is tested is the path, and
    # every recipe's settings are loaded by the config tests.
    out = subprocess.run([sys.executable, "-m", "slmfactory.cli", "try", "-c", "configs/try.yaml", "--once",
                          "--port", str(port), "--set", f"workdir={tmp_path / 'try'}",
                          "--set", "pretrain.max_tokens=40960"],
                         cwd=REPO, capture_output=True, text=True, timeout=840,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-4000:]
    assert "[try] corpus: the real-text sample shipped in the package" in text
    trained = re.search(r"\[try\] trained slm on legal in \d+s: test perplexity ([0-9.]+); model at (\S+)", text)
    assert trained, text[-4000:]
    assert math.isfinite(float(trained.group(1))) and float(trained.group(1)) > 1
    model = Path(trained.group(2))
    model = model if model.is_absolute() else REPO / model
    assert (model / "model.safetensors").is_file() and (model / "slmfactory.json").is_file()
    answered = re.search(r"answered in \d+s since `make try` began:\n  The court held that the(.*?)\n\[try\] the model",
                         text, re.S)
    assert answered and answered.group(1).strip(), text[-4000:]  # a non-empty completion came back over HTTP
    assert f"curl -s http://127.0.0.1:{port}/v1/completions" in text
