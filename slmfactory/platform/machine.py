"""Which machine a device profile was measured on, and whether this is it.

A device profile's rows (``device.throughput``, ``device.throughput_file``) are tokens/s
measured on one machine; every projected device-hour of a plan or a trial is priced by
them. On another machine (another CPU, without the bf16 matrix units, more or fewer cores,
a GPU) they are off by that machine's speed ratio, the same factor everywhere. So a row
can record its ``machine`` (``slmfactory calibrate`` and ``bench/cpu_step.py
--profile-json`` write it): the CPU model and the flags that decide the training path
(AVX-512, AMX, AVX-512-BF16), the cores, the GPU when there is one, the torch version
and the threads it ran with. ``machine_warning`` compares it with :func:`this_machine`;
``slmfactory sweep`` (and ``--dry-run``) prints what it says.
"""

from __future__ import annotations

import os
import platform
import time
from typing import Any

from slmfactory.platform.runtime import cpu_bf16_support

CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")
"""The /proc/cpuinfo flags recorded: the vector and matrix units training's speed turns on
(bf16 matrix units decide ``precision: auto``, ``models/train/execution.py:plan_execution``)."""
IDENTITY = ("gpu", "cpu", "bf16_matrix", "cores")
"""What makes two machines the same device for a profile (compared where the profile
recorded it): the GPU's name, else the CPU model, its bf16 matrix feature and its cores."""


def cpu_model_and_flags() -> tuple[str, set[str]]:
    """The CPU's model name and flags (/proc/cpuinfo on Linux; ``platform.processor()``
    and no flags elsewhere)."""
    model, flags = "", set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name") and not model:
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
                if model and flags:
                    break
    except OSError:
        pass
    return model or platform.processor() or platform.machine() or "unknown CPU", flags


def usable_cores() -> int:
    """CPUs this process may run on (its affinity mask; ``os.cpu_count()`` without one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def this_machine() -> dict[str, Any]:
    """The record a measured row carries: ``cpu``, ``cpu_flags`` (those of ``CPU_FLAGS`` it
    has), ``bf16_matrix`` (``amx_bf16``, ``avx512_bf16`` or ""), ``cores``, ``gpu`` (torch's
    name of CUDA device 0, "" without one), ``torch``, ``threads`` (torch's intra-op
    threads now) and ``measured`` (UTC date and time)."""
    import torch

    model, flags = cpu_model_and_flags()
    return {"cpu": model, "cpu_flags": [f for f in CPU_FLAGS if f in flags], "bf16_matrix": cpu_bf16_support(),
            "cores": usable_cores(), "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "",
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def describe(machine: dict[str, Any]) -> str:
    """One phrase: ``AMD EPYC, 2 cores, bf16 matrix units: avx512_bf16`` (and the GPU)."""
    cpu = f"{machine.get('cpu', 'unknown CPU')}"
    if "cores" in machine:
        cpu += f", {machine['cores']} cores"
    if "bf16_matrix" in machine:
        cpu += f", bf16 matrix units: {machine['bf16_matrix'] or 'none'}"
    return f"GPU {machine['gpu']} ({cpu})" if machine.get("gpu") else cpu


def differences(recorded: dict[str, Any], here: dict[str, Any]) -> list[str]:
    """The ``IDENTITY`` keys on which ``recorded`` (a row's machine) and ``here`` differ.
    A GPU row compares GPU names only (the host CPU hardly moves a GPU's rate); a CPU row
    compares the CPU's model, bf16 matrix feature and cores it recorded, and differs from
    a machine with a GPU (its trials would train there)."""
    if recorded.get("gpu") or here.get("gpu"):
        return [] if recorded.get("gpu") == here.get("gpu") else ["gpu"]
    return [k for k in IDENTITY[1:] if k in recorded and recorded[k] != here.get(k)]


def machine_warning(profile, here: dict[str, Any], recipe: str = "RECIPE") -> str | None:
    """What to say when ``profile`` (a ``DeviceProfile``) was not measured on ``here``
    (:func:`this_machine`), or says nothing of where it was measured; None when every
    measured row records this machine."""
    fix = (f"`slmfactory calibrate -c {recipe}` measures this machine's rows (then set "
           f"device.throughput_file to the file it writes and device.throughput to [])")
    rows = profile.rows()
    if not rows:
        return (f"device profile {profile.name!r} has no measured rows (nominal: peak {profile.peak_flops:.3g} "
                f"FLOP/s at MFU {profile.mfu}), so its projected device-hours are measured on no machine, not on "
                f"this one ({describe(here)}); {fix}")
    unnamed = [r for r in rows if not r.machine]
    if unnamed:
        sources = list(dict.fromkeys(r.source for r in unnamed if r.source))
        said = "; ".join(f'"{s[:120]}"' for s in sources[:3]) + (f" (+{len(sources) - 3} more)" if len(sources) > 3 else "")
        return (f"device profile {profile.name!r} names no machine for {len(unnamed)} of its {len(rows)} rows "
                + (f"(measured on, per their source: {said})" if said else "(and they give no source)")
                + f"; this machine is {describe(here)}: where the two differ, every projected device-hour and "
                f"tokens/s is off by their speed ratio; {fix}")
    other = [(r, differences(r.machine, here)) for r in rows]
    other = [(r, d) for r, d in other if d]
    if not other:
        return None
    seen = list(dict.fromkeys(describe(r.machine) for r, _ in other))
    keys = sorted({k for _, d in other for k in d})
    return (f"device profile {profile.name!r} was measured on another machine ({'; '.join(seen)}), not this one "
            f"({describe(here)}; {', '.join(keys)} differ{'s' if len(keys) == 1 else ''}): its projected device-hours "
            f"and tokens/s are that machine's; {fix}")
