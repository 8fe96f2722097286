"""Shared fixtures: one tiny real-text corpus + tokenizer per test session; and the guard
that keeps `make test-fast` free of Ray: a test that starts Ray in this process without the
`ray` marker fails (markers: pyproject.toml's [tool.pytest.ini_options])."""

from __future__ import annotations

import os
import shutil
import sys
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
    from slmfactory.data.corpus.build import build_sample_corpus
    from slmfactory.data.tokens.tokenizer import ensure_tokenizer

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


# -- no test changes the environment of the next ---------------------------------------------

def _restore_environment(before: dict[str, str]) -> None:
    if dict(os.environ) != before:
        os.environ.clear()
        os.environ.update(before)


@pytest.fixture(autouse=True)
def _environment_per_test():
    """Whatever a test (or ``build_app`` in it: Serve's settings for a Ray started after it)
    sets in ``os.environ`` is undone after it, so no later test runs under it, in any order.
    Module fixtures set up before it keep theirs until their module ends."""
    before = dict(os.environ)
    yield
    _restore_environment(before)


@pytest.fixture(autouse=True, scope="module")
def _environment_per_module():
    before = dict(os.environ)
    yield
    _restore_environment(before)


# -- the `ray` marker, enforced ---------------------------------------------------------------

def _ray_temp_dir() -> str:
    """Where a local Ray instance puts its session folders (Ray's own default, without
    importing Ray: ``$RAY_TMPDIR``, else ``$TMPDIR``, else ``/tmp``; then ``ray``)."""
    return os.path.join(os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp", "ray")


def _ray_sessions_started_here() -> int:
    """Local Ray instances this process has started: Ray names each one's folder
    ``session_<date>_<time>_<pid of the process that started it>``, and the folders stay
    after ``ray.shutdown()`` (one directory listing, no Ray import)."""
    suffix = f"_{os.getpid()}"
    try:
        with os.scandir(_ray_temp_dir()) as entries:
            return sum(1 for e in entries if e.name.startswith("session_") and e.name.endswith(suffix))
    except OSError:
        return 0


def _ray_up() -> bool:
    ray = sys.modules.get("ray")  # never imports Ray: a test that did not import it did not start it
    return ray is not None and ray.is_initialized()


_RAY_BEFORE = pytest.StashKey[tuple[int, bool]]()


def _one_torch_thread() -> None:
    """The tests' models are tiny: split over torch's default threads (one per core) every
    op waits on the others, and on two busy cores a 40-step pretraining took 44 s instead
    of 3 s (the slm-d pulse 150 s instead of 4 s). One intra-op thread in the test process, unless
    ``OMP_NUM_THREADS`` says otherwise; Ray workers and CLI subprocesses choose their own."""
    torch = sys.modules.get("torch")  # imported by the test modules; never imported here
    if torch is not None and "OMP_NUM_THREADS" not in os.environ and torch.get_num_threads() != 1:
        torch.set_num_threads(1)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    _one_torch_thread()
    # Before any fixture of the test is set up: a fixture that starts Ray counts too.
    if item.get_closest_marker("ray") is None:
        item.stash[_RAY_BEFORE] = (_ray_sessions_started_here(), _ray_up())


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    """A test without the `ray` marker fails if its setup or body started a local Ray
    instance (even one shut down again) or left Ray initialised. Ray already up before it
    (a module fixture of marked tests) is not its doing and is left alone."""
    result = yield
    before = item.stash.get(_RAY_BEFORE, None)
    if before is not None:
        sessions, was_up = before
        started = _ray_sessions_started_here() - sessions
        left_up = _ray_up() and not was_up
        if started or left_up:
            what = " and ".join(w for w in (f"started {started} local Ray instance(s)" if started else "",
                                             "left Ray initialised" if left_up else "") if w)
            pytest.fail(f"{item.nodeid} {what} but is not marked `ray`: add @pytest.mark.ray to the test "
                        "(or pytestmark = pytest.mark.ray to its module), so that `make test-fast` "
                        "(-m 'not ray and not server and not slow') leaves it out", pytrace=False)
    return result
