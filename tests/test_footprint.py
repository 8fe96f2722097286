"""The dry-run's peak-memory table (``platform/footprint.py``) describes the embedder the
recipe configures, not always MiniLM."""

from __future__ import annotations

from pathlib import Path

from slmfactory.data.clustering import hashed as embed_hashed
from slmfactory.platform import footprint
from slmfactory.platform.config import load_config
from slmfactory.platform.footprint import stage_memory

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
PARAMS = {"slm": 1e6, "llm": 1e7}


def _rows(embedder: str) -> dict[str, footprint.StageMemory]:
    cfg = load_config(TINY, {"cluster.embedder": embedder})
    return {r.stage: r for r in stage_memory(cfg, PARAMS)}


def test_hashed_tfidf_rows_name_and_size_hashed_tfidf():
    minilm, hashed = _rows("minilm"), _rows("hashed-tfidf")
    assert "embed (per MiniLM actor)" in minilm and not any("hashed" in s for s in minilm)
    assert not any("MiniLM" in s or "MiniLM" in r.basis for s, r in hashed.items())
    actor = hashed["embed (per hashed-tfidf actor)"]
    # Its fitted model (idf + SVD basis, float64) is in it, not MiniLM's 22.7M fp32 weights.
    model = 8.0 * embed_hashed.N_FEATURES + 8.0 * embed_hashed.N_FEATURES * embed_hashed.DIM
    assert actor.bytes > model
    assert actor.bytes - model < minilm["embed (per MiniLM actor)"].bytes - 4 * footprint.MINILM_PARAMS
    assert "fit hashed-tfidf (driver)" in hashed
    # k-means and assignment hold hashed-tfidf's vectors (at most DIM floats), not MiniLM's 384.
    assert f"x {embed_hashed.DIM} floats" in hashed["k-means (driver)"].basis
    assert hashed["k-means (driver)"].bytes < minilm["k-means (driver)"].bytes


def test_hashed_tfidf_constants_match_the_embedder():
    # The platform cannot import the data layer: its copies of the embedder's sizes must agree.
    assert footprint.HASHED_TFIDF == embed_hashed.NAME
    assert footprint.HASHED_FEATURES == embed_hashed.N_FEATURES
    assert footprint.HASHED_MAX_DIM == embed_hashed.DIM
    assert footprint.HASHED_FIT_WINDOWS == embed_hashed.FIT_WINDOWS
    assert footprint.HASHED_MIN_BATCH == embed_hashed.MIN_BATCH
