"""Which model serves which domain: from a folder of exported models, or from a sweep's
MLflow records (the best model under an inference-size cap), plus what ``model: "auto"``
routes by (the generic centroids and each domain's in-domain cluster histogram)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from slmfactory.platform.errors import DataError


@dataclass(frozen=True)
class Entry:
    domain: str
    path: str
    strategy: str
    params: int
    test_ppl: float


def from_folder(models_dir: Path, max_params: float = math.inf) -> dict[str, Entry]:
    """The best exported model (lowest test perplexity, at most ``max_params`` parameters)
    of each domain under ``models_dir``: every folder holding an ``slmfactory.json`` (what
    ``slmfactory train``, ``sweep`` and ``demo`` write under ``<workdir>/models``)."""
    models_dir = Path(models_dir)
    if not models_dir.is_dir():
        raise DataError(f"--models {models_dir}: not a folder")
    best: dict[str, Entry] = {}
    for meta_path in sorted(models_dir.glob("**/slmfactory.json")):
        try:
            meta = json.loads(meta_path.read_text())
            e = Entry(meta["domain"], str(meta_path.parent.resolve()), meta.get("strategy", "?"),
                      int(meta["params"]), float(meta["test_ppl"]))
        except (ValueError, KeyError, TypeError):
            continue  # not a model folder this version wrote
        if e.params <= max_params and (e.domain not in best or e.test_ppl < best[e.domain].test_ppl):
            best[e.domain] = e
    if not best:
        raise DataError(f"--models {models_dir}: no exported model folder (with slmfactory.json)"
                        + (f" of at most {max_params:.3g} parameters" if math.isfinite(max_params) else ""))
    return best


def from_mlflow(uri: str, experiment: str, max_params: float = math.inf) -> dict[str, Entry]:
    """The best model of each domain that a sweep logged to ``experiment``."""
    from slmfactory.platform.tracking import client_for
    from slmfactory.sweeps.tracking import TRIAL_TAG

    client = client_for(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise DataError(f"--from-mlflow {experiment!r}: no such experiment at {uri}")
    best: dict[str, Entry] = {}
    for r in client.search_runs([exp.experiment_id], filter_string="attributes.status = 'FINISHED'",
                                max_results=50000):
        t, m = r.data.tags, r.data.metrics
        if TRIAL_TAG not in t or "params" not in m or m["params"] > max_params:
            continue
        d = t["domain"]
        ppl = m[f"ppl/{d}"]
        if d not in best or ppl < best[d].test_ppl:
            best[d] = Entry(d, r.info.run_id, t["strategy"], int(m["params"]), ppl)
    if not best:
        raise DataError(f"--from-mlflow {experiment!r}: no finished trial"
                        + (f" of at most {max_params:.3g} parameters" if math.isfinite(max_params) else ""))
    # The model folder is the run's `model` artifact (local for a sqlite store, downloaded otherwise).
    return {d: Entry(d, client.download_artifacts(e.path, "model"), e.strategy, e.params, e.test_ppl)
            for d, e in best.items()}


def router_data(cfg, domains: list[str]) -> dict | None:
    """Centroids and each served domain's cluster histogram, from the run's clustering;
    None when the clustering was never computed (``auto`` then answers 404)."""
    try:
        from slmfactory.platform.clusters import load_clusters

        cl = load_clusters(cfg)
    except DataError:
        return None
    served = [d for d in domains if d in cl.parts]
    if not served:
        return None
    return {"centroids": cl.centroids.tolist(), "histograms": {d: cl.histogram(d).tolist() for d in served},
            "batch_size": cfg.cluster.embed_batch_size}
