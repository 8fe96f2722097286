"""A real Ray cluster on this machine (loopback), the services a shared cluster runs beside
it, and the serving app on loopback:

- :func:`ray_cluster` / :func:`local_cluster`: ``ray start --head`` plus ``ray start
  --address`` (two nodes), token auth on; optionally the GCS backed by an external Redis
  (GCS fault tolerance), with a handle to kill and restart the head's GCS process;
- :func:`postgres_server`: a PostgreSQL instance of Debian's ``postgresql`` package in a temp
  dir (``initdb`` + ``pg_ctl``, as the ``postgres`` user when run as root: PostgreSQL
  refuses root), on a free loopback port, with a password;
- :func:`redis_server`: Debian's ``redis-server`` on a free loopback port, a password, no
  persistence;
- :class:`MlflowServer`: ``mlflow server`` on a backend store, killable and restartable on
  the same port;
- :class:`TrackingProxy`: an HTTP proxy in front of it that forwards every request and,
  on the requests a rule picks, loses the reply (the server did the work, the client never
  hears back) or holds it until the test releases it.

Teardown stops only the processes these started (by their temp dirs, then their children,
by pid) — ``ray stop`` would also kill every other Ray session on the machine.
"""

from __future__ import annotations

import glob
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import pytest

RAY_BIN = Path(sys.executable).with_name("ray")


#: Where :func:`free_port` looks: above Ray's worker ports (10002-19999 by default) and below
#: the kernel's ephemeral range (Linux: 32768-60999, ``ip_local_port_range``).
TEST_PORTS = range(20000, 32768)


def _ephemeral_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A loopback TCP port free now, for a server a test starts a moment later. Outside the
    kernel's ephemeral range: a port the kernel hands out (bind to 0) can be given, before
    that server binds it, to any process's outgoing connection (a Serve proxy once failed to
    bind a port picked before its cluster started); these are only ever taken by an explicit
    bind. Falls back to the kernel's choice where the ephemeral range leaves no room."""
    ports = [p for p in TEST_PORTS if p < _ephemeral_start()]
    random.shuffle(ports)
    for port in ports[:200]:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_mine(temp_dirs: list[str]) -> None:
    """Terminate the processes whose command line names one of ``temp_dirs`` (the
    nodes' GCS, raylets, agents) and their children (the workers), by pid."""
    import psutil

    me = os.getpid()
    roots = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            cmd = p.info["cmdline"] or []
        except psutil.Error:
            continue
        if p.pid != me and any(any(t in a for t in temp_dirs) for a in cmd):
            roots.append(p)
    procs: dict[int, psutil.Process] = {}
    for p in roots:
        procs[p.pid] = p
        try:
            for c in p.children(recursive=True):
                if c.pid != me:
                    procs[c.pid] = c
        except psutil.Error:
            pass
    for p in procs.values():
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(list(procs.values()), timeout=15)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass


@dataclass
class Redis:
    address: str
    """``127.0.0.1:PORT``"""
    password: str


@dataclass
class Cluster:
    address: str
    """The GCS address (``ray.init(address=...)``, ``ray start --address``)."""
    dashboard: str | None
    """The dashboard URL (``ray job submit --address``), or None without one."""
    head_dir: str
    worker_dirs: list[str] = field(default_factory=list)

    def driver_log(self, submission_id: str) -> Path | None:
        """The log of a submitted job's driver on the head (what ``ray job logs`` prints)."""
        found = glob.glob(os.path.join(self.head_dir, "session_*", "logs", f"job-driver-{submission_id}.log"))
        return Path(found[0]) if found else None

    def gcs_process(self):
        """The head's ``gcs_server`` process (psutil)."""
        import psutil

        for p in psutil.process_iter(["cmdline"]):
            cmd = p.info["cmdline"] or []
            if cmd and os.path.basename(cmd[0]) == "gcs_server" and any(self.head_dir in a for a in cmd):
                return p
        raise AssertionError(f"no gcs_server process of the cluster in {self.head_dir}")

    def kill_gcs(self) -> Callable[[], None]:
        """SIGKILL the head's GCS process (what a crashed or evicted head container does to it);
        returns the function that starts it again with the same command line and environment,
        as a restarted head container would."""
        gcs = self.gcs_process()
        cmd, env, cwd = gcs.cmdline(), gcs.environ(), gcs.cwd()
        gcs.kill()
        gcs.wait(30)

        def restart() -> None:
            subprocess.Popen(cmd, env=env, cwd=cwd, start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return restart


def ray_env() -> dict[str, str]:
    """The environment of every Ray command and driver here: token authentication on (the
    head writes/reads ~/.ray/auth_token; the joining node, drivers and ``ray job`` send it)."""
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="token")
    env.pop("RAY_ADDRESS", None)
    return env


