"""``slmfactory sweep``'s progress (``_Progress``): the ETA arithmetic, the plain line log a
non-terminal (CI, a pipe) gets, and the ``rich`` live table a terminal gets. No Ray, no
training: the Tune callback's events are replayed on a fake clock, so every number is exact."""

from __future__ import annotations

import io
import os
import pty
import subprocess
import sys

import pytest

from slmfactory.sweeps.run import _clock, _Progress, eta_seconds

from .conftest import REPO


def test_eta_from_projected_flops_and_the_measured_rate():
    spf = 2e-11  # measured: 20 s for a 1e12-FLOP trial
    assert eta_seconds(None, [30.0], [1e12], 2) is None  # no finished trial: no rate yet
    assert eta_seconds(spf, [], [], 2) == 0.0
    # Two slots, one trial running with 20 s to go; 3e12 FLOPs (60 s) not started: it takes
    # the free slot now and ends last.
    assert eta_seconds(spf, [20.0], [3e12], 2) == pytest.approx(60.0)
    # One slot: it waits for the running one.
    assert eta_seconds(spf, [20.0], [3e12], 1) == pytest.approx(80.0)
    # Three 1e12 trials on two slots (20 s each): 20 + 20; a running trial past its projected
    # time counts as finishing now, not negative.
    assert eta_seconds(spf, [-5.0], [1e12, 1e12, 1e12], 2) == pytest.approx(40.0)
    assert [_clock(s) for s in (None, 0, 59.6, 61, 3600 + 61 * 60)] == ["-", "0m00s", "1m00s", "1m01s", "2h01m"]


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def _replay(log, live=None):
    """Three trials of 1, 2 and 3 TFLOPs (projected); a runs and finishes, b fails, c runs."""
    clock = Clock()
    p = _Progress(3, log, flops={"a": 1e12, "b": 2e12, "c": 3e12}, slots=2, live=live, clock=clock)
    clock.t += 5  # the shared generic phases ran before the trials: not in the rate
    p.started("a", "slm-legal")
    p.started("b", "slm-code")
    clock.t += 20
    p.finished_ok("a", "slm-legal", 412.345)  # 1e12 FLOPs in 20 s: 2e-11 s per FLOP
    clock.t += 10
    p.errored("b", "slm-code", "RuntimeError: boom")
    p.started("c", "slm-bio")
    return p, clock


def test_plain_lines_and_eta_from_projected_flops():
    lines = []
    p, clock = _replay(lines.append, live=False)
    assert lines == [
        "[sweep      5s] 0/3 done, 1 running, 2 left | started slm-legal",
        "[sweep      5s] 0/3 done, 2 running, 1 left | started slm-code",
        # b (2e12: 40 s, 20 s run) has 20 s to go; c (3e12: 60 s) takes the free slot: 60 s
        "[sweep     25s] 1/3 done, 1 running, 1 left; best slm-legal ppl 412.35; ETA 1m00s | finished slm-legal: ppl 412.35",
        # b failed (its FLOPs are neither a rate nor work left); c alone: 60 s
        "[sweep     35s] 1/3 done, 0 running, 1 left, 1 failed; best slm-legal ppl 412.35; ETA 1m00s | FAILED slm-code: RuntimeError: boom",
        "[sweep     35s] 1/3 done, 1 running, 0 left, 1 failed; best slm-legal ppl 412.35; ETA 1m00s | started slm-bio",
    ]
    clock.t += 45  # between events the ETA follows the clock: c has run 45 of its 60 s
    assert p.eta() == pytest.approx(15.0)


def test_not_a_terminal_prints_plain_lines_only(capsys):
    # The default (live=None) decides by stdout: pytest's captured stdout is no terminal, as CI's.
    p, _ = _replay(print)
    assert p._live is None
    p.close()
    out = capsys.readouterr().out
    assert "\x1b" not in out and "━" not in out and "│" not in out  # no escape codes, no table
    assert out.count("\n") == 5 and out.splitlines()[2].endswith("finished slm-legal: ppl 412.35")


