"""Ray Train launcher: the same trainer factory, run as DDP on a Ray Train V2 worker group.

Ray stays a thin outer layer (docs/paper.md#convention-5). Each worker rebuilds model, data and trainer
with the strategy's factory; this module only adds what Ray needs:

- a ``WorkerContext`` with the worker's rank, device and a DDP wrapper;
- checkpoint wiring: every ``Trainer.save_checkpoint`` becomes a collective
  ``ray.train.report`` (rank 0 hands over the folder it just wrote, the other ranks
  report ``None``), so Ray Train persists it under ``<out_dir>/ray/<phase>``;
- resume: a restarted worker group loads ``ray.train.get_checkpoint()`` and, because
  batches are a pure function of the step, continues as the uninterrupted run would;
- the result: after ``fit`` rank 0 re-reports the final checkpoint with the whole
  ``TrainResult`` attached, which the driver rebuilds into a :class:`FitOutput`.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path
from typing import Any, Callable

from slmfactory.models.train.launch import FitOutput, Launcher, LocalLauncher, TrainerFactory, WorkerContext
from slmfactory.models.train.trainer import TrainResult
from slmfactory.platform.errors import SlmFactoryError
from slmfactory.platform.runtime import init_ray, say

RESULT_KEY = "train_result_json"
"""Metric holding the JSON-encoded ``TrainResult`` (Ray metrics stay flat scalars + strings)."""


class DistributedTrainingError(SlmFactoryError):
    """A Ray Train run failed after its allowed restarts (``scaling.max_failures``)."""


def run_name(phase: str) -> str:
    """Ray run names become folder names: ``pretrain/slm`` → ``pretrain-slm``."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", phase).strip("-.")
    return name or "train"


def result_to_metrics(result: TrainResult) -> dict[str, Any]:
    return {"step": result.steps, "tokens": result.tokens, "train_loss": result.train_loss,
            "best_valid_nll": result.best_valid_nll, "wall_seconds": result.wall_seconds,
            "flops": result.flops, "final": 1, RESULT_KEY: json.dumps(result.to_dict())}


def result_from_metrics(metrics: dict[str, Any]) -> TrainResult:
    return TrainResult.from_dict(json.loads(metrics[RESULT_KEY]))


def _ddp_wrapper(world_size: int, device) -> Callable:
    import torch

    def wrap(model: torch.nn.Module) -> torch.nn.Module:
        if world_size == 1:
            return model  # nothing to synchronise; skip DDP's bucket overhead
        from torch.nn.parallel import DistributedDataParallel

        if device.type == "cuda":
            return DistributedDataParallel(model, device_ids=[device.index], output_device=device.index)
        return DistributedDataParallel(model)

    return wrap


def _train_loop_per_worker(config: dict) -> None:
    """What every Ray Train worker runs: build the trainer, wire checkpoints, fit."""
    import ray.train
    import ray.train.torch
    from ray.train import Checkpoint, CheckpointConsistencyMode

    factory: TrainerFactory = config["factory"]
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    # Local scratch for the trainer's own checkpoint folders; Ray copies the reported ones
    # to persistent storage. Per rank so co-located workers never share a folder.
    work_dir = Path(config["work_dir"]) / f"rank-{rank}"
    work_dir.mkdir(parents=True, exist_ok=True)
    ctx = WorkerContext(rank=rank, world_size=world_size, device=device, out_dir=work_dir,
                        wrap=_ddp_wrapper(world_size, device), log=say if rank == 0 else None)
    trainer = factory(ctx)

    # NOTE: only rank 0 writes checkpoints (save_checkpoint returns None elsewhere), so the
    # report is made here around save_checkpoint, not in on_checkpoint: ray.train.report is
    # a barrier that every rank must call the same number of times.
    save_checkpoint = trainer.save_checkpoint
    cfg = trainer.cfg
    state = {"reported_step": -1, "last_path": None}

    def periodic(step: int) -> bool:
        # The loop's own condition for an intermediate checkpoint; the final save (after the
        # loop) is reported after fit() with the whole TrainResult attached instead.
        return bool(cfg.checkpoint_every) and step % cfg.checkpoint_every == 0 and step < trainer.max_steps

    def save_and_report():
        path = save_checkpoint()
        state["last_path"] = path
        step = trainer.step
        if periodic(step) and state["reported_step"] != step:
            metrics = {"step": step, "elapsed": trainer.elapsed, "best_valid_nll": trainer.best_valid,
                       "final": 0}
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(str(path)) if path else None,
                             delete_local_checkpoint_after_upload=False)
            # NOTE: report() only queues the result; the controller registers it when it next
            # polls the workers. A worker killed in between restarts from the *previous*
            # checkpoint (seen in the kill test). Wait until it is committed, so that "saved"
            # means "a restart resumes here" — one controller round-trip per checkpoint.
            ray.train.get_all_reported_checkpoints(consistency_mode=CheckpointConsistencyMode.COMMITTED,
                                                   timeout_s=600)
            state["reported_step"] = step
        return path

    trainer.save_checkpoint = save_and_report

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            trainer.resume(Path(d))
    # resume=False: never pick up a stale local checkpoint; Ray's is the source of truth.
    result = trainer.fit(resume=False)
    if world_size > 1:
        # Each rank's loss is over its slice of the global batch; slices are equal, so the
        # mean over ranks is the global-batch loss a single process would have logged.
        import torch
        import torch.distributed as dist

        if dist.is_initialized():
            t = torch.tensor([result.train_loss], dtype=torch.float64, device=device)
            dist.all_reduce(t)
            result = dataclasses.replace(result, train_loss=float(t.item()) / world_size)
    path = state["last_path"]
    ray.train.report(result_to_metrics(result),
                     checkpoint=Checkpoint.from_directory(str(path)) if rank == 0 and path else None,
                     delete_local_checkpoint_after_upload=False)


