"""What ``serving/app.py`` hands the Serve processes, without starting them: the proxy's
body limit is the recipe's, whatever an earlier app left in the environment."""

from __future__ import annotations

import os
from pathlib import Path

from slmfactory.platform.config import load_config
from slmfactory.serving.api import BODY_LIMIT_ENV
from slmfactory.serving.app import serve_env

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


def _serving(max_request_bytes: int):
    return load_config(TINY, {"serving.max_request_bytes": max_request_bytes}).serving


def test_the_body_limit_is_the_configs_not_an_earlier_apps(monkeypatch):
    monkeypatch.setenv(BODY_LIMIT_ENV, "1048576")  # what an earlier app's build_app left here
    first = serve_env(_serving(4096))
    assert first[BODY_LIMIT_ENV] == "4096"
    for key, value in first.items():  # as build_app does, undone when the test ends
        monkeypatch.setenv(key, value)
    assert serve_env(_serving(262144))[BODY_LIMIT_ENV] == "262144"
    assert first["RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"] == "slmfactory.serving.api:proxy_middlewares"


def test_ray_serves_tuning_knobs_yield_to_the_environment(monkeypatch):
    monkeypatch.setenv("RAY_SERVE_LOG_TO_STDERR", "1")
    monkeypatch.delenv("RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE", raising=False)
    env = serve_env(_serving(4096))
    assert env["RAY_SERVE_LOG_TO_STDERR"] == "1"
    assert env["RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE"] == "1000"


def test_these_tests_leave_the_environment_as_they_found_it(monkeypatch):
    """The variables the tests above set (the body limit, Serve's proxy callback) would
    reach every later test of the session, and the Serve apps those start."""
    import pytest

    for key in serve_env(_serving(4096)):  # whatever an earlier test may have left
        monkeypatch.delenv(key, raising=False)
    before = dict(os.environ)
    for test in (test_the_body_limit_is_the_configs_not_an_earlier_apps,
                 test_ray_serves_tuning_knobs_yield_to_the_environment):
        with pytest.MonkeyPatch.context() as inner:
            test(inner)
        assert dict(os.environ) == before, test.__name__
