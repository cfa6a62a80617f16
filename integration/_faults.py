"""Fault injection for the reliability and security suites (the TCP proxy that cuts a
process off from etcd is ``integration._proxy.TcpProxy``).

- :class:`FrontendProcess`: ``python -m discovery_mdc frontend`` as a real process, with its
  HTTP API, Prometheus counters and peak RSS (``VmHWM``) at hand.
- Small helpers: model dirs that differ per model, the card keys in etcd, envelopes to put.

Only processes started here are ever signalled, by PID.
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
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from discovery_mdc._sample import write_sample_model
from discovery_mdc.card import ModelDeploymentCard, ModelEnvelope, card_key, encode_envelope
from discovery_mdc.etcd import EtcdClient
from integration._util import wait_until

__all__ = [
    "CliProcess",
    "WorkerProc",
    "child_env",
    "FileServer",
    "FrontendProcess",
    "Spawn",
    "card_keys",
    "converged",
    "envelope_kv",
    "model_dirs",
    "parse_metrics",
    "peak_rss_kib",
    "start_frontend",
    "tcp_connections",
    "tcp_peer_ports",
]


# --------------------------------------------------------------------------- frontend


_METRIC = re.compile(r"^(?P<name>[a-zA-Z_:][\w:]*)(?:\{(?P<labels>[^}]*)\})? (?P<value>\S+)$")


def peak_rss_kib(pid: int) -> int:
    """``VmHWM`` (peak resident set) of a live process, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmHWM for pid {pid}")


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> ``name`` or ``name{labels}`` -> value."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = _METRIC.match(line)
        if m:
            labels = f"{{{m['labels']}}}" if m["labels"] else ""
            out[m["name"] + labels] = float(m["value"])
    return out


def child_env(**extra: str) -> dict[str, str]:
    """This environment without any ETCD_* / DYN_* / HF_* variable, plus ``extra``."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("ETCD_", "DYN_", "HF_")) and k != "PYTHONPATH"
    }
    env.update(extra)
    return env


class CliProcess:
    """``python -m discovery_mdc <args>`` with stdout+stderr in a file (a full pipe can never
    block it)."""

    def __init__(
        self,
        args: list[str],
        *,
        log_path: Path,
        env: Mapping[str, str] | None,
        cwd: Path | None = None,
        preexec_fn: Callable[[], None] | None = None,
    ) -> None:
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "discovery_mdc", *args],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=dict(env) if env is not None else child_env(),
            cwd=cwd,
            preexec_fn=preexec_fn,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def describe(self) -> str:
        tail = "\n".join(self.log().splitlines()[-40:])
        return f"{self.log_path.name} pid {self.pid} (exit {self.proc.poll()}), log tail:\n{tail}"

    async def wait_log(self, pattern: str, *, count: int = 1, timeout: float = 60.0) -> str:  # noqa: ASYNC109
        """Wait until ``pattern`` (a regex) matched ``count`` lines of the log."""

        def seen() -> str:
            hits = [ln for ln in self.log().splitlines() if re.search(pattern, ln)]
            if len(hits) >= count:
                return hits[count - 1]
            if self.proc.poll() is not None:
                raise AssertionError(f"process exited early: {self.describe()}")
            return ""

        return await wait_until(seen, timeout=timeout, message=self.describe)

    def signal(self, sig: signal.Signals) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    async def wait_exit(self, timeout: float = 60.0) -> int:  # noqa: ASYNC109
        await wait_until(lambda: self.proc.poll() is not None, timeout=timeout,
                         message=self.describe)  # fmt: skip
        return self.proc.returncode

    def close(self) -> None:
        """SIGTERM (SIGKILL after 15 s) if still running, and close the log."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()


_CREATED = re.compile(r"created etcd key (?P<key>v1/mdc/\S+) \(lease (?P<lease>[0-9a-f]+)\)")
STATUS_LISTENING = re.compile(r"status server listening on \S+:(?P<port>\d+)")


