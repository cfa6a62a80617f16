"""The one process wrapper: a child a test or benchmark started, with its output in a log file,
and the ``discovery-mdc`` roles built on it (a worker, a frontend).

Only processes started here are ever signalled, and only by their own PID.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TypedDict, Unpack

from discovery_mdc._env import child_environ
from discovery_mdc.etcd import EtcdClient
from testkit._cards import card_keys
from testkit._procfs import parse_metrics, peak_rss_kib
from testkit._wait import wait_until

__all__ = [
    "CliProcess",
    "FrontendProcess",
    "Process",
    "Registered",
    "Spawn",
    "WorkerProcess",
    "child_env",
    "converged",
    "run_cli",
    "run_python",
    "start_frontend",
]

STOP_DEADLINE = 15.0


def child_env(**extra: str) -> dict[str, str]:
    """This environment without any ``ETCD_*``, ``DYN_*``, ``NATS_*`` or ``HF_*`` variable or
    ``PYTHONPATH`` (so a developer's shell cannot change what a child does), unbuffered, plus
    ``extra``."""
    env = child_environ(without_prefix=("ETCD_", "DYN_", "NATS_", "HF_"))
    env.pop("PYTHONPATH", None)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


class RunOptions(TypedDict, total=False):
    """The keyword arguments of :func:`run_python` and :func:`run_cli`."""

    env: Mapping[str, str] | None
    stdin: int | None
    cwd: Path | None
    timeout: float
    preexec_fn: Callable[[], None] | None


def run_python(
    *args: str | bytes, **options: Unpack[RunOptions]
) -> subprocess.CompletedProcess[str]:
    """``python <args>`` (this interpreter) to completion, by default in :func:`child_env`;
    stdout and stderr captured as text. stdin is not a terminal unless one is passed (a pty).
    An argument may be bytes (a path that is not UTF-8). ``timeout`` defaults to 60 s.
    Raises ``subprocess.TimeoutExpired`` if it runs past ``timeout``."""
    env = options.get("env")
    return subprocess.run(
        [sys.executable, *args],
        stdin=options.get("stdin", subprocess.DEVNULL),
        capture_output=True,
        text=True,
        timeout=options.get("timeout", 60.0),
        check=False,
        env=child_env() if env is None else dict(env),
        cwd=options.get("cwd"),
        preexec_fn=options.get("preexec_fn"),
    )


def run_cli(*args: str | bytes, **options: Unpack[RunOptions]) -> subprocess.CompletedProcess[str]:
    """``python -m discovery_mdc <args>`` to completion (:func:`run_python`)."""
    return run_python("-m", "discovery_mdc", *args, **options)


class Process:
    """A child process: stdout and stderr go to ``log_path`` (a full pipe can never block it),
    unless ``stdout_pipe`` keeps stdout for the caller to read.

    ``append`` keeps what an earlier run wrote to the same log; ``new_session`` puts the child
    in a session (and process group) of its own.
    """

    def __init__(
        self,
        argv: Sequence[str],
        *,
        log_path: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        stdin: int | None = subprocess.DEVNULL,
        stdout_pipe: bool = False,
        append: bool = False,
        new_session: bool = False,
        preexec_fn: Callable[[], None] | None = None,
    ) -> None:
        self.argv = list(argv)
        self.log_path = log_path
        self._log: IO[bytes] = open(log_path, "ab" if append else "wb")  # noqa: SIM115 - closed in stop()
        self.popen = subprocess.Popen(
            self.argv,
            stdin=stdin,
            stdout=subprocess.PIPE if stdout_pipe else self._log,
            stderr=self._log if stdout_pipe else subprocess.STDOUT,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            start_new_session=new_session,
            preexec_fn=preexec_fn,
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def poll(self) -> int | None:
        """The exit code, or None while it runs."""
        return self.popen.poll()

    def log(self) -> str:
        """Everything it has logged so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def describe(self, lines: int = 40) -> str:
        """Its log file, PID, exit code and the tail of its log (for failure messages)."""
        tail = "\n".join(self.log().splitlines()[-lines:])
        return f"{self.log_path.name} pid {self.pid} (exit {self.poll()}), log tail:\n{tail}"

    def signal(self, sig: int) -> None:
        """Send ``sig`` if it still runs."""
        if self.alive:
            os.kill(self.pid, sig)

    async def wait_log(self, pattern: str, *, count: int = 1, timeout: float = 60.0) -> str:  # noqa: ASYNC109
        """Wait until ``pattern`` (a regex) matched ``count`` lines of the log; the last one."""

        def seen() -> str:
            hits = [ln for ln in self.log().splitlines() if re.search(pattern, ln)]
            return hits[count - 1] if len(hits) >= count else ""

        return await wait_until(seen, timeout=timeout, message=self.describe, proc=self)

    async def wait_exit(self, timeout: float = 60.0) -> int:  # noqa: ASYNC109
        """Wait (polling) for it to exit; its exit code."""
        await wait_until(lambda: not self.alive, timeout=timeout, message=self.describe)
        return self.popen.returncode

    def stop(self, timeout: float = STOP_DEADLINE) -> int | None:
        """SIGTERM if it still runs, SIGKILL after ``timeout``; close its pipes and log."""
        if self.alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
                self.popen.wait()
        for stream in (self.popen.stdin, self.popen.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        self._log.close()
        return self.popen.returncode


class CliProcess(Process):
    """``python -m discovery_mdc <command> <args>``, by default in :func:`child_env`."""

    command: tuple[str, ...] = ()
    """The subcommand a subclass runs (``("worker",)``); none here."""

    def __init__(
        self,
        args: Sequence[str],
        *,
        log_path: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        preexec_fn: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(
            [sys.executable, "-m", "discovery_mdc", *self.command, *args],
            log_path=log_path,
            env=child_env() if env is None else env,
            cwd=cwd,
            preexec_fn=preexec_fn,
        )


# --------------------------------------------------------------------------- worker

_REGISTERED = re.compile(
    r"registered model '(?P<name>[^']*)' at (?P<key>\S+) \(lease (?P<lease>[0-9a-f]+)\)"
)
_CREATED = re.compile(r"created etcd key (?P<key>v1/mdc/\S+) \(lease (?P<lease>[0-9a-f]+)\)")
_STATUS_LISTENING = re.compile(r"status server listening on \S+:(?P<port>\d+)")


@dataclass(frozen=True, slots=True)
class Registered:
    """What the worker's "registered" log line says."""

    name: str
    key: str
    lease: int


class WorkerProcess(CliProcess):
    """``discovery-mdc worker <args>``; :meth:`serving` is the usual one-model worker."""

    command = ("worker",)

    @classmethod
    def serving(
        cls,
        etcd: str,
        model_dir: Path,
        *,
        log_path: Path,
        ttl: int = 3,
        env: Mapping[str, str] | None = None,
        extra_args: Sequence[str] = (),
    ) -> WorkerProcess:
        """A worker publishing ``model_dir`` with lease TTL ``ttl``, its status server on a
        free loopback port."""
        full_env = child_env(DYN_SYSTEM_HOST="127.0.0.1", DYN_SYSTEM_PORT="0", **(env or {}))
        args = ["--etcd", etcd, "--model-path", str(model_dir), "--lease-ttl", str(ttl),
                *extra_args]  # fmt: skip
        return cls(args, log_path=log_path, env=full_env)

    def registered_lines(self) -> list[Registered]:
        """Every "registered model" line so far, oldest first."""
        return [
            Registered(m["name"], m["key"], int(m["lease"], 16))
            for m in _REGISTERED.finditer(self.log())
        ]

    async def wait_registered(self, *, timeout: float = 60.0) -> Registered:  # noqa: ASYNC109
        """The first registration, once the worker logged it."""
        await self.wait_log(_REGISTERED.pattern, timeout=timeout)
        return self.registered_lines()[0]

    def keys(self) -> list[tuple[str, int]]:
        """Every (card key, lease) this worker created, oldest first."""
        return [(m["key"], int(m["lease"], 16)) for m in _CREATED.finditer(self.log())]

    def current_key(self) -> str | None:
        keys = self.keys()
        return keys[-1][0] if keys else None

    def reregistrations(self) -> int:
        return len(re.findall(r"re-registered \d+ key", self.log()))

    def status_port(self) -> int:
        m = _STATUS_LISTENING.search(self.log())
        assert m is not None, f"no status server line: {self.describe()}"
        return int(m["port"])

    async def metadata_gets(self) -> float:
        """Metadata requests this worker answered 200 (its own Prometheus counter)."""
        _, body = await asyncio.to_thread(
            _http_get, f"http://127.0.0.1:{self.status_port()}/metrics"
        )
        return sum(
            v
            for k, v in parse_metrics(body.decode()).items()
            if k.startswith("discovery_mdc_metadata_requests_total{") and 'status="200"' in k
        )


Spawn = Callable[..., WorkerProcess]
"""The ``spawn`` and ``spawn_worker`` fixtures of ``integration/conftest.py``."""


# --------------------------------------------------------------------------- frontend


def _http_get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return int(resp.status), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


class FrontendProcess(CliProcess):
    """``discovery-mdc frontend`` on a free loopback port (read from its ``--port-file``),
    with its HTTP API, Prometheus samples and peak RSS at hand."""

    command = ("frontend",)

    def __init__(
        self,
        etcd: str,
        *,
        tmp: Path,
        cache_dir: Path | None = None,
        reconcile_interval: float | None = None,
        env: Mapping[str, str] | None = None,
        extra_args: Sequence[str] = (),
        name: str = "frontend",
    ) -> None:
        tmp.mkdir(parents=True, exist_ok=True)
        self.cache_dir = cache_dir or tmp / f"{name}-cache"
        self._port_file = tmp / f"{name}.port"
        self._port_file.unlink(missing_ok=True)
        args = [
            "--etcd", etcd,
            "--http-port", "0",
            "--port-file", str(self._port_file),
            "--cache-dir", str(self.cache_dir),
            *(["--reconcile-interval", str(reconcile_interval)]
              if reconcile_interval is not None else []),
            *extra_args,
        ]  # fmt: skip
        super().__init__(args, log_path=tmp / f"{name}.log", env=child_env(**(env or {})))
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def wait_listening(self, timeout: float = 60.0) -> int:  # noqa: ASYNC109
        """Its HTTP port, once it wrote its port file."""

        def port() -> int:
            text = self._port_file.read_text() if self._port_file.exists() else ""
            return int(text) if text.strip() else 0

        self.port = await wait_until(port, timeout=timeout, message=self.describe, proc=self)
        return self.port

    async def get(self, path: str) -> tuple[int, bytes]:
        """(status, body) of ``GET path``, whatever the body is."""
        return await asyncio.to_thread(_http_get, self.url + path)

    async def get_json(self, path: str) -> tuple[int, Any]:
        status, body = await self.get(path)
        return status, json.loads(body)

    async def model_ids(self) -> set[str]:
        status, body = await self.get_json("/v1/models")
        assert status == 200, body
        return {m["id"] for m in body["data"]}

    async def lists(self, *models: str) -> bool:
        """True if every one of ``models`` is listed (a wait predicate)."""
        return set(models) <= await self.model_ids()

    async def lists_only(self, *models: str) -> bool:
        """True if exactly ``models`` are listed (none: nothing is)."""
        return await self.model_ids() == set(models)

    async def details(self, model: str) -> dict[str, Any] | None:
        """``GET /v1/models/{model}``, or None if it is not listed."""
        status, body = await self.get_json(f"/v1/models/{model}")
        return body if status == 200 else None

    async def instances(self, *models: str, ready: bool = False) -> set[str]:
        """Keys of every instance (only in ready worker sets, with ``ready``) of ``models``,
        or of every listed model if none is named."""
        keys: set[str] = set()
        for model in models or tuple(await self.model_ids()):
            info = await self.details(model)
            if info is None:
                continue  # removed between the two requests
            for ws in info["worker_sets"]:
                if ws["ready"] or not ready:
                    keys.update(ws["instances"])
        return keys

    async def ready_instances(self) -> set[str]:
        """Keys of every instance in a ready worker set of every listed model."""
        return await self.instances(ready=True)

    async def metrics(self) -> dict[str, float]:
        """Prometheus samples: ``name`` or ``name{labels}`` -> value."""
        status, body = await self.get("/metrics")
        assert status == 200, status
        return parse_metrics(body.decode())

    async def counter_at_least(self, name: str, n: float) -> bool:
        """True once the metric sample ``name`` (e.g. ``x_total{a="b"}``) reaches ``n``."""
        return (await self.metrics()).get(name, 0) >= n

    def peak_rss_kib(self) -> int:
        return peak_rss_kib(self.pid)

    async def metric(self, name: str, **labels: str) -> float:
        """One sample by name and labels, whatever order the labels are printed in (0 if
        absent)."""
        want = {f'{k}="{v}"' for k, v in labels.items()}
        for key, value in (await self.metrics()).items():
            base, _, rest = key.partition("{")
            if base == name and set(filter(None, rest.rstrip("}").split(","))) == want:
                return value
        return 0.0


async def start_frontend(
    etcd: str, tmp_path: Path, procs: list[Process], **kw: Any
) -> FrontendProcess:
    """A :class:`FrontendProcess` (kept in ``procs`` for clean-up), once it listens."""
    fe = FrontendProcess(etcd, tmp=tmp_path, **kw)
    procs.append(fe)
    await fe.wait_listening()
    return fe


async def converged(fe: FrontendProcess, client: EtcdClient, deadline: float = 60.0) -> set[str]:
    """Wait until the frontend's ready instances equal the card keys in etcd, and none is
    pending; returns them."""
    last: list[object] = []

    async def check() -> list[set[str]]:  # a list: an empty set of keys is a valid answer
        live = await card_keys(client)
        ready = await fe.ready_instances()
        gauge = (await fe.metrics()).get("discovery_mdc_instances")
        last[:] = [live, ready, gauge]
        return [live] if ready == live and gauge == len(live) else []

    (got,) = await wait_until(
        check, timeout=deadline, message=lambda: f"etcd/ready/gauge = {last}\n{fe.describe()}"
    )
    return got