def _ray_bin() -> str:
    if not RAY_BIN.is_file() and shutil.which("ray") is None:
        pytest.skip("the `ray` command is not installed, so `ray start` cannot make a cluster")
    return str(RAY_BIN if RAY_BIN.is_file() else shutil.which("ray"))


@contextmanager
def ray_cluster(dashboard: bool = False, cpus_per_node: int = 1, nodes: int = 2,
                redis: Redis | None = None, head_cpus: int | None = None,
                env_vars: dict[str, str] | None = None) -> Iterator[Cluster]:
    """A Ray cluster on loopback: ``ray start --head`` plus ``nodes - 1`` ``ray start
    --address``, each with its own temp dir and ``cpus_per_node`` CPUs, token authentication
    on. ``redis``: the head's GCS keeps its tables in that Redis (``RAY_REDIS_ADDRESS`` and
    ``--redis-password``, as Ray documents for ``ray start``), so a restarted GCS recovers them.
    ``head_cpus``: the head's CPUs instead (0: as the RayService's head, which runs no replica
    or task); ``env_vars``: more environment for every node's processes (Ray's settings)."""
    ray_bin = _ray_bin()
    env = {**ray_env(), **(env_vars or {})}
    # Short paths: Ray puts Unix sockets under the temp dir (108-byte limit).
    t_head = tempfile.mkdtemp(prefix="slmf-rh-", dir="/tmp")
    t_work = [tempfile.mkdtemp(prefix="slmf-rw-", dir="/tmp") for _ in range(nodes - 1)]
    port = free_port()
    dash_port = free_port() if dashboard else None
    common = ["--node-ip-address=127.0.0.1", "--disable-usage-stats"]
    cpus = [f"--num-cpus={cpus_per_node}"]
    head_cpu = [f"--num-cpus={cpus_per_node if head_cpus is None else head_cpus}"]

    def own_ports() -> list[str]:
        # Each node's agents on free ports: the defaults (52365 ...) collide with the other
        # node, and with any other Ray instance on the machine ("No available agent").
        return [f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
                f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}"]
    dash = ["--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash_port}"] \
        if dashboard else ["--include-dashboard=false"]
    head_env, ft = dict(env), []
    if redis is not None:
        head_env["RAY_REDIS_ADDRESS"] = redis.address
        ft = [f"--redis-password={redis.password}"]
    try:
        head = subprocess.run([ray_bin, "start", "--head", f"--port={port}", f"--temp-dir={t_head}", *dash, *common,
                               *head_cpu, *ft, *own_ports()],
                              capture_output=True, text=True, env=head_env, timeout=180)
        assert head.returncode == 0, f"ray start --head failed:\n{head.stdout[-2000:]}\n{head.stderr[-2000:]}"
        for t in t_work:
            work = subprocess.run([ray_bin, "start", f"--address=127.0.0.1:{port}", f"--temp-dir={t}", *common,
                                   *cpus, *own_ports()],
                                  capture_output=True, text=True, env=env, timeout=180)
            assert work.returncode == 0, f"ray start --address failed:\n{work.stdout[-2000:]}\n{work.stderr[-2000:]}"
        yield Cluster(f"127.0.0.1:{port}", f"http://127.0.0.1:{dash_port}" if dashboard else None, t_head, t_work)
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        stop_mine([t_head, *t_work])
        for t in [t_head, *t_work]:
            shutil.rmtree(t, ignore_errors=True)


@contextmanager
def local_cluster(dashboard: bool = False, cpus_per_node: int = 1) -> Iterator[tuple[str, str | None]]:
    """A two-node Ray cluster on loopback (:func:`ray_cluster`). Yields (GCS address,
    dashboard URL or None: ``ray job submit`` talks to the dashboard)."""
    with ray_cluster(dashboard, cpus_per_node) as c:
        yield c.address, c.dashboard


# -- the services beside it ---------------------------------------------------------------------

