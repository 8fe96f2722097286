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


def test_eta_is_flops_left_over_the_measured_rate():
    # 3e12 FLOPs finished in 60 s: 5e10 FLOP/s; 9e12 left -> 180 s.
    assert eta_seconds(3e12, 9e12, 60.0) == pytest.approx(180.0)
    assert eta_seconds(0.0, 9e12, 60.0) is None  # no finished trial: no rate yet
    assert eta_seconds(3e12, 0.0, 60.0) == 0.0
    assert [_clock(s) for s in (None, 0, 59.6, 61, 3600 + 61 * 60)] == ["-", "0m00s", "1m00s", "1m01s", "2h01m"]


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def _replay(log, live=None):
    """Three trials of 1, 2 and 3 TFLOPs (projected); a runs and finishes, b fails, c runs."""
    clock = Clock()
    p = _Progress(3, log, flops={"a": 1e12, "b": 2e12, "c": 3e12}, live=live, clock=clock)
    clock.t += 5  # the shared generic phases ran before the trials: not in the rate
    p.started("a", "slm-legal")
    p.started("b", "slm-code")
    clock.t += 20
    p.finished_ok("a", "slm-legal", 412.345)  # 1e12 in 20 s since the first start
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
        # rate 1e12 / 20 s; left: b (2e12) and c (3e12) -> 100 s
        "[sweep     25s] 1/3 done, 1 running, 1 left; best slm-legal ppl 412.35; ETA 1m40s | finished slm-legal: ppl 412.35",
        # b failed: its FLOPs are neither done nor left; rate 1e12 / 30 s, c's 3e12 left -> 90 s
        "[sweep     35s] 1/3 done, 0 running, 1 left, 1 failed; best slm-legal ppl 412.35; ETA 1m30s | FAILED slm-code: RuntimeError: boom",
        "[sweep     35s] 1/3 done, 1 running, 0 left, 1 failed; best slm-legal ppl 412.35; ETA 1m30s | started slm-bio",
    ]
    clock.t += 30  # between events the ETA follows the clock: 3e12 at 1e12 / 60 s
    assert p.eta() == pytest.approx(180.0)


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
        ["1/3", "1", "0", "1", "412.35  slm-legal", "0m35s", "1m30s"]


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