class RayLauncher:
    """Runs a phase with Ray Train V2's ``TorchTrainer`` (DDP; gloo on CPU, nccl on GPU), on
    exactly the resources its kind declares (``scaling.<resources>``; the global ``scaling``
    keys when the phase names none). Ray Train V2 reserves them in a placement group of its
    own (one bundle per worker), wherever the launching process runs: a sweep's trial
    reserves only itself (``sweeps/run.py``)."""

    def __init__(self, scaling, log: Callable[[str], None] | None = say, address: str | None = None):
        self.scaling = scaling
        self.log = log
        self.address = address

    def fit(self, factory: TrainerFactory, out_dir: Path, phase: str, resources: str | None = None) -> FitOutput:
        import ray
        from ray.train import FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchConfig, TorchTrainer

        out_dir = Path(out_dir).resolve()
        out_dir.mkdir(parents=True, exist_ok=True)
        if not ray.is_initialized():
            init_ray(self.address)
        s = self.scaling.phase(resources) if resources else self.scaling.default()
        name = run_name(phase)
        storage = out_dir / "ray"
        trainer = TorchTrainer(
            _train_loop_per_worker,
            train_loop_config={"factory": factory, "work_dir": str(out_dir / "workers" / name)},
            torch_config=TorchConfig(backend="nccl" if s.use_gpu else "gloo"),
            scaling_config=ScalingConfig(num_workers=s.num_workers, use_gpu=s.use_gpu,
                                         resources_per_worker=s.bundle()),
            run_config=RunConfig(name=name, storage_path=str(storage),
                                 failure_config=FailureConfig(max_failures=s.max_failures)),
        )
        if self.log:
            self.log(f"[{phase}] Ray Train ({s.phase} resources): {s.label()}, storage {storage}")
        try:
            result = trainer.fit()
        except Exception as e:  # TrainingFailedError and friends carry the workers' errors
            raise DistributedTrainingError(
                f"{phase}: Ray Train failed after max_failures={s.max_failures} restart(s): {e}") from e
        if result.error is not None:
            raise DistributedTrainingError(f"{phase}: Ray Train failed: {result.error}")
        metrics = result.metrics or {}
        if RESULT_KEY not in metrics or result.checkpoint is None:
            raise DistributedTrainingError(f"{phase}: Ray Train finished without a final checkpoint "
                                           f"(last metrics: {sorted(metrics)})")
        return FitOutput(result=result_from_metrics(metrics),
                         checkpoint=_local_dir(result.checkpoint, out_dir / "final"))


def _local_dir(checkpoint, dest: Path) -> Path:
    """The checkpoint as a local folder: its own path on local storage, else a download."""
    fs = getattr(checkpoint, "filesystem", None)
    if fs is not None and fs.type_name == "local" and (Path(checkpoint.path) / "model.safetensors").is_file():
        return Path(checkpoint.path)
    shutil.rmtree(dest, ignore_errors=True)
    return Path(checkpoint.to_directory(str(dest)))


class PhaseLauncher:
    """Each phase where its resources say (``scaling.<phase>``): a phase of more than one
    worker, or of one GPU worker this process does not hold, on a Ray Train worker group
    (``RayLauncher``); a one-worker phase this process holds the resources of in this
    process (``LocalLauncher``: a sweep's trial, whose placement group bundle was sized
    for the phases it runs, ``holds``); a one-worker CPU phase in this process.
    ``SLMFACTORY_LAUNCHER=ray`` or ``local`` sends every phase one way (tests)."""

    def __init__(self, scaling, log: Callable[[str], None] | None = say, holds: tuple[str, ...] = (),
                 address: str | None = None):
        self.scaling, self.log, self.holds = scaling, log, tuple(holds)
        self.ray = RayLauncher(scaling, log=log, address=address)
        self.local = LocalLauncher(log=log)

    def where(self, resources: str | None) -> str:
        """``ray`` or ``local``: where a phase of kind ``resources`` runs."""
        import os

        choice = os.environ.get("SLMFACTORY_LAUNCHER", "")
        if choice in ("ray", "local"):
            return choice
        r = self.scaling.phase(resources) if resources else self.scaling.default()
        if r.num_workers > 1:
            return "ray"
        if resources in self.holds:
            return "local"
        return "ray" if r.use_gpu else "local"

    def fit(self, factory: TrainerFactory, out_dir: Path, phase: str, resources: str | None = None) -> FitOutput:
        launcher = self.ray if self.where(resources) == "ray" else self.local
        return launcher.fit(factory, out_dir, phase, resources=resources)


def make_launcher(cfg, log: Callable[[str], None] | None = say, holds: tuple[str, ...] = ()) -> Launcher:
    """The launcher of a run: each phase on its own resources (``PhaseLauncher``);
    ``holds``: the phase kinds whose one worker this process holds (a sweep trial's)."""
    return PhaseLauncher(cfg.scaling, log=log, holds=holds)


__all__ = ["RayLauncher", "PhaseLauncher", "DistributedTrainingError", "make_launcher", "run_name"]
