"""Which model serves which domain: from a folder of exported models, from a sweep's
MLflow records (the best model under an inference-size cap), or from the model registry's
aliases (``models:/<experiment>-<domain>@champion``), plus what ``model: "auto"`` routes by
(the generic centroids and each domain's in-domain cluster histogram).

The application builder only looks up *which* model serves each domain (``Entry.source``:
a folder, an MLflow run or a registry alias); each replica resolves and downloads its
models itself (``resolve``), into a per-node cache (``cache_root``): the builder's
filesystem is never assumed to be the replica's (on a RayService the head builds the app
and the replicas run on worker pods)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from slmfactory.data.clustering import load_clusters
from slmfactory.platform.cost import SERVING_TASKS, ServingRates
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
    source: dict = field(default_factory=dict)
    """What a replica resolves into a local folder (``resolve``): ``{"kind": "folder",
    "path"}``, ``{"kind": "run", "tracking_uri", "run_id", "artifact"}`` or ``{"kind":
    "registry", "tracking_uri", "name", "alias"}``; empty: ``path`` is a folder."""
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
            folder = str(meta_path.parent.resolve())
            e = Entry(meta["domain"], folder, meta.get("strategy", "?"), int(meta["params"]),
                      float(meta["test_ppl"]), source={"kind": "folder", "path": folder},
                      serving_rates=ServingRates.of(meta.get("serving_rates")))
        except (ValueError, KeyError, TypeError):
            continue  # not a model folder this version wrote
        if e.params <= max_params and (e.domain not in best or e.test_ppl < best[e.domain].test_ppl):
            best[e.domain] = e
    if not best:
        raise DataError(f"--models {models_dir}: no exported model folder (with slmfactory.json)"
                        + (f" of at most {max_params:.3g} parameters" if math.isfinite(max_params) else ""))
    return best


def run_serving_rates(run) -> ServingRates | None:
    """The serving rates a trial's MLflow run carries (its exported model's, measured at
    export: ``serving/<task>_tokens_per_s`` and the ``serving_machine`` tag); None: unmeasured."""
    m, machine = run.data.metrics, run.data.tags.get(R.SERVING_MACHINE)
    return ServingRates.of({f"{task}_tokens_per_s": m.get(R.serving_rate_metric(task)) for task in SERVING_TASKS}
                           | {"machine": {"cpu": machine} if machine else {}})


def from_mlflow(uri: str, experiment: str, max_params: float = math.inf) -> dict[str, Entry]:
    """The best model of each domain that a sweep logged to ``experiment``: its run's
    ``model`` artifact, which each replica downloads (``resolve``); nothing is downloaded
    here (``path`` is the run id)."""
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
            best[d] = Entry(d, r.info.run_id, t[R.STRATEGY], int(m[R.PARAMS]), ppl, serving_rates=run_serving_rates(r))
    if not best:
        raise DataError(f"--from-mlflow {experiment!r}: no finished trial"
                        + (f" of at most {max_params:.3g} parameters" if math.isfinite(max_params) else ""))
    return {d: Entry(d, e.path, e.strategy, e.params, e.test_ppl, uri=f"runs:/{e.path}/model",
                     source={"kind": "run", "tracking_uri": uri, "run_id": e.path, "artifact": "model"},
                     serving_rates=e.serving_rates)
            for d, e in best.items()}


def registry_sources(uri: str, experiment: str, alias: str = "champion") -> dict[str, Entry]:
    """Every domain whose registered model ``<experiment>-<domain>`` has ``alias``: what the
    alias names now (its run's strategy, size and perplexity), and the source a replica
    follows (``{"kind": "registry", ...}``: the alias, re-resolved by the replica, never
    the version it names now). Nothing is downloaded here."""
    from mlflow.exceptions import MlflowException

    client = client_for(uri)
    prefix = f"{experiment}-"
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
        out[d] = Entry(d, "", t.get(R.STRATEGY, "?"), int(m.get(R.PARAMS, 0)),
                       float(m.get(R.ppl_metric(d), math.nan)), uri=f"models:/{rm.name}@{alias}",
                       source={"kind": "registry", "tracking_uri": uri, "name": rm.name, "alias": alias},
                       serving_rates=run_serving_rates(run))
    if not out:
        raise DataError(f"from_registry {alias!r}: no registered model {prefix}<domain> has the alias {alias!r} at "
                        f"{uri} (a finished `slmfactory sweep` sets them)")
    return out


CACHE_ENV = "SLMFACTORY_MODEL_CACHE"


def cache_root(configured: str | None = None) -> Path:
    """The folder a replica downloads its models into: ``configured`` (``build_app``'s
    ``model_cache``), else ``$SLMFACTORY_MODEL_CACHE`` where the replica runs, else
    ``<temp dir>/slmfactory-models``: node-local, shared by the replicas of one node."""
    return Path(configured or os.environ.get(CACHE_ENV) or Path(tempfile.gettempdir()) / "slmfactory-models")


@dataclass(frozen=True)
class Resolved:
    """A source resolved by a replica: the folder to load, and which version it is
    (``""`` for a folder; the run id; the registry version number)."""
    path: str
    version: str
    label: str
    """What a response names as the model it came from (``models:/NAME/VERSION``,
    ``runs:/ID/model``, ``""`` for a folder)."""
    meta: dict = field(default_factory=dict)
    """The version's ``strategy``, ``params`` and ``test_ppl`` when the registry named a
    new one (what ``/v1/models`` shows), else empty."""


def registry_version(source: dict):
    """The registry's model version ``source``'s alias names now (MLflow's ``ModelVersion``)."""
    return client_for(source["tracking_uri"]).get_model_version_by_alias(source["name"], source["alias"])


def resolve(source: dict, cache: Path, version=None) -> Resolved:
    """``source`` (an ``Entry.source``) as a local folder, downloaded into ``cache`` if it
    is not a folder already (``cached_download``). ``version``: the registry version the
    caller already looked up (``registry_version``), else it is looked up here."""
    kind = source.get("kind")
    if kind == "folder":
        return Resolved(source["path"], "", "")
    client = client_for(source["tracking_uri"])
    if kind == "run":
        run_id, artifact = source["run_id"], source.get("artifact", "model")
        path = cached_download(Path(cache) / "runs" / run_id,
                               lambda tmp: Path(client.download_artifacts(run_id, artifact, str(tmp))))
        return Resolved(str(path), run_id, f"runs:/{run_id}/{artifact}")
    if kind != "registry":
        raise ValueError(f"unknown model source {source!r}")
    mv = version if version is not None else registry_version(source)

    def fetch(tmp: Path) -> Path:
        # The version's source fetched through this client (its registry is this tracking
        # store): a run's artifact (what sweeps register) or any other artifact URI.
        if mv.source.startswith("runs:/"):
            run_id, _, path = mv.source[len("runs:/"):].partition("/")
            return Path(client.download_artifacts(run_id, path, str(tmp)))
        import mlflow.artifacts  # lazy: mlflow's artifact resolvers only for a non-run source

        return Path(mlflow.artifacts.download_artifacts(artifact_uri=mv.source, dst_path=str(tmp),
                                                        tracking_uri=source["tracking_uri"]))
    path = cached_download(Path(cache) / "registry" / source["name"] / str(mv.version), fetch)
    meta = {}
    try:
        run = client.get_run(mv.run_id)
        t, m = run.data.tags, run.data.metrics
        d = t.get(R.DOMAIN, "")
        rates = run_serving_rates(run)
        meta = {"strategy": t.get(R.STRATEGY, "?"), "params": int(m.get(R.PARAMS, 0)),
                "test_ppl": float(m.get(R.ppl_metric(d), math.nan)),
                "serving_rates": rates.to_dict() if rates is not None else None}
    except Exception:  # noqa: BLE001  (the version has no run here: served, described as before)
        meta = {}
    return Resolved(str(path), str(mv.version), f"models:/{source['name']}/{mv.version}", meta)


def cached_download(target: Path, fetch) -> Path:
    """``target``, downloaded by ``fetch(staging_folder) -> folder`` if it is not there:
    into a staging folder beside it (same filesystem), then renamed into place in one
    step, so a reader sees no folder or a complete one. What a target names never changes
    (a run's artifact, a registry version), so a folder there is complete and kept.
    Concurrent replicas of one node take a file lock beside it and download once; where
    the lock does not hold (a filesystem without ``flock``), the first rename wins and the
    other download is dropped. A killed download leaves only its hidden staging folder."""
    target = Path(target)
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _locked(target.parent / f".{target.name}.lock"):
        if target.is_dir():
            return target
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
        try:
            got = Path(fetch(staging))
            try:
                os.rename(got, target)
            except OSError:
                if not target.is_dir():  # not another replica's rename: a real failure
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


@contextlib.contextmanager
def _locked(path: Path):
    try:
        import fcntl
    except ImportError:  # not POSIX: the rename alone keeps the folder whole
        yield
        return
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX)
        except OSError:  # a filesystem without flock: as above
            pass
        yield


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