def _wait(ready: Callable[[], bool], timeout: float, what: str, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            tail = log.read_text(errors="replace")[-3000:] if log is not None and log.is_file() else ""
            raise AssertionError(f"{what} did not come up in {timeout:.0f} s\n{tail}")
        time.sleep(0.2)


def _pg_bin(name: str) -> str | None:
    """A PostgreSQL server binary: on PATH, else Debian's /usr/lib/postgresql/<version>/bin."""
    found = shutil.which(name)
    if found:
        return found
    for d in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda d: int(d.split("/")[-2]), reverse=True):
        if os.access(os.path.join(d, name), os.X_OK):
            return os.path.join(d, name)
    return None


@contextmanager
def postgres_server() -> Iterator[str]:
    """A PostgreSQL server (``initdb`` in a temp dir, ``pg_ctl start`` on a free loopback port,
    user ``mlflow`` with a password, database ``mlflow``), stopped and deleted after. Yields
    its SQLAlchemy URI, ``postgresql://mlflow:PASSWORD@127.0.0.1:PORT/mlflow`` (the
    psycopg driver: SQLAlchemy 2.1's default for ``postgresql://``)."""
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if initdb is None or pg_ctl is None:
        pytest.skip("PostgreSQL is not installed (`make services` installs Debian's postgresql)")
    # PostgreSQL refuses to run as root: as root, run it as Debian's `postgres` user.
    as_user: list[str] = []
    if os.geteuid() == 0:
        import pwd

        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no `postgres` user to run PostgreSQL as")
        as_user = ["runuser", "-u", "postgres", "--"]
    tmp = Path(tempfile.mkdtemp(prefix="slmf-pg-", dir="/tmp"))
    data, log, password, port = tmp / "data", tmp / "server.log", secrets.token_hex(12), free_port()
    (tmp / "pw").write_text(password)
    if as_user:
        for f in (tmp, tmp / "pw"):
            os.chown(f, owner.pw_uid, owner.pw_gid)

    def run(*cmd: str) -> None:
        r = subprocess.run([*as_user, *cmd], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
    started = False
    try:
        run(initdb, "-D", str(data), "-U", "mlflow", f"--pwfile={tmp / 'pw'}", "--auth-host=scram-sha-256",
            "--auth-local=trust", "-E", "UTF8", "--no-sync", "--no-instructions")
        # The tests exercise concurrency and restarts of the tracking server, not PostgreSQL's
        # own durability: no fsync, so a 2-core machine's disk is not the bottleneck.
        opts = (f"-p {port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={tmp} "
                "-c fsync=off -c synchronous_commit=off -c full_page_writes=off")
        run(pg_ctl, "-D", str(data), "-l", str(log), "-o", opts, "-w", "-t", "120", "start")
        started = True
        run(str(Path(initdb).resolve().with_name("createdb")), "-h", str(tmp), "-p", str(port), "-U", "mlflow", "mlflow")
        yield f"postgresql://mlflow:{password}@127.0.0.1:{port}/mlflow"
    finally:
        if started:
            subprocess.run([*as_user, pg_ctl, "-D", str(data), "-m", "immediate", "-w", "stop"],
                           capture_output=True, timeout=120)
        shutil.rmtree(tmp, ignore_errors=True)


def _redis_ping(port: int, password: str) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            s.sendall(f"AUTH {password}\r\nPING\r\n".encode())
            got = b""
            while b"PONG" not in got and len(got) < 200:
                chunk = s.recv(200)
                if not chunk:
                    break
                got += chunk
            return b"PONG" in got
    except OSError:
        return False


@contextmanager
def redis_server() -> Iterator[Redis]:
    """Debian's ``redis-server`` on a free loopback port with a password, no persistence
    (``--save ""``, no AOF), in a temp dir; stopped after."""
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.skip("redis-server is not installed (`make services` installs Debian's redis-server)")
    tmp = Path(tempfile.mkdtemp(prefix="slmf-redis-", dir="/tmp"))
    port, password = free_port(), secrets.token_hex(12)
    log = tmp / "redis.log"
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--requirepass", password,
                             "--save", "", "--appendonly", "no", "--dir", str(tmp), "--logfile", str(log)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait(lambda: proc.poll() is None and _redis_ping(port, password), 30, "redis-server", log)
        yield Redis(f"127.0.0.1:{port}", password)
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(tmp, ignore_errors=True)


class MlflowServer:
    """``mlflow server`` on ``backend`` (a database URI), artifacts proxied to ``artifacts``,
    on a free loopback port that stays the same across :meth:`kill` and :meth:`start`."""

    def __init__(self, backend: str, artifacts: Path, log: Path):
        self.backend, self.artifacts, self.log = backend, artifacts, log
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def start(self, timeout: float = 180) -> None:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", self.backend,
               "--artifacts-destination", str(self.artifacts), "--serve-artifacts",
               "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"]
        with open(self.log, "a") as out:  # its own session: kill() takes its workers too
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                         env=dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true"))
        _wait(lambda: self.proc.poll() is None and self.healthy(), timeout, "mlflow server", self.log)

    def _signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, sig)
                self.proc.wait(30)
            except ProcessLookupError:
                pass
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(30)

    def kill(self) -> None:
        """SIGKILL the server and its workers: a crash, no graceful shutdown."""
        self._signal(signal.SIGKILL)
        _wait(lambda: not self.healthy(), 10, "the killed server's port closing")

    def stop(self) -> None:
        self._signal(signal.SIGTERM)


