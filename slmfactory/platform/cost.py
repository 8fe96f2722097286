"""Cost accounting in FLOPs, measured seconds and device-hours.

Training FLOPs per token ≈ 6·N + 6·L·T·d (Kaplan et al.: N non-embedding parameters
incl. the output head, plus attention scores over context T); inference ≈ 2·N + 2·L·T·d
per token. Total over N domains: C(N) = C_generic + N · C_specialisation.

Device-hours come two ways: measured wall seconds × workers, and the *projected* hours of
the configured device profile (the paper's unit: A100 GPU-hours), derived from the
stored :class:`Work` on every load, never frozen at run time:

- a model of N parameters runs at the utilisation the profile *measured* for that size
  (``device.throughput``: tokens/s per device by model size; utilisation = tokens/s ·
  c·N / peak with c = 6 for training and 2 for inference, interpolated in log N between
  rows), else at ``device.mfu``. One MFU for every size was the old model: it put the
  SLM and the LLM 6x apart where the paper measured 3.5x (small models use the GPU less).
- parameters a model updates beyond its compute path (slm-pn's projection tensors: the
  whole 1.4B-parameter network is in the optimiser while each token sees a 127M expert)
  cost, every step and on every data-parallel device, one fp32 Adam update read and
  written through device memory plus a ring all-reduce of their gradients.

The device profile itself, a recipe's ``device`` section (:class:`DeviceProfile` and its
measured :class:`Throughput` rows), lives here beside the arithmetic that prices with it;
``config.py`` composes it into ``RunConfig`` (this module does not import config).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from slmfactory.platform.coerce import coerce
from slmfactory.platform.errors import ConfigError, check


def model_flop_terms(model) -> tuple[int, int, int]:
    """(non-embedding params incl. head, n_layers, d_model) of an HF causal LM."""
    cfg = model.config
    n = sum(p.numel() for p in model.parameters())
    emb = model.get_input_embeddings().weight.numel()
    # A tied head shares the embedding matrix but still costs a matmul per token.
    n_compute = n - emb + cfg.vocab_size * cfg.hidden_size
    return n_compute, cfg.num_hidden_layers, cfg.hidden_size


def train_flops_per_token(model, seq_len: int) -> float:
    n, layers, d = model_flop_terms(model)
    return 6.0 * n + 6.0 * layers * seq_len * d


def inference_flops_per_token(model, seq_len: int) -> float:
    n, layers, d = model_flop_terms(model)
    return 2.0 * n + 2.0 * layers * seq_len * d


TRAIN, INFERENCE = "train", "inference"
FLOPS_PER_PARAM = {TRAIN: 6.0, INFERENCE: 2.0}


@dataclass(frozen=True)
class Work:
    """One homogeneous piece of device work: what a device profile turns into hours."""

    kind: str
    """``train`` (forward, backward, update) or ``inference`` (forward only)."""
    tokens: int
    flops: float
    params: float
    """Compute parameters of the model doing it (``model_flop_terms``' N)."""
    steps: int = 0
    optimizer_extra_params: float = 0.0
    """Parameters updated each step beyond the compute path's (slm-pn's T, M, E)."""
    workers: int = 1

    @classmethod
    def of(cls, d: dict) -> "Work":
        return cls(**d)


# -- the device profile: a recipe's ``device`` section, what prices work ------------------

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
        check(self.params > 0, "device.throughput[].params", "> 0", self.params)
        check(self.train_tokens_per_s > 0, "device.throughput[].train_tokens_per_s", "> 0",
              self.train_tokens_per_s)
        check(self.inference_tokens_per_s >= 0, "device.throughput[].inference_tokens_per_s", ">= 0",
              self.inference_tokens_per_s)
        for k, v in self.machine.items():
            check(isinstance(k, str) and (isinstance(v, (str, int, float, bool))
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
        check(self.peak_flops > 0, "device.peak_flops", "> 0", self.peak_flops)
        check(0 < self.mfu <= 1, "device.mfu", "in (0, 1]", self.mfu)
        for key in ("memory_bandwidth", "interconnect_bandwidth", "optimizer_bytes_per_param",
                    "grad_bytes_per_param"):
            check(getattr(self, key) >= 0, f"device.{key}", ">= 0", getattr(self, key))
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
        return tuple(coerce(r, Throughput, f"device.throughput_file[{i}]") for i, r in enumerate(data))
    except ConfigError as e:
        raise ConfigError(f"{e} (in {path})") from None


def utilisation(profile, params: float, kind: str) -> float:
    """Model FLOP utilisation of a ``params``-parameter model on ``profile``: the measured
    rows' (tokens/s · c·N / peak), linear in log N between rows and flat beyond them;
    ``profile.mfu`` when nothing was measured."""
    import math

    rows = [(r.params, r.train_tokens_per_s if kind == TRAIN else (r.inference_tokens_per_s or 3.0 * r.train_tokens_per_s))
            for r in profile.rows()]
    if not rows or params <= 0:
        return profile.mfu
    c = FLOPS_PER_PARAM[kind]
    points = [(math.log(n), tps * c * n / profile.peak_flops) for n, tps in rows]
    x = math.log(params)
    if x <= points[0][0]:
        return points[0][1]
    for (x0, u0), (x1, u1) in zip(points, points[1:]):
        if x <= x1:
            return u0 + (u1 - u0) * (x - x0) / (x1 - x0)
    return points[-1][1]


def device_seconds(work: Work, profile) -> float:
    """Projected device-seconds of ``work`` (summed over its data-parallel workers)."""
    if profile.rows() and work.params > 0:
        # Measured rows price tokens: attention and all the FLOP count leaves out are inside
        # the measured tokens/s (at the context they were measured at).
        compute = (work.tokens * FLOPS_PER_PARAM[work.kind] * work.params
                   / (profile.peak_flops * utilisation(profile, work.params, work.kind)))
    else:
        compute = work.flops / (profile.peak_flops * profile.mfu)
    if work.kind != TRAIN or work.optimizer_extra_params <= 0 or work.steps <= 0:
        return compute
    # Per step, every worker updates the extra parameters (memory-bound) and the ring
    # all-reduce moves 2(w-1)/w of their gradients; every worker waits for both.
    per_step = 0.0
    if profile.memory_bandwidth:
        per_step += work.optimizer_extra_params * profile.optimizer_bytes_per_param / profile.memory_bandwidth
    if profile.interconnect_bandwidth and work.workers > 1:
        per_step += (2.0 * (work.workers - 1) / work.workers * work.optimizer_extra_params
                     * profile.grad_bytes_per_param / profile.interconnect_bandwidth)
    return compute + work.steps * per_step * work.workers


def projected_tokens_per_s(profile, params: float, flops_per_token: float) -> float:
    """Training tokens/s of one device the profile projects for a model of ``params``
    compute parameters and ``flops_per_token`` (what ``device_seconds`` prices its tokens at:
    the measured rows' rate at that size, interpolated, else peak x MFU)."""
    work = Work(TRAIN, 1_000_000, 1_000_000 * flops_per_token, params)
    return work.tokens / device_seconds(work, profile)


def measured_vs_projected(cost: "CostRecord", profile) -> dict | None:
    """How a finished training phase's measured rate compares with ``profile``'s projection
    of the same work: ``tokens`` (trained), ``params`` (the trained models' compute
    parameters), ``measured`` and ``projected`` training tokens/s (wall time: the
    projection's device-seconds over the phase's data-parallel workers) and ``ratio``
    (measured / projected: below 1 this machine is slower than the profile says, and
    every projected device-hour is short by that factor). None without training work or
    wall time."""
    work = [Work.of(w) for w in cost.work]
    train = [w for w in work if w.kind == TRAIN]
    if not train or cost.wall_seconds <= 0:
        return None
    tokens = sum(w.tokens for w in train)
    projected_s = sum(device_seconds(w, profile) / max(1, w.workers) for w in work)
    if projected_s <= 0:
        return None
    return {"tokens": tokens, "params": sorted({w.params for w in train}), "measured": tokens / cost.wall_seconds,
            "projected": tokens / projected_s, "ratio": projected_s / cost.wall_seconds,
            "wall_seconds": cost.wall_seconds, "projected_seconds": projected_s}


def merge_extra(a: dict, b: dict) -> dict:
    """Two records' ``extra`` as one (``CostRecord.extra``): a key in both is summed when
    both values are numbers, kept when they are equal, else its values joined with ``+``."""
    out = dict(a)
    for key, value in b.items():
        if key not in out:
            out[key] = value
        elif _is_number(out[key]) and _is_number(value):
            out[key] = out[key] + value
        elif out[key] != value:
            out[key] = f"{out[key]}+{value}"
    return out


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class CostRecord:
    """What one phase (generic pretraining, specialisation, teacher inference…) cost."""

    phase: str
    tokens: int = 0
    flops: float = 0.0
    wall_seconds: float = 0.0
    workers: int = 1
    device: str = "cpu"
    device_hours: float = 0.0
    """Projected with the device profile from ``work`` (comparable across machines)."""
    measured_device_hours: float = 0.0
    """wall_seconds · workers / 3600 (what this machine actually spent)."""
    work: list = field(default_factory=list)
    """The :class:`Work` items (as dicts) the projection is derived from."""
    extra: dict = field(default_factory=dict)
    """What else the phase recorded: counts (an embedding's ``windows``), added up like
    ``tokens`` when records are added, and labels (a training phase's
    ``<phase>.precision_used``), kept when they agree and joined with ``+`` (as ``phase``
    is) when they do not."""

    @classmethod
    def of(cls, phase: str, work: list[Work] | Work, wall_seconds: float, profile, workers: int = 1,
           **extra) -> "CostRecord":
        work = [work] if isinstance(work, Work) else list(work)
        rec = cls(phase=phase, tokens=int(sum(w.tokens for w in work)), flops=float(sum(w.flops for w in work)),
                  wall_seconds=float(wall_seconds), workers=workers,
                  work=[asdict(w) for w in work], extra=dict(extra))
        return rec.rebased(profile)

    def rebased(self, profile) -> "CostRecord":
        """The same work under ``profile``: device-hours are derived from the stored work
        (and measured seconds) under today's device profile, never frozen at run time.
        A record without work items (older stores) falls back to its FLOPs at ``mfu``."""
        if self.work:
            hours = sum(device_seconds(Work.of(w), profile) for w in self.work) / 3600.0
        else:
            hours = self.flops / (profile.peak_flops * profile.mfu) / 3600.0
        return dataclasses.replace(self, device=profile.name, device_hours=hours,
                                   measured_device_hours=self.wall_seconds * self.workers / 3600.0)

    def __add__(self, other: "CostRecord") -> "CostRecord":
        return CostRecord(phase=f"{self.phase}+{other.phase}", tokens=self.tokens + other.tokens,
                          flops=self.flops + other.flops, wall_seconds=self.wall_seconds + other.wall_seconds,
                          workers=max(self.workers, other.workers), device=self.device,
                          device_hours=self.device_hours + other.device_hours,
                          measured_device_hours=self.measured_device_hours + other.measured_device_hours,
                          work=self.work + other.work, extra=merge_extra(self.extra, other.extra))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, profile=None) -> "CostRecord":
        """Rebuild a stored record; with ``profile``, its device-hours under that profile."""
        rec = cls(**d)
        return rec.rebased(profile) if profile is not None else rec

    def line(self) -> str:
        return (f"{self.phase:<24} tokens {self.tokens:>12,}  FLOPs {self.flops:9.3e}  "
                f"wall {self.wall_seconds:8.1f}s  {self.device} hours {self.device_hours:.4f} "
                f"(measured {self.measured_device_hours:.4f})")


def total_cost(generic_flops: float, spec_flops: float, n_domains: int) -> float:
    """C(N) = C_generic + N · C_specialisation."""
    return generic_flops + n_domains * spec_flops


# -- cost conventions ---------------------------------------------------------------------
#
# Who pays for embedding the generic corpus (the clustering that slm-is, slm-mix and slm-pn
# read)? The paper counts it as nobody's cost: its SentenceBERT is a fifth of its SLM and it
# sets C_generic(slm-is) = 0. Measured, it is everything the platform spent; at a scale where
# the embedder is far larger than the model, it decides every comparison at small N. Both are
# reported, each named; claims are decided under ``paper`` with ``measured`` beside it. A
# domain's own embedding is specialisation cost under both: it is spent when the domain's
# data arrive, once per domain.

PAPER, MEASURED = "paper", "measured"
COST_CONVENTIONS = (PAPER, MEASURED)
CONVENTION_DOC = {
    PAPER: "embedding the generic corpus is nobody's cost (as in the paper, C_generic(slm-is) = 0); a "
           "domain's own embedding is charged to its specialisation",
    MEASURED: "everything spent, the generic corpus's embedding included in the generic cost of every "
              "strategy that clusters it",
}


def check_convention(convention: str, flag: str = "--costs") -> str:
    """``convention`` when it is one of :data:`COST_CONVENTIONS`, else a one-line error naming ``flag``."""
    from slmfactory.platform.errors import SlmFactoryError

    if convention not in COST_CONVENTIONS:
        raise SlmFactoryError(f"{flag} {convention!r}: expected one of {', '.join(COST_CONVENTIONS)}")
    return convention


def generic_under(convention: str, generic: float, embed_generic: float) -> float:
    """The generic cost under ``convention``: measured as logged, or (``paper``) without the
    generic corpus's embedding it contains (never below 0)."""
    check_convention(convention)
    return generic if convention == MEASURED else max(0.0, generic - embed_generic)


# -- serving: measured tokens/s priced per million tokens ---------------------------------
#
# What serving a model costs is not its parameter count but its tokens/s on the device that
# serves it. Each exported model's rates are measured once (``models/train/serving_rate.py``, in
# the EXPORT stage) for the two things the API does: scoring (``/v1/score``: one forward pass
# over the text) and generation (``/v1/completions``: one forward per new token). A million
# tokens at r tokens/s take 1e6 / r device-seconds; the price is those hours times
# ``serving.price_per_device_hour``, applied when read (never frozen into a run).

SERVING_TASKS = ("generate", "score")
"""What a served model's rates are measured for: generation (``/v1/completions``, one stream)
and scoring (``/v1/score``, batched forward passes)."""
MILLION = 1_000_000


def device_hours_per_million(tokens_per_s: float) -> float:
    """Device-hours one device spends on a million tokens at ``tokens_per_s``."""
    if not tokens_per_s > 0:
        raise ValueError(f"tokens_per_s: expected > 0, got {tokens_per_s!r}")
    return MILLION / tokens_per_s / 3600.0


@dataclass(frozen=True)
class ServingRates:
    """A served model's measured tokens/s per task (:data:`SERVING_TASKS`) and the machine
    they were measured on (``platform.machine.this_machine``: CPU, cores, GPU, torch threads,
    date); what a model folder's ``slmfactory.json`` holds under ``serving_rates``."""

    generate_tokens_per_s: float
    score_tokens_per_s: float
    machine: dict = field(default_factory=dict)
    how: dict = field(default_factory=dict)
    """How they were measured: batch and token counts, seconds, passes (``serving_rate``)."""

    def tokens_per_s(self, task: str) -> float:
        return self.generate_tokens_per_s if check_task(task) == "generate" else self.score_tokens_per_s

    def device_hours_per_million(self, task: str) -> float:
        return device_hours_per_million(self.tokens_per_s(task))

    def price_per_million(self, task: str, price_per_device_hour: float) -> float:
        return self.device_hours_per_million(task) * price_per_device_hour

    def view(self, price_per_device_hour: float = 0.0) -> dict:
        """What ``/v1/models`` and ``recommend`` show: per task its tokens/s, device-hours per
        million tokens and (with a price per device-hour) the price per million tokens, and
        the machine the rates were measured on."""
        from slmfactory.platform.machine import describe

        tasks = {}
        for task in SERVING_TASKS:
            row = {"tokens_per_s": round(self.tokens_per_s(task), 3),
                   "device_hours_per_million_tokens": self.device_hours_per_million(task)}
            if price_per_device_hour > 0:
                row["price_per_million_tokens"] = self.price_per_million(task, price_per_device_hour)
            tasks[task] = row
        return {**tasks, "price_per_device_hour": price_per_device_hour or None,
                "measured_on": describe(self.machine) if self.machine else "unknown machine",
                "measured_at": self.machine.get("measured", ""), "threads": self.machine.get("threads")}

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def of(cls, d: dict | None) -> "ServingRates | None":
        """From ``to_dict``'s form; None for None or a dict without both positive rates."""
        if not isinstance(d, dict):
            return None
        try:
            rates = cls(float(d["generate_tokens_per_s"]), float(d["score_tokens_per_s"]),
                        dict(d.get("machine") or {}), dict(d.get("how") or {}))
        except (KeyError, TypeError, ValueError):
            return None
        return rates if rates.generate_tokens_per_s > 0 and rates.score_tokens_per_s > 0 else None


def check_task(task: str, flag: str = "task") -> str:
    """``task`` when it is one of :data:`SERVING_TASKS`, else a one-line error naming ``flag``."""
    from slmfactory.platform.errors import SlmFactoryError

    if task not in SERVING_TASKS:
        raise SlmFactoryError(f"{flag} {task!r}: expected one of {', '.join(SERVING_TASKS)}")
    return task
