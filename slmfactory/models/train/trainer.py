"""The one training loop every strategy uses.

Single-device by default; Ray Train wraps it from outside (``distributed.py``) by passing
``rank``/``world_size``, a DDP-wrapped model and an ``on_checkpoint`` override. Strategies
change behaviour through a few hooks instead of copying the loop (torchtitan's Trainer):

- ``compute_loss(batch)``        the per-batch objective (distillation adds a KL term)
- ``trainable_parameters()``     what the optimiser updates (LoRA: the adapters only)
- ``batch_at(step)``             which batch a step sees (projected nets: routed by cluster)
- ``on_checkpoint(path, info)``  where a finished checkpoint goes (Ray: ``ray.train.report``)

Checkpoints are safetensors (model, optimiser moments, early-stopping best) plus a JSON
state, written to a temporary folder and renamed, so a kill never leaves a torn one; the
next ``fit`` resumes from the newest complete checkpoint and, because batches are a pure
function of the step, continues exactly as an uninterrupted run would.

How a phase runs (precision, compile: ``plan_execution``) is in ``execution.py``; scoring a
model on tokens (``evaluate_nll``, the bootstrap) in ``evaluation.py``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from slmfactory.data.tokens import Batch, PackedBatches
from slmfactory.models.train.evaluation import evaluate_nll
from slmfactory.models.train.execution import autocast_for, fp32_attention, model_width, plan_execution
from slmfactory.platform.config import DeviceProfile
from slmfactory.platform.cost import CostRecord, TRAIN, Work, model_flop_terms, train_flops_per_token
from slmfactory.platform.errors import DataError
from slmfactory.platform.runtime import cpu_bf16_support, say
from slmfactory.platform.stages import atomic_dir, write_text_atomic
from slmfactory.trial import TrialRecord


@dataclass
class TrainResult:
    steps: int
    tokens: int
    train_loss: float
    """Mean training loss over the last (up to) 20 steps."""
    best_valid_nll: float
    valid_history: list[tuple[int, float]] = field(default_factory=list)
    train_history: list[tuple[int, float]] = field(default_factory=list)
    """(step, training loss) every ``log_every`` steps: the training curve."""
    wall_seconds: float = 0.0
    flops: float = 0.0
    stopped_early: bool = False
    cost: CostRecord | None = None
    epochs: float = 0.0
    """Passes over the phase's training data (tokens trained / tokens available): above 1
    the phase repeated its data, which the report and the dry-run flag."""
    precision: str = "fp32"
    """The precision the steps ran in (the phase's ``precision`` resolved: ``plan_execution``)."""
    compile: str = ""
    """The ``torch.compile`` mode the steps ran with ("" = eager)."""
    best_step: int = -1
    """The step whose weights the phase returns: 0 when no step beat the starting weights
    (early stopping validates them before the first step), -1 without early stopping (the
    last step's weights)."""

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["cost"] = self.cost.to_dict() if self.cost is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict, profile=None) -> "TrainResult":
        """Rebuild a stored result; with ``profile``, its device-hours under that profile."""
        d = dict(d)
        cost = CostRecord.from_dict(d.pop("cost"), profile) if d.get("cost") is not None else None
        d["valid_history"] = [tuple(h) for h in d.get("valid_history", [])]
        d["train_history"] = [tuple(h) for h in d.get("train_history", [])]
        return cls(**d, cost=cost)


