"""``serve --from-registry``'s download (``catalog.from_registry``) on a real MLflow store:
each domain's champion lands in its own folder, and a newer champion replaces that folder
whole, leaving nothing else behind."""

from __future__ import annotations

from pathlib import Path

from slmfactory.platform.tracking import MlflowTracker, client_for, register_model
from slmfactory.serving.catalog import from_folder, from_registry

EXPERIMENT = "catalog-test"


def _champion(uri: str, tmp_path: Path, domain: str, weights: str) -> None:
    """A run holding a model folder, registered as a new version and made the champion."""
    folder = tmp_path / f"export-{weights}"
    folder.mkdir()
    (folder / "weights.txt").write_text(weights)
    (folder / "slmfactory.json").write_text(f'{{"domain": "{domain}", "params": 1, "test_ppl": 2.0}}')
    tracker = MlflowTracker(uri, EXPERIMENT, weights, {"domain": domain, "strategy": "slm"})
    tracker.log_metrics({"params": 1, f"ppl/{domain}": 2.0})
    tracker.log_artifact(folder, "model")
    register_model(tracker, f"{EXPERIMENT}-{domain}", "model")
    tracker.close()
    client = client_for(uri)
    name = f"{EXPERIMENT}-{domain}"
    latest = max(int(v.version) for v in client.search_model_versions(f"name = '{name}'"))
    client.set_registered_model_alias(name, "champion", str(latest))


def test_a_new_champion_replaces_the_downloaded_folder_whole(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"
    dest = tmp_path / "registry" / "champion"
    _champion(uri, tmp_path, "legal", "first")
    served = from_registry(uri, EXPERIMENT, dest)
    assert (Path(served["legal"].path) / "weights.txt").read_text() == "first"
    (Path(served["legal"].path) / "stale.txt").write_text("from the old version")
    _champion(uri, tmp_path, "legal", "second")
    served = from_registry(uri, EXPERIMENT, dest)
    folder = Path(served["legal"].path)
    assert folder == dest / "legal" and "(version 2)" in served["legal"].uri
    assert sorted(p.name for p in folder.iterdir()) == ["slmfactory.json", "weights.txt"]
    assert (folder / "weights.txt").read_text() == "second"
    assert [p.name for p in dest.iterdir()] == ["legal"]  # no download or old folder left beside it
    assert set(from_folder(dest)) == {"legal"}


def test_a_killed_download_or_swap_leaves_nothing_that_is_served(tmp_path):
    """A kill mid-download leaves ``from_registry``'s staging folder (``.legal-XXXX/``)
    and one between a swap's renames the replaced folder (``.legal.PID-hex.old/``) under
    the models folder. Neither is served, even holding a model that scores better: one is
    half-downloaded, the other the version the registry's champion replaced."""
    import tempfile

    from slmfactory.platform.stages import _beside

    uri = f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"
    dest = tmp_path / "registry" / "champion"
    _champion(uri, tmp_path, "legal", "first")
    from_registry(uri, EXPERIMENT, dest)
    downloading = Path(tempfile.mkdtemp(dir=dest, prefix=".legal-")) / "model"
    replaced = _beside(dest / "legal", "old")
    for folder, ppl in ((downloading, 1.5), (replaced, 1.2)):
        folder.mkdir(parents=True)
        (folder / "weights.txt").write_text("left over")
        (folder / "slmfactory.json").write_text(f'{{"domain": "legal", "params": 1, "test_ppl": {ppl}}}')
    served = from_folder(dest)
    assert served["legal"].path == str((dest / "legal").resolve()) and served["legal"].test_ppl == 2.0
    # Below a hidden folder the models folder itself lives in (a home's dot folder), models are found.
    hidden_home = tmp_path / ".slmfactory" / "models"
    hidden_home.mkdir(parents=True)
    (hidden_home / "legal").mkdir()
    (hidden_home / "legal" / "slmfactory.json").write_text('{"domain": "legal", "params": 1, "test_ppl": 3.0}')
    assert from_folder(hidden_home)["legal"].test_ppl == 3.0


def test_a_replica_resolves_the_alias_it_follows_into_one_cached_folder_per_version(tmp_path):
    """``registry_sources`` (what the builder looks up) names the alias, not a version, and
    downloads nothing; ``resolve`` (what each replica runs) downloads the version the alias
    names now into the cache, once, and a moved alias into a folder of its own."""
    from slmfactory.serving.catalog import registry_sources, registry_version, resolve

    uri = f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"
    cache = tmp_path / "cache"
    _champion(uri, tmp_path, "legal", "first")
    (entry,) = registry_sources(uri, EXPERIMENT).values()
    assert entry.source == {"kind": "registry", "tracking_uri": uri, "name": f"{EXPERIMENT}-legal",
                            "alias": "champion"}
    assert entry.uri == f"models:/{EXPERIMENT}-legal@champion" and not cache.exists()
    first = resolve(entry.source, cache)
    assert (first.version, first.label) == ("1", f"models:/{EXPERIMENT}-legal/1")
    assert (Path(first.path) / "weights.txt").read_text() == "first"
    assert resolve(entry.source, cache) == first  # cached: the same folder
    _champion(uri, tmp_path, "legal", "second")
    mv = registry_version(entry.source)
    second = resolve(entry.source, cache, mv)
    assert second.version == "2" and (Path(second.path) / "weights.txt").read_text() == "second"
    assert (Path(first.path) / "weights.txt").read_text() == "first"  # the old version is left as it was
    assert sorted(p.name for p in (cache / "registry" / f"{EXPERIMENT}-legal").iterdir()) == [".1.lock", ".2.lock",
                                                                                           "1", "2"]


def test_concurrent_downloads_of_one_model_fetch_it_once_and_a_failed_one_leaves_nothing(tmp_path):
    """Replicas of one node asking for the same model at once: one downloads, the others
    wait and get the complete folder. A download that fails (a killed server, a full disk)
    leaves no folder a replica would take for the model, and the next try downloads it."""
    import threading

    from slmfactory.serving.catalog import cached_download

    target = tmp_path / "cache" / "runs" / "abc"
    fetched, started = [], threading.Barrier(4)

    def fetch(staging: Path) -> Path:
        fetched.append(staging)
        out = staging / "model"
        out.mkdir()
        for i in range(50):  # written file by file: a reader of a half-done folder would see some
            (out / f"part-{i}").write_text(str(i))
        return out

    def replica(results: list) -> None:
        started.wait()
        got = cached_download(target, fetch)
        results.append(sorted(p.name for p in got.iterdir()))

    results: list = []
    threads = [threading.Thread(target=replica, args=(results,)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(fetched) == 1 and len(results) == 4
    assert all(r == sorted(f"part-{i}" for i in range(50)) for r in results)
    assert sorted(p.name for p in target.parent.iterdir()) == [".abc.lock", "abc"]

    broken = tmp_path / "cache" / "runs" / "def"

    def dies(staging: Path) -> Path:
        (staging / "model").mkdir()
        (staging / "model" / "half").write_text("x")
        raise ConnectionError("the tracking server went away")

    import pytest

    with pytest.raises(ConnectionError):
        cached_download(broken, dies)
    assert not broken.exists() and sorted(p.name for p in broken.parent.iterdir()) == [".abc.lock", ".def.lock", "abc"]
    assert sorted(p.name for p in cached_download(broken, fetch).iterdir())[:1] == ["part-0"]