class TrackingProxy:
    """A loopback HTTP proxy in front of ``target`` (an MLflow server's URL), in a thread of
    this process. Every request is forwarded and answered, except:

    - ``drop(rule)``: the first request ``rule(method, path, body_json)`` accepts is forwarded
      (the server does the work) and its connection closed without a reply, as when the
      server dies after committing or a load balancer drops the connection; MLflow's client
      then retries it;
    - ``hold(rule)``: the first request ``rule`` accepts is forwarded, and its reply held
      until :meth:`release` (``held`` is set meanwhile, ``held_body`` is its request), so a
      test reads the server's state while the client waits at a known point.

    ``dropped`` counts the replies lost."""

    def __init__(self, target: str):
        import http.server
        import threading

        self.target = target.rstrip("/")
        self.port = free_port()
        self.dropped = 0
        self.held, self._release = threading.Event(), threading.Event()
        self.held_body: dict | None = None
        self._drop: list[Callable] = []
        self._hold: list[Callable] = []
        self._lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = b""
                    while True:
                        size = int(self.rfile.readline().strip() or b"0", 16)
                        if size == 0:
                            self.rfile.readline()
                            return out
                        out += self.rfile.read(size)
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _forward(self) -> None:
                import http.client
                import json
                from urllib.parse import urlsplit

                body = self._body()
                try:
                    parsed = json.loads(body) if body and body[:1] == b"{" else {}
                except ValueError:
                    parsed = {}
                with proxy._lock:
                    drop = next((r for r in proxy._drop if r(self.command, self.path, parsed)), None)
                    if drop is not None:
                        proxy._drop.remove(drop)
                    hold = None if drop else next((r for r in proxy._hold if r(self.command, self.path, parsed)), None)
                    if hold is not None:
                        proxy._hold.remove(hold)
                url = urlsplit(proxy.target)
                conn = http.client.HTTPConnection(url.hostname, url.port, timeout=300)
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("host", "content-length", "transfer-encoding", "connection")}
                conn.request(self.command, self.path, body=body, headers=headers)
                reply = conn.getresponse()
                data = reply.read()
                conn.close()
                if drop is not None:
                    proxy.dropped += 1
                    self.close_connection = True
                    self.connection.shutdown(2)  # the reply is lost: the client sees the connection end
                    return
                if hold is not None:
                    proxy.held_body = parsed
                    proxy.held.set()
                    proxy._release.wait(120)
                self.send_response(reply.status, reply.reason)
                for k, v in reply.getheaders():
                    if k.lower() not in ("content-length", "transfer-encoding", "connection"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _forward

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def drop(self, rule: Callable[[str, str, dict], bool]) -> None:
        self._drop.append(rule)

    def hold(self, rule: Callable[[str, str, dict], bool]) -> None:
        self._hold.append(rule)

    def release(self) -> None:
        self._release.set()

    def __enter__(self) -> "TrackingProxy":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._release.set()
        self._server.shutdown()
        self._server.server_close()


@contextmanager
def serving_app(config: Path, overrides: dict, models: Path) -> Iterator[str]:
    """The project's serving app (``build_app`` on ``config`` with ``overrides``, models from
    ``models``) on Ray Serve on a free loopback port of the Ray instance already up; yields
    its base URL and shuts Serve down after. ``build_app`` writes Serve's settings into this
    process's environment (for a Ray started after it): they are undone here too."""
    from ray import serve

    from slmfactory.serving.app import build_app

    port = free_port()
    env_before = dict(os.environ)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app({"config": str(config), "set": [f"{k}={v}" for k, v in overrides.items()],
                             "models": str(models)}), name="slmfactory", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        os.environ.clear()
        os.environ.update(env_before)
