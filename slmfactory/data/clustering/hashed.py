"""``cluster.embedder: hashed-tfidf``: hashed word n-grams → tf-idf → truncated SVD, the cheap
embedder of the DSIR / c-BTM family, as a Ray Data ``map_batches`` actor pool beside MiniLM's.

Built from scikit-learn, nothing hand-written: ``HashingVectorizer`` (word unigrams and
bigrams hashed into ``N_FEATURES`` buckets, no vocabulary to fit or ship), then
``TfidfTransformer`` (sublinear tf, idf) and ``TruncatedSVD`` (LSA down to 32-256
dimensions, ``fit_dim``), then ``Normalizer`` (unit length, so spherical k-means and the dot-product
nearest centroid of :mod:`slmfactory.data.clustering.clusters` apply unchanged).

Fitted once: the idf statistics and the SVD basis are fitted on a hash-chosen sample of the
*generic* train windows (at most ``FIT_WINDOWS``, the same seed and key as the k-means sample)
inside the generic embedding stage, saved there (``MODEL_FILE``, joblib, sklearn's own
persistence), and every window, generic or in-domain, is embedded by that one fitted model;
the domain embedding stage keys on the generic one so a refit re-embeds the domains.

Cost, counted as FLOPs (``embedding_flops``): per window with f non-zero n-gram features,
tf-idf is ~``TFIDF_FLOPS_PER_FEATURE`` operations per feature (log, idf, the L2 norm), the
projection 2·DIM per feature (a sparse row times the dense basis), the final normalisation
3·DIM; hashing the n-grams is integer work and is not FLOPs (its seconds are in the stage's
measured wall time). The fit (randomized SVD on the sample) is estimated by
``fit_flops``. At 128-token windows this is ~1e5 FLOPs per window against MiniLM's ~1e10.

Reproducibility: the fit is seeded (``cluster.seed``), and a window's vector is a function of
its own text (a sparse row times a fixed matrix), not of the batch it is in.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

N_FEATURES = 2 ** 15
"""Hash buckets of the word n-grams (DSIR uses 10k; collisions cost little after tf-idf + SVD)."""
NGRAMS = (1, 2)
DIM = 256
"""At most this many dimensions after the SVD."""
MIN_DIM = 32
WINDOWS_PER_DIM = 24
"""The SVD keeps one dimension per this many fit windows, within [MIN_DIM, DIM]: k-means on
more dimensions than the sample supports groups noise. Measured as the adjusted mutual
information of 16 clusters with the windows' generic source (2026-12-06, 2-core Xeon): on 769
sample windows 0.46 at 32 dimensions, 0.27 at 256; on 3,000 demo windows 0.45 / 0.46 / 0.43
at 64 / 128 / 256."""
FIT_WINDOWS = 20_000
"""At most this many generic windows fit the idf and the SVD (``cluster.sample_windows`` caps it too)."""
SVD_ITERS = 5
"""Power iterations of the randomized SVD (scikit-learn's default for this rank)."""
TFIDF_FLOPS_PER_FEATURE = 6
"""Per non-zero feature: log(1 + tf) (2), x idf (1), the L2 norm's square, sum and divide (3)."""
MIN_BATCH = 512
"""Windows per actor call at least (the clustering's ``map_batches``): a sparse product is
cheap per window, so small batches would spend the call on its overhead."""
MODEL_FILE = "hashed-tfidf.joblib"
NAME = "hashed-tfidf"


def build(dim: int = DIM, seed: int = 0):
    """The unfitted pipeline: hashing → tf-idf → truncated SVD → unit length."""
    from sklearn.decomposition import TruncatedSVD
    from sklearn.feature_extraction.text import HashingVectorizer, TfidfTransformer
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import Normalizer

    return make_pipeline(
        HashingVectorizer(n_features=N_FEATURES, ngram_range=NGRAMS, alternate_sign=False, norm=None,
                          lowercase=True, dtype=np.float64),
        TfidfTransformer(sublinear_tf=True),
        TruncatedSVD(n_components=dim, algorithm="randomized", n_iter=SVD_ITERS, random_state=seed),
        Normalizer(copy=False))


def fit_dim(windows: int) -> int:
    """Dimensions the SVD keeps for a fit sample of ``windows`` windows."""
    return max(1, min(windows - 1, max(MIN_DIM, min(DIM, windows // WINDOWS_PER_DIM))))


def fit(texts: list[str], seed: int = 0, dim: int | None = None):
    """The pipeline fitted on ``texts`` (the generic sample); the SVD keeps ``dim``
    dimensions (default ``fit_dim(len(texts))``; never more than windows - 1)."""
    if len(texts) < 2:
        from slmfactory.platform.errors import DataError

        raise DataError(f"hashed-tfidf: {len(texts)} generic windows to fit on; need at least 2")
    model = build(max(1, min(dim or fit_dim(len(texts)), len(texts) - 1)), seed)
    model.fit([t or "" for t in texts])
    return model


def save(model, path: Path) -> Path:
    import joblib

    joblib.dump(model, path)
    return path


def load(path: Path):
    import joblib

    return joblib.load(path)


def dim_of(model) -> int:
    return int(model[2].n_components)


def transform(model, texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(N, dim) float32 unit vectors, and per text its n-grams (``tokens``) and its non-zero
    hashed features (what the cost is counted on)."""
    texts = [t or "" for t in texts]
    if not texts:
        return np.zeros((0, dim_of(model)), np.float32), np.zeros(0, np.int64), np.zeros(0, np.int64)
    counts = model[0].transform(texts)                     # sparse (N, N_FEATURES) n-gram counts
    ngrams = np.asarray(counts.sum(axis=1)).ravel().astype(np.int64)
    features = np.diff(counts.indptr).astype(np.int64)
    emb = model[1:].transform(counts)
    return np.ascontiguousarray(emb, dtype=np.float32), ngrams, features


def embedding_flops(windows: int, features: int, dim: int) -> float:
    """FLOPs of embedding ``windows`` windows holding ``features`` non-zero features in all."""
    return float((2 * dim + TFIDF_FLOPS_PER_FEATURE) * features + 3 * dim * windows)


def fit_flops(windows: int, features: int, dim: int) -> float:
    """The randomized SVD's FLOPs on the fit sample, estimated: each of its 2·(iters + 1)
    sparse products is 2·features·(dim + 10) (scikit-learn's 10 oversamples), each of its
    iters + 1 pairs of QR factorisations 2·(windows + N_FEATURES)·(dim + 10)²; plus the
    tf-idf of the sample."""
    r = dim + 10
    return float(2 * (SVD_ITERS + 1) * 2 * features * r + (SVD_ITERS + 1) * 2 * (windows + N_FEATURES) * r * r
                 + TFIDF_FLOPS_PER_FEATURE * features)


def parameters(dim: int) -> int:
    """Stored numbers of the fitted model: the idf (one per bucket) and the SVD basis."""
    return int(N_FEATURES + dim * N_FEATURES)


class HashedTfidfEmbedder:
    """Callable class for ``Dataset.map_batches``: the fitted model loaded once per actor.

    pyarrow Table in (with ``text``), out: without ``text``, plus ``embedding``
    (``fixed_size_list<float32>[dim]``), ``hashed_ngrams`` and ``hashed_features``."""

    def __init__(self, model_path: str):
        self.model = load(Path(model_path))

    def __call__(self, batch):
        import pyarrow as pa

        from slmfactory.data.clustering.minilm import to_arrow

        emb, ngrams, features = transform(self.model, batch.column("text").to_pylist())
        return batch.drop_columns(["text"]).append_column("embedding", to_arrow(emb)) \
            .append_column("hashed_ngrams", pa.array(ngrams.astype(np.int32), pa.int32())) \
            .append_column("hashed_features", pa.array(features.astype(np.int32), pa.int32()))


def embed_dataset(ds, model_path: Path, batch_size: int = 512, actors: int = 1, actor_cpus: float = 0.5):
    """``ds`` (with ``text``) → with ``embedding``: a pool of ``actors`` CPU actors (a sparse
    product has nothing to gain from a GPU) asking ``actor_cpus`` each, like MiniLM's pool."""
    import ray

    return ds.map_batches(HashedTfidfEmbedder, fn_constructor_kwargs={"model_path": str(model_path)},
                          batch_size=batch_size, batch_format="pyarrow",
                          compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=actor_cpus)
