"""Running the Serve app in the foreground, as ``slmfactory serve`` and ``slmfactory try``
do: Ray up, Serve started on a host and port, the app deployed, then the process waits;
SIGINT and SIGTERM (Ctrl-C, ``kill``) stop it gracefully (``serve.shutdown``, then Ray's).

Separate from the app (``app.py``), which builds what is served, and from the command line,
which parses the flags: this module owns the process's signal handling while it serves.
"""

from __future__ import annotations

import signal
import sys
import time
from typing import Callable

from ray import serve

from slmfactory.platform import runtime


class _ServeStopped(BaseException):
    """A stop signal reached ``slmfactory serve``: Serve and Ray shut down, exit 0. A
    BaseException, as KeyboardInterrupt is: Serve's and Ray's ``except Exception`` blocks
    (a signal can land in ``serve.start`` or ``serve.run``) let it through."""


def _stop_serving_on_signals() -> None:
    """SIGINT and SIGTERM stop the server the way Ctrl-C in a terminal does: the main
    thread unwinds (``serve.shutdown``, then Ray's), and the command exits 0. Installed
    once Ray is up, over what it installed, and before Serve starts (a signal while the
    server starts stops it the same way): Ray's fatal-signal handler takes SIGTERM and
    aborts the process (the shell's "Aborted"); and SIGINT is taken even where it was
    inherited ignored (``slmfactory serve &`` in a script), where ``kill -INT`` did nothing.
    A second signal while shutting down interrupts the shutdown."""

    def stop(signum, _frame):
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        raise _ServeStopped(signal.Signals(signum).name)

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)


def serve_in_foreground(app, host: str, port: int, address: str | None, access_log: bool,
                        after_start: Callable[[str, int], bool] | None = None) -> None:
    """Serve ``app`` on ``host``:``port`` (Ray at ``address``) until a stop signal, which
    shuts Serve and Ray down and returns; ``after_start(host, port)`` runs once the app
    answers and ends the server when it returns True. An interrupt before the handlers are
    up, or a second signal while shutting down, exits 130 (``SystemExit``)."""
    stopping = False
    try:
        with runtime.ray_session(address):
            try:
                _stop_serving_on_signals()
                print(f"serve: starting on http://{host}:{port}/v1", flush=True)
                # The proxy's access log costs each request a synchronous write (docs/serving.md);
                # serving.access_log turns it back on.
                serve.start(http_options={"host": host, "port": port},
                            logging_config={"enable_access_log": access_log})
                serve.run(app, name="slmfactory", route_prefix="/")
                print(f"serving on http://{host}:{port}/v1 (GET /v1/models, POST /v1/completions, "
                      f"POST /v1/score, GET /healthz); Ctrl-C stops", flush=True)
                if after_start is not None and after_start(host, port):
                    return
                while True:
                    time.sleep(3600)
            except _ServeStopped as stopped:
                print(f"serve: stopped ({stopped}); shutting down", flush=True)
            finally:
                stopping = True
                serve.shutdown()
    except (KeyboardInterrupt, _ServeStopped):
        # A server has nothing to resume (main's message for an interrupt is the sweep's).
        print("slmfactory: serve interrupted" + (" while shutting down" if stopping else ""), file=sys.stderr)
        raise SystemExit(130) from None
