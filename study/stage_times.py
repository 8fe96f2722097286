"""Wall time per stage from a study's log, in either of the two forms the studies wrote:

- every line stamped ``HH:MM:SS`` (the first study's log): ``results.parse_stage_log``;
- unstamped lines between ``== <ISO time>Z <what>`` markers (the second study's log, written by
  the script that starts and restarts it): :func:`parse_marked_log`. Each marker opens a stage
  named by its text that lasts until the next marker; a stage met again (a restart) adds up; a
  marker whose text says the run ended (``done``, ``finished``, ``exit``, ``rc=``) only closes.
  The last stage still open closes at ``end`` (the last trial's end, from the CSV) when given
  and later, else it is reported as still running. Inside the sweep, the clustering and
  resampling steps print their own durations (``(12.3s)``): their sums are listed as parts
  of it, marked as such (they are inside the sweep's time, not beside it).
"""

from __future__ import annotations

import re
from datetime import datetime
from pathlib import Path
from typing import Any

from study import results

_MARKER = re.compile(r"^== (\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ) (.*)$")
_STAMPED = re.compile(r"^\d\d:\d\d:\d\d ")
_ENDS = re.compile(r"\b(done|finished|exit|rc=)", re.I)
_STEP = re.compile(r"^\[(cluster|resample)\] .*\((\d+(?:\.\d+)?)s\)\s*$")
_FINISHED = re.compile(r"^\[sweep\s+\d+s\] .*\| finished ")
_FAILED = re.compile(r"^\[sweep\s+\d+s\] .*\| FAILED ")
_PART = {"cluster": "clustering steps' own timings (inside the sweep)",
         "resample": "resampling steps' own timings (inside the sweep)"}


def _stage_name(text: str) -> str:
    if text.startswith("restarted"):
        return "restart"
    return text.split(" (")[0].strip()


def parse_marked_log(path: Path, end: float | None = None) -> dict[str, Any]:
    stages: dict[str, float] = {}
    parts: dict[str, float] = {}
    open_stage, opened, first, last = None, None, None, None
    attempts = finished = failed = 0
    for line in Path(path).read_text(errors="replace").splitlines():
        line = line.strip()
        finished += bool(_FINISHED.match(line))
        failed += bool(_FAILED.match(line))
        step = _STEP.match(line)
        if step:
            parts[_PART[step[1]]] = parts.get(_PART[step[1]], 0.0) + float(step[2])
        m = _MARKER.match(line)
        if not m:
            continue
        t = datetime.strptime(m[1], "%Y-%m-%dT%H:%M:%SZ").timestamp()
        first = t if first is None else first
        last = t
        if open_stage is not None:
            stages[open_stage] = stages.get(open_stage, 0.0) + t - opened
        name = None if _ENDS.search(m[2]) else _stage_name(m[2])
        attempts += name == "sweep"
        open_stage, opened = name, t
    still = False
    if open_stage is not None:
        if end is not None and end > opened:
            stages[open_stage] = stages.get(open_stage, 0.0) + end - opened
            last = end
        else:
            still = True
    out = [{"stage": k, "seconds": v} for k, v in stages.items() if k != "restart" or v > 0]
    total = sum(s["seconds"] for s in out)
    out += [{"stage": k, "seconds": v} for k, v in parts.items()]
    return {"log": str(path), "stages": out, "total_seconds": total,
            "span_seconds": (last - first) if first is not None else 0, "sweep_attempts": attempts,
            "trials_finished_lines": finished, "trials_failed_lines": failed, "still_running": still}


def parse_log(path: Path, end: float | None = None) -> dict[str, Any]:
    """The stages of a study's log in whichever form it has (see the module's docstring)."""
    text = Path(path).read_text(errors="replace")
    if any(_STAMPED.match(line) for line in text.splitlines()):
        return results.parse_stage_log(path)
    return parse_marked_log(path, end)
