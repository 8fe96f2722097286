"""Clustering: windows of text embedded (MiniLM, or hashed tf-idf), k-means on the generic
windows, every window assigned, and importance resampling of the generic corpus toward a
domain's cluster histogram (Ray Data does the embedding and resampling).

- ``minilm.py`` and ``hashed.py``: the two embedders;
- ``clusters.py``: centroids, assignments, histograms (what serving reads: no Ray Data);
- ``pipeline.py``: the Ray Data pipeline that embeds and clusters (``run_clustering``), its
  stages 1-2 (windows, embeddings) in ``windows.py``, the plumbing they share in ``raydata.py``;
- ``resampling.py``: the importance-resampled generic token stream (``resample``).
"""

from slmfactory.platform.exports import lazy_exports

EXPORTS = {
    "clusters": ("load_clusters", "nearest_centroid"),
    "minilm": ("encode", "load_minilm"),
    "pipeline": ("run_clustering",),
    "resampling": ("resample", "share_metrics", "stream_path"),
}
MODULES = ("hashed",)
__all__, __getattr__ = lazy_exports(__name__, EXPORTS, MODULES)