def test_live_table_contents():
    from rich.console import Console

    p, _ = _replay(None, live=False)
    buf = io.StringIO()
    Console(file=buf, width=160, force_terminal=False).print(p)
    text = buf.getvalue()
    header, row = [line for line in text.splitlines() if "│" in line or "┃" in line][:2]
    assert [c.strip() for c in header.strip("┃ ").split("┃")] == \
        ["done", "running", "left", "failed", "best so far (ppl_macro)", "elapsed", "ETA"]
    assert [c.strip() for c in row.strip("│ ").split("│")] == \
        ["1/3", "1", "0", "1", "412.35  slm-legal", "0m35s", "1m00s"]


def test_terminal_gets_the_live_table():
    """On a real pseudo-terminal the table is drawn (and the event lines still printed)."""
    code = ("from slmfactory.sweeps.run import _Progress\n"
            "p = _Progress(2, print, flops={'a': 1.0, 'b': 1.0})\n"
            "assert p._live is not None\n"
            "import pickle; assert pickle.loads(pickle.dumps(p))._live is None  # Tune pickles callbacks\n"
            "p.started('a', 'slm-legal'); p.finished_ok('a', 'slm-legal', 300.0); p.close()\n")
    leader, follower = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=follower, stderr=subprocess.PIPE, cwd=REPO,
                            env={**os.environ, "COLUMNS": "160", "TERM": "xterm"})
    os.close(follower)
    out = b""
    while True:  # read until the child closes the terminal (EIO on Linux)
        try:
            chunk = os.read(leader, 65536)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    os.close(leader)
    assert proc.wait(timeout=60) == 0, proc.stderr.read().decode()
    text = out.decode(errors="replace")
    assert "finished slm-legal: ppl 300.00" in text
    assert "best so far (ppl_macro)" in text and "300.00  slm-legal" in text and "┃" in text


def test_default_loggers_pickle_after_ray_patches_print(monkeypatch):
    """Ray Data's progress bars (tqdm_ray) and Train V2's log capture replace
    ``builtins.print`` in the process that runs them. A sweep's callbacks (which Tune
    pickles into its experiment state) and launchers hold the driver's logger; when that was
    ``print`` itself, a demo whose driver had just run a Ray Data stage died at the sweep's
    start with "Can't pickle <built-in function print>". Every default logger pickles
    whatever ``builtins.print`` is, and still prints through it."""
    import builtins
    import inspect
    import pickle

    import cloudpickle

    from slmfactory.demo import run_demo
    from slmfactory.models.train.calibration import calibrate
    from slmfactory.models.train.distributed import make_launcher
    from slmfactory.models.train.trainer import Trainer
    from slmfactory.pipeline import ensure_corpus, run_strategy, run_trial
    from slmfactory.sweeps.run import run_sweep

    seen: list[str] = []
    original = builtins.print

    def patched_print(*args, **kwargs):  # what tqdm_ray's safe_print does: print, then redraw
        seen.append(" ".join(map(str, args)))
        original(*args, **kwargs)

    monkeypatch.setattr(builtins, "print", patched_print)
    defaults = {f.__qualname__: inspect.signature(f).parameters["log"].default
                for f in (run_demo, calibrate, make_launcher, Trainer.__init__, ensure_corpus, run_strategy,
                          run_trial, run_sweep)}
    for name, log in defaults.items():
        assert log is not print or print is patched_print, name
        for dumps in (pickle.dumps, cloudpickle.dumps):
            pickle.loads(dumps(log))  # raised PicklingError for `print` before
    progress = _Progress(2, defaults["run_sweep"], flops={"a": 1.0, "b": 1.0})
    restored = pickle.loads(pickle.dumps(progress))
    restored.started("a", "slm-legal")
    assert any("started slm-legal" in line for line in seen)
