"""Every recipe loads; bad recipes fail with a message naming the key."""

from pathlib import Path

import pytest

from slmfactory.platform.config import RunConfig, from_dict, load_config, parse_overrides
from slmfactory.platform.errors import ConfigError

CONFIGS = sorted(Path(__file__).resolve().parents[1].joinpath("configs").glob("*.yaml"))


def test_recipes_exist():
    assert {p.stem for p in CONFIGS} >= {"tiny", "demo", "paper"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_recipe_loads_and_flattens(path):
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    flat = cfg.to_dict()
    # MLflow params are flat scalars keyed by dotted paths.
    assert flat["pretrain.lr"] == cfg.pretrain.lr
    assert flat["cluster.k"] == cfg.cluster.k
    assert all(not isinstance(v, (dict, list, tuple)) for v in flat.values())
    # Frozen: a run's config cannot drift after it was logged.
    with pytest.raises(Exception):
        cfg.name = "other"  # type: ignore[misc]


def test_paper_recipe_has_the_papers_settings():
    cfg = load_config(CONFIGS[[p.stem for p in CONFIGS].index("paper")])
    assert (cfg.pretrain.lr, cfg.pretrain.grad_clip, cfg.pretrain.warmup_steps) == (1e-4, 5.0, 1000)
    assert cfg.data.seq_len == 1024 and cfg.cluster.k == 1024


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


@pytest.mark.parametrize("text, needle", [
    ("pretrain:\n  lrr: 0.1\n", "pretrain.lrr: unknown key"),
    ("bogus: 1\n", "bogus: unknown key"),
    ("pretrain:\n  batch_size: many\n", "pretrain.batch_size: expected an integer"),
    ("pretrain:\n  batch_size: 0\n", "pretrain.batch_size: expected >= 1"),
    ("corpus:\n  test_fraction: 1.5\n", "corpus.test_fraction"),
    ("strategy:\n  name: gpt5\n", "strategy.name: expected one of"),
    ("cluster:\n  k: 1\n", "cluster.k"),
    ("slm:\n  preset: huge\n", "slm.preset"),
    ("pretrain: [1, 2]\n", "pretrain: expected a mapping"),
    ("tracking:\n  enabled: maybe\n", "tracking.enabled: expected true or false"),
    ("finetune:\n  compile: fast\n", "finetune.compile: expected one of"),
    ("strategy:\n  slm-mixx: {experts: 4}\n", "strategy.slm-mixx: unknown key"),
    ("strategy:\n  slm-mix: {experts: 1}\n", "strategy.slm-mix.experts: expected >= 2"),
    ("strategy:\n  slm-mix: {selection: best}\n", "strategy.slm-mix.selection: expected one of"),
    ("strategy:\n  slm-pn: {capacity: many}\n", "strategy.slm-pn.capacity: expected an integer"),
    ("strategy:\n  llm-lora: {lr: 0}\n", "strategy.llm-lora.lr: expected > 0"),
    ("strategy:\n  slm-d: {distill_weight: 2}\n", "strategy.slm-d.distill_weight: expected in"),
    ("strategy:\n  slm-nopt: {warmp_steps: 3}\n", "strategy.slm-nopt.warmp_steps: unknown key"),
    ("serving:\n  price_per_device_hour: -0.1\n", "serving.price_per_device_hour: expected a number >= 0"),
    ("serving:\n  price_per_device_hour: .nan\n", "serving.price_per_device_hour: expected a number >= 0"),
    ("serving:\n  cost_measure_s: 3600\n", "serving.cost_measure_s: expected <= 60"),
])
def test_bad_values_name_the_key(tmp_path, text, needle):
    """Every bad value fails where the recipe is read, a strategy's setting included: the
    command line and the drivers read recipes with ``resolve()`` (a strategy's settings are
    otherwise read on first use: ``test_a_strategy_section_stays_data_until_read``)."""
    with pytest.raises(ConfigError, match=needle.replace("[", r"\[").replace("(", r"\(")):
        load_config(write(tmp_path, text)).resolve()


def test_a_strategy_section_stays_data_until_read(tmp_path):
    """A bad strategy setting does not stop a config that never reads it (a Serve replica's)
    from loading; the first read names the field, and so does every later one."""
    cfg = load_config(write(tmp_path, "strategy:\n  slm-mix: {experts: 1}\n"))
    assert cfg.strategy.name == "slm" and cfg.serving.port > 0
    for _ in range(2):
        with pytest.raises(ConfigError, match=r"strategy\.slm-mix\.experts: expected >= 2"):
            cfg.strategy.of("slm-mix")
    with pytest.raises(ConfigError, match=r"strategy\.slm-mix\.experts: expected >= 2"):
        cfg.to_dict()
    assert from_dict(cfg.to_tree(resolved=False)).strategy.sections["slm-mix"] == {"experts": 1}


def test_malformed_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="malformed YAML at line 2"):
        load_config(write(tmp_path, "a: 1\n  b: [\n"))
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes(b"name: caf\xe9\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(bad)


def test_overrides_apply_and_validate():
    cfg = load_config(CONFIGS[0], parse_overrides(["pretrain.lr=3e-4", "strategy.name=llm", "corpus.domains=a,b"]))
    assert cfg.pretrain.lr == 3e-4 and cfg.strategy.name == "llm" and cfg.corpus.domains == ("a", "b")
    with pytest.raises(ConfigError, match="pretrain.nope: unknown key"):
        load_config(None, parse_overrides(["pretrain.nope=1"]))
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        parse_overrides(["pretrain.lr"])
    assert cfg.replace(**{"cluster.k": 16}).cluster.k == 16


def test_each_strategy_owns_its_settings():
    """The paper varies these independently, so they are separate keys: 16 experts for the
    mixture, 32 for the projected network; LoRA and from-scratch training have their own
    learning rates; the distillation teacher its own pretraining budget."""
    cfg = load_config(CONFIGS[[p.stem for p in CONFIGS].index("paper")])
    assert cfg.strategy.of("slm-mix").experts == 16 and cfg.strategy.of("slm-pn").experts == 32
    assert cfg.strategy.of("llm-lora").lr != cfg.finetune.lr
    assert cfg.strategy.of("slm-d").teacher_pretrain_tokens > cfg.pretrain.max_tokens
    flat = cfg.to_dict()
    assert flat["strategy.slm-pn.capacity"] == 21 and flat["strategy.slm-mix.experts"] == 16
    other = cfg.replace(**{"strategy.slm-mix.experts": 8})
    assert other.strategy.of("slm-mix").experts == 8 and other.strategy.of("slm-pn").experts == 32
    # Round trip through the recipe shape (what Ray workers rebuild configs from).
    from slmfactory.platform.config import from_dict

    assert from_dict(cfg.to_tree()) == cfg


# -- resources per phase (scaling.<phase>) ----------------------------------------------------------

@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_recipe_resolves_every_phases_resources(path):
    from slmfactory.platform.config import PHASES

    cfg = load_config(path)
    for kind in PHASES:
        r = cfg.scaling.phase(kind)
        assert r.num_workers >= 1 and r.cpus_per_worker > 0 and 0 <= r.gpus_per_worker <= 1
        # Flattened into MLflow params with the recipe's own keys.
        assert f"scaling.{kind}.gpus_per_worker" in cfg.to_dict()


def test_a_recipe_with_only_the_global_scaling_gives_it_to_every_phase():
    from slmfactory.platform.config import PHASES

    cfg = load_config(None, {"scaling.num_workers": 3, "scaling.use_gpu": True, "scaling.cpus_per_worker": 2})
    for kind in PHASES:
        r = cfg.scaling.phase(kind)
        assert (r.num_workers, r.gpus_per_worker, r.cpus_per_worker) == (3, 1.0, 2.0)
        assert r.bundle() == {"CPU": 2.0, "GPU": 1.0}
    # A phase's own key wins; its other keys still follow the global ones.
    cfg = cfg.replace(**{"scaling.finetune.num_workers": 1, "scaling.finetune.gpus_per_worker": 0.25})
    ft = cfg.scaling.phase("finetune")
    assert (ft.num_workers, ft.gpus_per_worker, ft.cpus_per_worker) == (1, 0.25, 2.0)
    assert cfg.scaling.phase("pretrain").num_workers == 3
    assert cfg.replace(**{"scaling.finetune.gpus_per_worker": 0}).scaling.phase("finetune").bundle() == {"CPU": 2.0}


def test_the_paper_recipe_pretrains_on_8_gpus_and_fine_tunes_on_a_gpu_or_less():
    cfg = load_config(CONFIGS[[p.stem for p in CONFIGS].index("paper")])
    for kind in ("pretrain", "pretrain_llm", "experts"):
        r = cfg.scaling.phase(kind)
        assert (r.num_workers, r.gpus_per_worker) == (8, 1.0)
    for kind in ("finetune", "finetune_llm", "distill"):
        r = cfg.scaling.phase(kind)
        assert r.num_workers == 1 and 0 < r.gpus_per_worker <= 1
    assert cfg.scaling.phase("finetune").gpus_per_worker == 0.5


@pytest.mark.parametrize("override, message", [
    ({"scaling.finetune.gpus_per_worker": 2}, "scaling.finetune.gpus_per_worker: expected 0 (CPU only), a share "
                                              "of one GPU in (0, 1]"),
    ({"scaling.finetune.gpus_per_worker": -0.5}, "scaling.finetune.gpus_per_worker: expected 0 (CPU only)"),
    ({"scaling.pretrain.num_workers": 4, "scaling.pretrain.gpus_per_worker": 0.5},
     "scaling.pretrain.gpus_per_worker: expected a whole GPU per worker (1) with 4 data-parallel workers"),
    # The global num_workers reaches a phase that sets only a share of a GPU.
    ({"scaling.num_workers": 2, "scaling.distill.gpus_per_worker": 0.5},
     "scaling.distill.gpus_per_worker: expected a whole GPU per worker (1) with 2 data-parallel workers"),
    ({"scaling.experts.num_workers": -1}, "scaling.experts.num_workers: expected an integer >= 1"),
    ({"scaling.finetune.cpus_per_worker": -2}, "scaling.finetune.cpus_per_worker: expected > 0"),
    ({"scaling.finetune.gpus": 1}, "scaling.finetune.gpus: unknown key (expected one of ['cpus_per_worker', "
                                   "'gpus_per_worker', 'num_workers'])"),
])
def test_bad_phase_resources_name_the_key(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, override)
    assert str(e.value).startswith(message), str(e.value)


def test_an_unknown_phase_kind_is_a_clear_error():
    with pytest.raises(ConfigError, match=r"scaling: unknown phase 'pretraining' \(expected one of \['pretrain'"):
        load_config(None).scaling.phase("pretraining")