class WorkerProc(CliProcess):
    """``discovery-mdc worker`` for one model dir, status server on a free loopback port."""

    def __init__(
        self,
        etcd: str,
        model_dir: Path,
        *,
        log_path: Path,
        ttl: int = 3,
        env: Mapping[str, str] | None = None,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        full_env = child_env(DYN_SYSTEM_HOST="127.0.0.1", DYN_SYSTEM_PORT="0", **(env or {}))
        args = ["worker", "--etcd", etcd, "--model-path", str(model_dir),
                "--lease-ttl", str(ttl), *extra_args]  # fmt: skip
        super().__init__(args, log_path=log_path, env=full_env)

    def keys(self) -> list[tuple[str, int]]:
        """Every (card key, lease) this worker created, oldest first."""
        return [(m["key"], int(m["lease"], 16)) for m in _CREATED.finditer(self.log())]

    def current_key(self) -> str | None:
        keys = self.keys()
        return keys[-1][0] if keys else None

    async def wait_registered(self, timeout: float = 60.0) -> tuple[str, int]:  # noqa: ASYNC109
        """The first (key, lease) once the worker says it registered a model."""
        await self.wait_log(r"registered model '", timeout=timeout)
        return self.keys()[0]

    def reregistrations(self) -> int:
        return len(re.findall(r"re-registered \d+ key", self.log()))

    def status_port(self) -> int:
        m = STATUS_LISTENING.search(self.log())
        assert m is not None, f"no status server line: {self.describe()}"
        return int(m["port"])

    async def metadata_gets(self) -> float:
        """Metadata requests this worker answered 200 (its own Prometheus counter)."""
        url = f"http://127.0.0.1:{self.status_port()}/metrics"

        def get() -> str:
            with urllib.request.urlopen(url, timeout=10) as resp:
                return str(resp.read().decode())

        samples = parse_metrics(await asyncio.to_thread(get))
        return sum(
            v
            for k, v in samples.items()
            if k.startswith("discovery_mdc_metadata_requests_total{") and 'status="200"' in k
        )


Spawn = Callable[..., WorkerProc]
"""The ``spawn_worker`` fixture: ``spawn_worker(model_dir, ttl=3, name="w")``."""


class FrontendProcess(CliProcess):
    """``python -m discovery_mdc frontend`` on a free port, logging to a file."""

    def __init__(
        self,
        etcd: str,
        *,
        tmp: Path,
        cache_dir: Path | None = None,
        reconcile_interval: float | None = None,
        env: Mapping[str, str] | None = None,
        extra_args: tuple[str, ...] = (),
        name: str = "frontend",
    ) -> None:
        tmp.mkdir(parents=True, exist_ok=True)
        self.cache_dir = cache_dir or tmp / f"{name}-cache"
        self._port_file = tmp / f"{name}.port"
        self._port_file.unlink(missing_ok=True)
        args = [
            "frontend",
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

    async def wait_listening(self, timeout: float = 60.0) -> int:  # noqa: ASYNC109
        def port() -> int:
            if self.proc.poll() is not None:
                raise AssertionError(f"frontend exited early: {self.describe()}")
            text = self._port_file.read_text() if self._port_file.exists() else ""
            return int(text) if text.strip() else 0

        self.port = await wait_until(port, timeout=timeout, message=self.describe)
        return self.port

    def _get(self, path: str) -> tuple[int, bytes]:
        url = f"http://127.0.0.1:{self.port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=10) as resp:
                return int(resp.status), resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    async def get(self, path: str) -> tuple[int, bytes]:
        """(status, body) of ``GET path``, whatever the body is."""
        return await asyncio.to_thread(self._get, path)

    async def get_json(self, path: str) -> tuple[int, Any]:
        status, body = await asyncio.to_thread(self._get, path)
        return status, json.loads(body)

    async def model_ids(self) -> set[str]:
        _, body = await self.get_json("/v1/models")
        return {m["id"] for m in body["data"]}

    async def ready_instances(self) -> set[str]:
        """Keys of every instance in a ready worker set of every listed model."""
        keys: set[str] = set()
        for model in await self.model_ids():
            status, body = await self.get_json(f"/v1/models/{model}")
            if status != 200:
                continue  # removed between the two requests
            for ws in body["worker_sets"]:
                if ws["ready"]:
                    keys.update(ws["instances"])
        return keys

    async def metrics(self) -> dict[str, float]:
        """Prometheus samples: ``name`` or ``name{labels}`` -> value."""
        status, body = await asyncio.to_thread(self._get, "/metrics")
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
    etcd: str, tmp_path: Path, procs: list[CliProcess], **kw: Any
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


# --------------------------------------------------------------------------- data


def model_dirs(root: Path, n: int) -> list[Path]:
    """``n`` sample model dirs whose files (hence mdcsums) all differ."""
    return [write_sample_model(root / f"model-{i}", vocab_size=60 + i, seed=i) for i in range(n)]


async def card_keys(client: EtcdClient, prefix: str = "v1/mdc/") -> set[str]:
    """Every key under ``prefix`` now."""
    return {kv.key for kv in (await client.range_prefix_all(prefix)).kvs}


def envelope_kv(
    card: ModelDeploymentCard,
    instance_id: int,
    *,
    namespace: str = "dynamo",
    component: str = "backend",
    endpoint: str = "generate",
) -> tuple[str, bytes]:
    """The key and value a worker with lease ``instance_id`` would publish for ``card``."""
    env = ModelEnvelope(
        namespace=namespace,
        component=component,
        endpoint=endpoint,
        instance_id=instance_id,
        card=card,
        model_suffix=card.lora_slug,
    )
    return card_key(namespace, component, endpoint, instance_id, card.lora_slug), encode_envelope(
        env
    )


# --------------------------------------------------------------------------- file server


class FileServer:
    """A real aiohttp server on 127.0.0.1 that plays a worker's metadata endpoint.

    ``files[path] = bytes`` serves them; ``endless`` paths stream forever; ``gated`` paths
    send half the body and then wait for ``release``. ``gets`` counts GETs per path.
    """

    def __init__(self) -> None:
        from collections import Counter

        self.files: dict[str, bytes] = {}
        self.endless: set[str] = set()
        self.gated: set[str] = set()
        self.gets: Counter[str] = Counter()
        self.streamed = 0
        self.release = asyncio.Event()
        self.port = 0
        self._runner: Any = None

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def __aenter__(self) -> FileServer:
        from aiohttp import web

        async def handle(request: web.Request) -> web.StreamResponse:
            path = request.path
            self.gets[path] += 1
            if path in self.endless:
                resp = web.StreamResponse()  # chunked, no Content-Length
                await resp.prepare(request)
                chunk = b"x" * (1 << 16)
                while True:
                    await resp.write(chunk)
                    self.streamed += len(chunk)
            body = self.files.get(path)
            if body is None:
                raise web.HTTPNotFound()
            if path in self.gated:
                resp = web.StreamResponse(headers={"Content-Length": str(len(body))})
                await resp.prepare(request)
                await resp.write(body[: len(body) // 2])
                await self.release.wait()
                await resp.write(body[len(body) // 2 :])
                await resp.write_eof()
                return resp
            return web.Response(body=body)

        app = web.Application()
        app.router.add_route("GET", "/{tail:.*}", handle)
        self._runner = web.AppRunner(app, shutdown_timeout=0.5, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release.set()
        await self._runner.cleanup()


@dataclass(frozen=True, slots=True)
class TcpConnection:
    """One ESTABLISHED IPv4 TCP connection of a process, from ``/proc/<pid>/net/tcp``."""

    remote_port: int
    timer: str  # the armed kernel timer: "off", "retransmit", "keepalive", ...


_TCP_TIMERS = {"00": "off", "01": "retransmit", "02": "keepalive", "03": "time-wait", "04": "probe"}


def tcp_connections(pid: int) -> list[TcpConnection]:
    """The ESTABLISHED TCP connections (IPv4) that process ``pid`` holds."""
    inodes = set()
    fd_dir = Path(f"/proc/{pid}/fd")
    for fd in fd_dir.iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    conns = []
    for line in Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[3] == "01" and fields[9] in inodes:  # 01 = ESTABLISHED
            timer = fields[5].split(":", 1)[0]
            conns.append(
                TcpConnection(int(fields[2].rsplit(":", 1)[1], 16), _TCP_TIMERS.get(timer, timer))
            )
    return conns


def tcp_peer_ports(pid: int) -> set[int]:
    """Remote ports of the ESTABLISHED TCP connections (IPv4) that process ``pid`` holds."""
    return {c.remote_port for c in tcp_connections(pid)}
