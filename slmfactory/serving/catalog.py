"""Which model serves which domain: from a folder of exported models, or from a sweep's
MLflow records (the best model under an inference-size cap), plus what ``model: "auto"``
routes by (the generic centroids and each domain's in-domain cluster histogram)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from slmfactory.data.clusters import load_clusters
from slmfactory.platform.cost import ServingRates
from slmfactory.platform.errors import DataError
from slmfactory.platform.stages import replace_dir
from slmfactory.platform.tracking import client_for
from slmfactory.trial import TRIAL_TAG, TrialRecord as R


@dataclass(frozen=True)
class Entry:
    domain: str
    path: str
    strategy: str
    params: int
    test_ppl: float
    uri: str = ""
    """Where it came from in the model registry (``models:/NAME@ALIAS``), if it did."""
    serving_rates: ServingRates | None = None
    """Its tokens/s for scoring and generation, measured when it was exported (its
    ``slmfactory.json``'s ``serving_rates``; None: not measured)."""

    def serving_cost(self, price_per_device_hour: float = 0.0) -> dict | None:
        """What ``/v1/models`` shows as ``serving_cost`` (``ServingRates.view``); None: unmeasured."""
        return self.serving_rates.view(price_per_device_hour) if self.serving_rates is not None else None


def serving_rates_in(folder: str | Path) -> ServingRates | None:
    """The measured serving rates an exported model folder's ``slmfactory.json`` holds."""
    try:
        return ServingRates.of(json.loads((Path(folder) / "slmfactory.json").read_text()).get("serving_rates"))
    except (OSError, ValueError, AttributeError):
        return None


def from_folder(models_dir: Path, max_params: float = math.inf) -> dict[str, Entry]:
    """The best exported model (lowest test perplexity, at most ``max_params`` parameters)
    of each domain under ``models_dir``: every folder holding an ``slmfactory.json`` (what
    ``slmfactory train``, ``sweep`` and ``demo`` write under ``<workdir>/models``). Hidden
    folders below ``models_dir`` are not looked in: a killed download or swap leaves its
    staging folder there (``.legal-XXXX/``, ``.legal.PID-hex.old/``), not a model to serve."""
    models_dir = Path(models_dir)
    if not models_dir.is_dir():
        raise DataError(f"--models {models_dir}: not a folder")
    best: dict[str, Entry] = {}
    for meta_path in sorted(models_dir.glob("**/slmfactory.json")):
        if any(part.startswith(".") for part in meta_path.relative_to(models_dir).parts):
            continue
        try:
            meta = json.loads(meta_path.read_text())
            e = Entry(meta["domain"], str(meta_path.parent.resolve()), meta.get("strategy", "?"),
                      int(meta["params"]), float(meta["test_ppl"]),
                      serving_rates=ServingRates.of(meta.get("serving_rates")))
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
    client = client_for(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise DataError(f"--from-mlflow {experiment!r}: no such experiment at {uri}")
    best: dict[str, Entry] = {}
    for r in client.search_runs([exp.experiment_id], filter_string="attributes.status = 'FINISHED'",
                                max_results=50000):
        t, m = r.data.tags, r.data.metrics
        if TRIAL_TAG not in t or R.PARAMS not in m or m[R.PARAMS] > max_params:
            continue
        d = t[R.DOMAIN]
        ppl = m[R.ppl_metric(d)]
        if d not in best or ppl < best[d].test_ppl:
            best[d] = Entry(d, r.info.run_id, t[R.STRATEGY], int(m[R.PARAMS]), ppl)
    if not best:
        raise DataError(f"--from-mlflow {experiment!r}: no finished trial"
                        + (f" of at most {max_params:.3g} parameters" if math.isfinite(max_params) else ""))
    # The model folder is the run's `model` artifact (local for a sqlite store, downloaded otherwise).
    folders = {d: client.download_artifacts(e.path, "model") for d, e in best.items()}
    return {d: Entry(d, folders[d], e.strategy, e.params, e.test_ppl, serving_rates=serving_rates_in(folders[d]))
            for d, e in best.items()}


def from_registry(uri: str, experiment: str, dest: Path, alias: str = "champion") -> dict[str, Entry]:
    """``models:/<experiment>-<domain>@<alias>`` of every domain a sweep registered (the
    aliases ``update_champions`` keeps), each downloaded under ``dest`` (one folder per
    domain, so ``from_folder(dest)`` finds exactly these)."""
    import tempfile

    import mlflow.artifacts  # lazy: mlflow only when a model is downloaded
    from mlflow.exceptions import MlflowException

    client = client_for(uri)
    prefix = f"{experiment}-"
    Path(dest).mkdir(parents=True, exist_ok=True)
    out: dict[str, Entry] = {}
    for rm in client.search_registered_models(max_results=1000):
        if not rm.name.startswith(prefix) or alias not in (rm.aliases or {}):
            continue
        try:
            mv = client.get_model_version_by_alias(rm.name, alias)
            run = client.get_run(mv.run_id)
        except MlflowException:
            continue
        t, m = run.data.tags, run.data.metrics
        d = t.get(R.DOMAIN, rm.name[len(prefix):])
        model_uri = f"models:/{rm.name}@{alias}"
        target = Path(dest) / d
        # Downloaded beside, then swapped in: a half-downloaded folder is never served.
        # The alias resolved through this client (its registry is this tracking store; the
        # global mlflow.artifacts resolver would look at the default store), then the
        # version's source fetched: a run's artifact (what sweeps register) or any URI.
        with tempfile.TemporaryDirectory(dir=dest, prefix=f".{d}-", ignore_cleanup_errors=True) as tmp:
            if mv.source.startswith("runs:/"):
                run_id, _, path = mv.source[len("runs:/"):].partition("/")
                local = Path(client.download_artifacts(run_id, path, tmp))
            else:
                local = Path(mlflow.artifacts.download_artifacts(artifact_uri=mv.source, dst_path=tmp))
            replace_dir(local, target)
        out[d] = Entry(d, str(target), t.get(R.STRATEGY, "?"), int(m.get(R.PARAMS, 0)),
                       float(m.get(R.ppl_metric(d), math.nan)), uri=f"{model_uri} (version {mv.version})",
                       serving_rates=serving_rates_in(target))
    if not out:
        raise DataError(f"--from-registry {alias}: no registered model {prefix}<domain> has the alias {alias!r} at "
                        f"{uri} (a finished `slmfactory sweep` sets them)")
    return out


def router_data(cfg, domains: list[str]) -> dict | None:
    """Centroids and each served domain's cluster histogram, from the run's clustering, with
    its embedder (``embedder``; ``embedder_model``: the fitted hashed-tfidf model's path);
    None when the clustering was never computed (``auto`` then answers 404)."""
    try:
        cl = load_clusters(cfg)
    except DataError:
        return None
    served = [d for d in domains if d in cl.parts]
    if not served:
        return None
    # The embedder travels with the centroids: a replica embeds new text as the clustering did.
    model = cl.embedder_path
    return {"centroids": cl.centroids.tolist(), "histograms": {d: cl.histogram(d).tolist() for d in served},
            "batch_size": cfg.cluster.embed_batch_size, "embedder": cl.embedder,
            "embedder_model": str(model) if model is not None else None}
