"""Shared fixtures: one tiny real-text corpus + tokenizer per test session."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    """A workdir holding the corpus built from the real-text sample shipped in the package and its tokenizer.
    Tests copy it (``tiny_cfg``) so that nothing they write leaks into another test."""
    from slmfactory.platform.config import load_config
    from slmfactory.data.corpus import build_sample_corpus
    from slmfactory.data.tokenizer import ensure_tokenizer

    root = tmp_path_factory.mktemp("tiny-shared")
    cfg = load_config(TINY, {"workdir": str(root)})
    build_sample_corpus(cfg)
    ensure_tokenizer(cfg)
    return root


@pytest.fixture
def tiny_cfg(tiny_root, tmp_path):
    """The tiny recipe on a private copy of the shared corpus + tokenizer."""
    from slmfactory.platform.config import load_config

    work = tmp_path / "work"
    shutil.copytree(tiny_root, work)
    return load_config(TINY, {"workdir": str(work)})
