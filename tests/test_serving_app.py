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


def test_the_chat_template_is_a_validated_recipe_setting_handed_to_the_replica(tmp_path, monkeypatch):
    """``serving.chat_template``: the default renders ``role: content`` lines; a template
    that does not compile, raises or renders nothing is refused naming the key; the one
    set (in the recipe or by ``build_app``'s ``set``) is what the replica is built with."""
    import json

    import pytest

    from slmfactory.platform.config import DEFAULT_CHAT_TEMPLATE, ServingConfig
    from slmfactory.platform.errors import ConfigError
    from slmfactory.serving.app import build_app

    assert ServingConfig().chat_template == DEFAULT_CHAT_TEMPLATE
    for bad in ("{% for m in messages %}{{ m.content }}", "", "{{ raise_exception('no') }}",
                "{% if false %}x{% endif %}", "x" * 5000):
        with pytest.raises(ConfigError, match="serving.chat_template"):
            ServingConfig(chat_template=bad)
    own = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}<assistant>"
    assert load_config(TINY, {"serving.chat_template": own}).serving.chat_template == own
    models = tmp_path / "models" / "legal"
    models.mkdir(parents=True)
    (models / "slmfactory.json").write_text(json.dumps({"domain": "legal", "strategy": "slm", "params": 1,
                                                        "test_ppl": 1.0}))
    for key in serve_env(_serving(4096)):  # build_app sets them in this process: restored after the test
        monkeypatch.delenv(key, raising=False)
    for sets, want in (([], DEFAULT_CHAT_TEMPLATE), ([f"serving.chat_template='{own}'"], own)):
        app = build_app({"config": str(TINY), "set": [f"workdir={tmp_path / 'work'}", *sets],
                         "models": str(tmp_path / "models")})
        assert app._bound_deployment.init_kwargs["chat_template"] == want


def test_auto_routes_by_the_models_scores_within_the_replicas_model_cache(tmp_path, monkeypatch):
    """``serving.auto_route`` and ``serving.route_tokens`` reach the replica; routing by the
    models' scores needs every start-up domain's model in each replica's cache (one auto
    request scores with all of them), so a recipe whose cache is smaller is refused naming
    the setting, unless it routes by the clustering."""
    import json

    import pytest

    from slmfactory.platform.errors import ConfigError
    from slmfactory.serving.app import build_app

    for d in ("legal", "code", "biomedical"):
        (tmp_path / "models" / d).mkdir(parents=True)
        (tmp_path / "models" / d / "slmfactory.json").write_text(json.dumps(
            {"domain": d, "strategy": "slm", "params": 1, "test_ppl": 1.0}))
    for key in serve_env(_serving(4096)):  # build_app sets them in this process: restored after the test
        monkeypatch.delenv(key, raising=False)

    def build(*sets):
        return build_app({"config": str(TINY), "set": [f"workdir={tmp_path / 'work'}", *sets],
                          "models": str(tmp_path / "models")})._bound_deployment

    kwargs = build("serving.route_tokens=64").init_kwargs
    assert (kwargs["auto_route"], kwargs["route_tokens"]) == ("nll", 64)
    with pytest.raises(ConfigError, match=r"serving.max_models_per_replica >= 3"):
        build("serving.max_models_per_replica=2")
    clustered = build("serving.max_models_per_replica=2", "serving.auto_route=cluster")
    assert clustered.init_kwargs["auto_route"] == "cluster"


def test_the_model_source_args_are_checked_and_reach_the_replica_as_sources(tmp_path, monkeypatch):
    """``build_app``'s args (a Serve config's): an unknown one, two model sources, a
    negative or non-numeric ``registry_poll_s``, ``max_params`` with a registry alias are
    refused naming what is wrong; a folder reaches the replica as a source it resolves
    itself, with the cache and the poll period given."""
    import json

    import pytest

    from slmfactory.platform.errors import ConfigError
    from slmfactory.serving.app import build_app

    (tmp_path / "models" / "legal").mkdir(parents=True)
    (tmp_path / "models" / "legal" / "slmfactory.json").write_text(json.dumps(
        {"domain": "legal", "strategy": "slm", "params": 1, "test_ppl": 1.0}))
    for key in serve_env(_serving(4096)):  # build_app sets them in this process: restored after the test
        monkeypatch.delenv(key, raising=False)
    base = {"config": str(TINY), "set": [f"workdir={tmp_path / 'work'}"], "models": str(tmp_path / "models")}
    for extra, match in (({"from_registy": "champion"}, "unknown 'from_registy'"),
                         ({"from_registry": "champion"}, "one model source of .* not models and from_registry"),
                         ({"registry_poll_s": -1}, "registry_poll_s must be a number of seconds >= 0"),
                         ({"registry_poll_s": "often"}, "registry_poll_s must be a number")):
        with pytest.raises(ConfigError, match=match):
            build_app({**base, **extra})
    with pytest.raises(ConfigError, match="max_params does not apply to from_registry"):
        build_app({**{k: v for k, v in base.items() if k != "models"}, "from_registry": "champion",
                   "max_params": 1e8})
    kwargs = build_app({**base, "model_cache": str(tmp_path / "cache"), "registry_poll_s": 5}
                       )._bound_deployment.init_kwargs
    assert (kwargs["model_cache"], kwargs["registry_poll_s"]) == (str(tmp_path / "cache"), 5.0)
    args = build_app(base)._bound_deployment.init_args
    assert args[0]["legal"]["source"] == {"kind": "folder", "path": str((tmp_path / "models" / "legal").resolve())}
