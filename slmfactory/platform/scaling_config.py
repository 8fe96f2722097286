"""The ``scaling`` section of a recipe: how many workers, on which devices, for each kind
of training phase (``PHASES``): the global keys, each phase's own (``PhaseResources``), and
the two joined (``PhaseScaling``, what a launcher asks Ray for).

Separate from ``config.py`` (which composes it into ``RunConfig``) because it is what the
launchers and the sweep planner read of a recipe, and it is long: one dataclass per level.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from slmfactory.platform.errors import ConfigError, check


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
        check(isinstance(self.num_workers, int) and self.num_workers >= 0, "num_workers",
              "an integer >= 1 (0: scaling.num_workers)", self.num_workers)
        g = self.gpus_per_worker
        check(g == -1 or 0 <= g <= 1, "gpus_per_worker", "0 (CPU only), a share of one GPU in (0, 1], "
              "or -1 (scaling's); each worker trains on one device, so more GPUs are more workers", g)
        check(self.cpus_per_worker >= 0, "cpus_per_worker", "> 0 (0: scaling.cpus_per_worker)",
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
        check(self.num_workers >= 1, "scaling.num_workers", ">= 1", self.num_workers)
        check(self.cpus_per_worker > 0, "scaling.cpus_per_worker", "> 0", self.cpus_per_worker)
        check(self.max_failures >= -1, "scaling.max_failures", ">= -1", self.max_failures)
        for name in PHASES:
            r = self.phase(name)
            # NCCL gives each rank a GPU of its own: data-parallel workers cannot share one.
            check(not (r.num_workers > 1 and 0 < r.gpus_per_worker < 1), f"scaling.{name}.gpus_per_worker",
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