class Trainer:
    """Adam + linear warm-up + cosine/constant decay + clipping, a token/FLOP budget,
    periodic validation with early stopping, atomic checkpoints and resume."""

    def __init__(self, model: torch.nn.Module, train: PackedBatches, cfg, *, seq_len: int,
                 valid: np.ndarray | None = None, out_dir: Path | None = None, phase: str = "train",
                 profile=None, tracker=None, rank: int = 0, world_size: int = 1,
                 ddp_model: torch.nn.Module | None = None, device: str | torch.device = "cpu",
                 log: Callable[[str], None] | None = say, log_every: int = 50,
                 bf16_support: Callable[[], str] = cpu_bf16_support):
        self.model = model                      # the plain module (saved, evaluated)
        self.step_model = ddp_model or model    # what forward/backward runs through (DDP or plain)
        self.train_data, self.cfg, self.seq_len = train, cfg, seq_len
        self.valid = valid
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.phase = phase
        self.profile = profile or DeviceProfile()
        self.tracker = tracker if rank == 0 else None
        self.rank, self.world_size = rank, world_size
        self.device = torch.device(device)
        self.log = log if rank == 0 else None
        self.log_every = log_every
        self.flops_per_token = self.compute_flops_per_token()
        tokens_per_step = cfg.batch_size * seq_len
        steps = cfg.max_tokens // tokens_per_step
        if cfg.max_flops > 0:
            steps = min(steps, int(cfg.max_flops // (self.flops_per_token * tokens_per_step)))
        if steps < 1:
            raise DataError(f"{phase}: budget of {cfg.max_tokens} tokens is less than one step "
                            f"({cfg.batch_size} x {seq_len} tokens)")
        self.max_steps = steps
        self._plan_inputs = dict(width=model_width(model), steps=steps,
                                 flops_per_step=self.flops_per_token * tokens_per_step,
                                 peak_flops=self.profile.peak_flops, bf16_support=bf16_support)
        self.plan = plan_execution(cfg.precision, cfg.compile, self.device, **self._plan_inputs)
        self._compiled_ok = not self.plan.compile
        if self.log:
            self.log(f"[{phase}] {self.plan.label()}" + (f" ({self.plan.reason})" if self.plan.reason else ""))
        # Training steps run under the plan's autocast; evaluation (validation here, test
        # perplexity and the bootstrap in phases.py) runs in fp32 on a CPU: its sums are
        # float64 either way, and an fp32 forward costs little next to training.
        self.autocast = autocast_for(self.device, self.plan.precision)
        self.eval_autocast = autocast_for(self.device)
        self.restore_attention: Callable[[], None] = lambda: None
        self.use_plan_attention()
        if self.plan.compile:
            # Compiled on top of DDP so its graph breaks line up with DDP's gradient buckets.
            # Static shapes: a process that compiles a second model (another size, a teacher)
            # would otherwise recompile the first one's graph with dynamic sizes, 3-8x slower.
            self.step_model = torch.compile(self.step_model, mode=self.plan.compile, dynamic=False)
        self.optimizer = self.build_optimizer()
        # Mutable loop state (checkpointed).
        self.step = 0
        self.best_valid = math.inf
        self.bad_evals = 0
        self.best_step = -1
        self.history: list[tuple[int, float]] = []
        self.train_history: list[tuple[int, float]] = []
        self.elapsed = 0.0
        self.best_state: dict[str, torch.Tensor] | None = None
        self.finished: TrainResult | None = None
        """Set when a loaded checkpoint is the phase's final one: ``fit`` returns it as is."""

    def use_plan_attention(self) -> None:
        """Under CPU bf16, attention in fp32 (``fp32_attention``) until ``fit`` returns."""
        if self.plan.precision == "bf16" and self.device.type == "cpu":
            self.restore_attention = fp32_attention(self.model)

    # -- hooks ------------------------------------------------------------------------
    def compute_flops_per_token(self) -> float:
        return train_flops_per_token(self.model, self.seq_len)

    def cost_work(self, tokens: int, steps: int) -> list[Work]:
        """What the device profile prices (``platform.cost``): by default one training
        item of this model's compute parameters."""
        return [Work(TRAIN, tokens, tokens * self.flops_per_token, model_flop_terms(self.model)[0], steps,
                     workers=self.world_size)]

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def data_sequences(self) -> int:
        """Distinct training sequences this phase draws from (epochs = steps · batch / this)."""
        return len(self.train_data)

    def build_optimizer(self) -> torch.optim.Optimizer:
        params = self.trainable_parameters()
        # One fused kernel per step on GPUs and CPUs (on 2 cores: 0.7 ms instead of 1.5 at the
        # study's 0.26M model, 10 instead of 27 at 9.4M); multi-tensor (foreach) kernels elsewhere.
        fused = self.device.type in ("cuda", "cpu")
        return torch.optim.AdamW(params, lr=self.cfg.lr, betas=(0.9, 0.99), eps=1e-8,
                                 weight_decay=self.cfg.weight_decay, fused=fused, foreach=not fused)

    def lr_at(self, step: int) -> float:
        cfg = self.cfg
        if step < cfg.warmup_steps:
            return cfg.lr * (step + 1) / cfg.warmup_steps
        if cfg.decay == "constant":
            return cfg.lr
        span = max(1, self.max_steps - cfg.warmup_steps)
        t = min(1.0, (step - cfg.warmup_steps) / span)
        floor = cfg.min_lr_ratio * cfg.lr
        return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * t))

    def batch_at(self, step: int) -> Batch:
        return self.train_data.batch(step)

    def compute_loss(self, batch: Batch) -> torch.Tensor:
        x = batch.input_ids.to(self.device, non_blocking=True)
        return self.step_model(input_ids=x, labels=x).loss

    def forward_backward_step(self, batch: Batch) -> torch.Tensor:
        """Backward of one batch; returns the detached loss (not a float: on a GPU that
        would wait for the kernels before the optimiser's are even queued)."""
        with self.autocast():
            loss = self.compute_loss(batch)
        loss.backward()
        return loss.detach()

    def on_checkpoint(self, path: Path, info: dict) -> None:
        """Called (rank 0) after a complete checkpoint is written to ``path``: ``latest``
        names it, and every other checkpoint goes, with the ``.step-*`` staging folders a
        killed save left beside them (``atomic_dir``'s ``.tmp`` and ``.old``; rank 0 is the
        only writer, and its own save is complete by now)."""
        write_text_atomic(path.parent / "latest", path.name)
        for old in [*path.parent.glob("step-*"), *path.parent.glob(".step-*")]:
            if old != path and old.is_dir():
                shutil.rmtree(old, ignore_errors=True)

    def evaluate(self, tokens: np.ndarray | None = None, max_tokens: int | None = None) -> float:
        """Mean per-token NLL on ``tokens`` (default: the validation split)."""
        tokens = self.valid if tokens is None else tokens
        if max_tokens is not None:
            tokens = tokens[:max_tokens]
        s, n = evaluate_nll(self.model, tokens, self.seq_len, self.cfg.batch_size, self.rank,
                            self.world_size, self.device, self.eval_autocast)
        return s / n

    # -- the loop ---------------------------------------------------------------------
    def train_step(self, step: int) -> float:
        lr = self.lr_at(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if self._compiled_ok:
            loss = self.forward_backward_step(self.batch_at(step))
        else:
            try:
                loss = self.forward_backward_step(self.batch_at(step))
                self._compiled_ok = True
            except Exception as e:  # noqa: BLE001 - whatever torch.compile raised on its first trace
                self._fall_back_to_eager(e)
                loss = self.forward_backward_step(self.batch_at(step))
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.trainable_parameters(), self.cfg.grad_clip, foreach=True)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss)

    def _fall_back_to_eager(self, error: Exception) -> None:
        """The first compiled step failed to trace (some models' ops have no compiled path
        under autocast): run the phase eager, with the precision ``auto`` picks for eager."""
        reason = f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"
        self.step_model = getattr(self.step_model, "_orig_mod", self.step_model)
        self.restore_attention()
        self.plan = plan_execution(self.cfg.precision, "", self.device, **self._plan_inputs)
        self.autocast = autocast_for(self.device, self.plan.precision)
        self.use_plan_attention()
        self.optimizer.zero_grad(set_to_none=True)
        self._compiled_ok = True
        if self.log:
            self.log(f"[{self.phase}] torch.compile failed ({reason}); running eager: {self.plan.label()}")

    def _validate(self) -> bool:
        """Evaluate, track the best weights; True when early stopping says stop. At step 0
        (``fit`` validates the starting weights when early stopping is on) the starting
        weights become the first best: a fine-tune that only hurts returns them."""
        nll = self.evaluate(max_tokens=self.cfg.eval_tokens)
        self.history.append((self.step, nll))
        if self.tracker is not None:
            self.tracker.log_metrics({f"{self.phase}/valid_nll": nll}, step=self.step)
        if self.log:
            self.log(f"[{self.phase}] step {self.step}/{self.max_steps} valid nll {nll:.4f} "
                     f"ppl {math.exp(nll):.2f}")
        if nll < self.best_valid - 1e-6:
            self.best_valid, self.bad_evals, self.best_step = nll, 0, self.step
            if self.cfg.patience > 0:
                self.best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        else:
            self.bad_evals += 1
        return self.cfg.patience > 0 and self.bad_evals >= self.cfg.patience

    def fit(self, resume: bool = True) -> TrainResult:
        if resume:
            self.resume()
        if self.finished is not None:
            # The phase already ended (budget spent or early-stopped): training on from the
            # restored best weights would change its result and cost on every rerun.
            if self.log:
                self.log(f"[{self.phase}] already finished at step {self.step}; nothing to train")
            return self.finished
        cfg = self.cfg
        self.use_plan_attention()
        self.model.train()
        recent: list[float] = []
        stopped = False
        t_start = time.perf_counter() - self.elapsed
        t_log, tokens_log = time.perf_counter(), 0
        if self.valid is not None and cfg.patience > 0 and self.step == 0 and not self.history:
            # Early stopping considers the starting weights too: a phase none of whose steps
            # beats them on validation returns them unchanged (best_step 0).
            self._validate()
        while self.step < self.max_steps:
            loss = self.train_step(self.step)
            if not math.isfinite(loss):
                raise FloatingPointError(f"{self.phase}: loss became {loss} at step {self.step}; "
                                         f"lower {self.phase}.lr or raise warmup_steps")
            self.step += 1
            recent = (recent + [loss])[-20:]
            tokens_log += cfg.batch_size * self.seq_len
            if self.log and self.step % self.log_every == 0:
                now = time.perf_counter()
                self.log(f"[{self.phase}] step {self.step}/{self.max_steps} loss {loss:.4f} "
                         f"lr {self.lr_at(self.step - 1):.2e} {tokens_log / (now - t_log):,.0f} tok/s")
                t_log, tokens_log = now, 0
            if self.step % self.log_every == 0 or self.step == 1:
                self.train_history.append((self.step, loss))
                if self.tracker is not None:
                    self.tracker.log_metrics({f"{self.phase}/train_loss": loss}, step=self.step)
            if self.valid is not None and cfg.eval_every and self.step % cfg.eval_every == 0:
                stopped = self._validate()
            if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 and self.step < self.max_steps:
                self.elapsed = time.perf_counter() - t_start
                self.save_checkpoint()
            if stopped:
                break
        if self.valid is not None and (not self.history or self.history[-1][0] != self.step):
            stopped = self._validate() or stopped
        if self.tracker is not None:
            self.tracker.flush()  # a live run's buffered curve points, before the phase's result
        self.restore_attention()
        if self.best_state is not None:
            # Early stopping keeps the best validation weights, as the paper's fine-tuning does
            # (the starting ones when no step beat them).
            self.model.load_state_dict(self.best_state)
            if self.log:
                self.log(f"[{self.phase}] returning the weights of step {self.best_step}"
                         + (" (the starting weights: no step beat them on validation)" if self.best_step == 0 else "")
                         + f", valid nll {self.best_valid:.4f}; {self.step} steps charged")
        self.elapsed = time.perf_counter() - t_start
        tokens = self.step * cfg.batch_size * self.seq_len
        flops = tokens * self.flops_per_token
        used = {TrialRecord.used_param(self.phase, "precision"): self.plan.precision,
                TrialRecord.used_param(self.phase, "compile"): self.plan.compile or "eager"}
        cost = CostRecord.of(self.phase, self.cost_work(tokens, self.step), self.elapsed, self.profile,
                             self.world_size, **used)
        epochs = self.step * cfg.batch_size / max(1, self.data_sequences())
        if epochs > 1.0 and self.log:
            self.log(f"[{self.phase}] warning: {epochs:.2f} epochs over its {self.data_sequences():,} training "
                     f"sequences (the data repeats; a larger data pool or a smaller budget avoids it)")
        self.finished = TrainResult(steps=self.step, tokens=tokens,
                                    train_loss=float(np.mean(recent)) if recent else math.nan,
                                    best_valid_nll=self.best_valid, valid_history=list(self.history),
                                    train_history=list(self.train_history),
                                    wall_seconds=self.elapsed, flops=flops, stopped_early=stopped, cost=cost,
                                    epochs=epochs, precision=self.plan.precision, compile=self.plan.compile,
                                    best_step=self.best_step if self.best_state is not None else -1)
        self.save_checkpoint()  # the final checkpoint carries the result: a rerun returns it
        return self.finished

    # -- checkpoints ------------------------------------------------------------------
    @property
    def checkpoint_root(self) -> Path | None:
        return self.out_dir / "checkpoints" if self.out_dir is not None else None

    def state_dict_files(self) -> dict[str, dict[str, torch.Tensor]]:
        """Tensors to checkpoint, by file name. Optimiser moments are stored by parameter
        index so nothing needs unpickling on load."""
        files: dict[str, dict[str, torch.Tensor]] = {}
        opt: dict[str, torch.Tensor] = {}
        for i, p in enumerate(self.trainable_parameters()):
            st = self.optimizer.state.get(p, {})
            for key, value in st.items():
                opt[f"{i}.{key}"] = value.detach().cpu().contiguous() if torch.is_tensor(value) \
                    else torch.tensor(float(value))
        files["optim.safetensors"] = opt
        if self.best_state is not None:
            files["best.safetensors"] = {k: v.detach().cpu().contiguous() for k, v in self.best_state.items()}
        return files

    def save_checkpoint(self) -> Path | None:
        if self.rank != 0 or self.checkpoint_root is None:
            return None
        from safetensors.torch import save_file, save_model

        root = self.checkpoint_root
        root.mkdir(parents=True, exist_ok=True)
        final = root / f"step-{self.step:08d}"
        state = {"step": self.step, "best_valid": self.best_valid, "bad_evals": self.bad_evals, "best_step": self.best_step,
                 "history": self.history, "train_history": self.train_history, "elapsed": self.elapsed, "phase": self.phase,
                 "max_steps": self.max_steps,
                 "finished": self.finished.to_dict() if self.finished is not None else None}
        # Built beside, then swapped in whole (replacing the same step's earlier one): a kill
        # leaves no half-written ``step-*`` folder for ``latest`` to name.
        with atomic_dir(final) as tmp:
            save_model(self.model, str(tmp / "model.safetensors"))  # handles tied weights
            for name, tensors in self.state_dict_files().items():
                if tensors:
                    save_file(tensors, str(tmp / name))
            (tmp / "state.json").write_text(json.dumps(state))
        self.on_checkpoint(final, state)
        return final

    def latest_checkpoint(self) -> Path | None:
        """The checkpoint ``latest`` names; where that one is gone or incomplete (a kill
        between a save's two renames, or before ``latest`` was written), the newest
        complete ``step-*`` folder; None without one."""
        root = self.checkpoint_root
        if root is None:
            return None
        if (root / "latest").is_file():
            path = root / (root / "latest").read_text().strip()
            if (path / "state.json").is_file():
                return path
        complete = [p for p in root.glob("step-*") if (p / "state.json").is_file()]
        return max(complete, key=lambda p: p.name) if complete else None

    def resume(self, path: Path | None = None) -> bool:
        """Load ``path`` (default: the newest complete checkpoint); False if there is none."""
        path = path or self.latest_checkpoint()
        if path is None:
            return False
        self.load_checkpoint(path)
        if self.log:
            self.log(f"[{self.phase}] resumed from {path} at step {self.step}")
        return True

    def load_checkpoint(self, path: Path) -> None:
        from safetensors.torch import load_file, load_model

        path = Path(path)
        load_model(self.model, str(path / "model.safetensors"), device=str(self.device))
        state = json.loads((path / "state.json").read_text())
        self.step, self.best_valid = state["step"], state["best_valid"]
        self.bad_evals, self.elapsed = state["bad_evals"], state["elapsed"]
        self.best_step = state.get("best_step", -1)
        self.history = [tuple(h) for h in state["history"]]
        self.train_history = [tuple(h) for h in state.get("train_history", [])]
        if state.get("finished") is not None:
            self.finished = TrainResult.from_dict(state["finished"], self.profile)
        if (path / "optim.safetensors").is_file():
            moments = load_file(str(path / "optim.safetensors"), device=str(self.device))
            params = self.trainable_parameters()
            for key, value in moments.items():
                i, name = key.split(".", 1)
                p = params[int(i)]
                if name == "step" and not self.optimizer.defaults.get("fused"):
                    value = value.cpu()  # unfused AdamW keeps its step counter on the CPU
                self.optimizer.state[p][name] = value
        if (path / "best.safetensors").is_file():
            self.best_state = load_file(str(path / "best.safetensors"), device=str(self.device))
