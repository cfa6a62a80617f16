"""Shared plumbing for the benchmarks: statistics, processes we start, /proc readers, models.

Processes, waiting, ports and the child environment are the test kit's (``testkit``), as in the
integration tests. Every server binds 127.0.0.1 and every process started here is stopped by
its own PID.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from testkit import Process, child_env, proc_status_kib, wait_until_sync

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
HOST = "127.0.0.1"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


# --------------------------------------------------------------------------- statistics


@dataclass(frozen=True, slots=True)
class Stats:
    """Samples of one measurement, with the unit they are in."""

    samples: tuple[float, ...]
    unit: str

    @classmethod
    def of(cls, samples: Sequence[float], unit: str) -> Stats:
        return cls(tuple(float(s) for s in samples), unit)

    @property
    def n(self) -> int:
        return len(self.samples)

    @property
    def median(self) -> float:
        return statistics.median(self.samples) if self.samples else float("nan")

    @property
    def min(self) -> float:
        return min(self.samples) if self.samples else float("nan")

    @property
    def max(self) -> float:
        return max(self.samples) if self.samples else float("nan")

    def fmt(self, value: float | None = None) -> str:
        return fmt_value(self.median if value is None else value, self.unit)

    def summary(self) -> str:
        """``median (min-max, n=N) unit``."""
        if not self.samples:
            return "n/a"
        if self.n == 1:
            return f"{fmt_num(self.median)} {self.unit} (n=1)"
        return (
            f"{fmt_num(self.median)} {self.unit} "
            f"({fmt_num(self.min)}-{fmt_num(self.max)}, n={self.n})"
        )


def fmt_num(x: float) -> str:
    if x != x:  # nan
        return "n/a"
    ax = abs(x)
    if ax >= 1000:
        return f"{x:,.0f}"
    if ax >= 100:
        return f"{x:.0f}"
    if ax >= 10:
        return f"{x:.1f}"
    if ax >= 1:
        return f"{x:.2f}"
    return f"{x:.3f}"


def fmt_value(x: float, unit: str) -> str:
    return f"{fmt_num(x)} {unit}"


@dataclass(slots=True)
class Row:
    """One line of the results table.

    ``ratio`` is ours/peer of the medians, in the direction named by ``ratio_kind``
    (``"time"``: lower is better; ``"rate"``: higher is better). ``target`` is the text of
    the goal and ``met`` whether the measured value reaches it (``None``: no target).
    """

    scenario: str
    metric: str
    ours: Stats
    peer: Stats | None = None
    peer_name: str = ""
    ratio_kind: str = ""
    target: str = ""
    met: bool | None = None
    note: str = ""
    ranked: bool = True
    """Whether the row competes for "worst ratio" (context rows do not)."""

    @property
    def ratio(self) -> float | None:
        if self.peer is None or not self.peer.samples or not self.ours.samples:
            return None
        if self.peer.median == 0:
            return None
        return self.ours.median / self.peer.median


@dataclass(slots=True)
class ScenarioResult:
    name: str
    title: str
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    error: str | None = None
    seconds: float = 0.0


# --------------------------------------------------------------------------- ports, waiting


def http_get(url: str, timeout: float = 5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return bytes(resp.read())


def http_json(url: str, timeout: float = 5.0) -> Any:
    return json.loads(http_get(url, timeout))


def prom_value(text: str, name: str, labels: str | tuple[str, ...] | None = None) -> float:
    """Sum of the samples of ``name`` (optionally only those whose label text contains
    ``labels``, e.g. ``status="200"``, or each of several) in Prometheus text format."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        metric = head.split("{", 1)[0]
        if metric != name:
            continue
        wanted = (labels,) if isinstance(labels, str) else labels or ()
        if any(label not in head for label in wanted):
            continue
        total += float(value)
    return total


# --------------------------------------------------------------------------- /proc


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_mb(pid: int) -> float:
    return proc_status_kib(pid, "VmRSS") / 1024


def hwm_mb(pid: int) -> float:
    return proc_status_kib(pid, "VmHWM") / 1024


# --------------------------------------------------------------------------- processes


class Proc(Process):
    """A benchmark child (the kit's :class:`~testkit.Process`) in a session of its own, run
    from the repository, appending to its log after a header line; it speaks the JSON-line
    protocol of ``bench._child`` (:meth:`send`, :meth:`recv`, :meth:`call`). :func:`stop_all`
    stops every one still running."""

    def __init__(
        self,
        name: str,
        args: Sequence[str],
        *,
        log: Path,
        env: dict[str, str] | None = None,
        stdin: int | None = subprocess.DEVNULL,
        stdout_pipe: bool = False,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        with log.open("ab") as header:
            header.write(f"=== {' '.join(args)}\n".encode())
        super().__init__(args, log_path=log, env=env, cwd=cwd or ROOT, stdin=stdin,
                         stdout_pipe=stdout_pipe, append=True, new_session=True)  # fmt: skip
        _LIVE.append(self)

    def send(self, obj: dict[str, Any]) -> None:
        """One JSON command line on stdin (for our child processes)."""
        assert self.popen.stdin is not None
        self.popen.stdin.write((json.dumps(obj) + "\n").encode())
        self.popen.stdin.flush()

    def recv(self, timeout: float = 120.0) -> dict[str, Any]:
        """The next JSON line the child prints on stdout (bounded by ``timeout``)."""
        import select

        assert self.popen.stdout is not None
        deadline = time.monotonic() + timeout
        fd = self.popen.stdout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(
                    f"{self.name}: no reply within {timeout:.0f}s; see {self.log_path}"
                )
            ready, _, _ = select.select([fd], [], [], min(left, 1.0))
            if not ready:
                if not self.alive:
                    raise RuntimeError(f"{self.name} exited: {self.describe(15)}")
                continue
            line = fd.readline()
            if not line:
                raise RuntimeError(f"{self.name} closed stdout: {self.describe(15)}")
            text = line.decode().strip()
            if text.startswith("{"):
                result: dict[str, Any] = json.loads(text)
                if "error" in result:
                    raise RuntimeError(f"{self.name}: {result['error']}")
                return result

    def call(self, obj: dict[str, Any], timeout: float = 120.0) -> dict[str, Any]:
        self.send(obj)
        return self.recv(timeout)

    def finish(self, timeout: float = 60.0) -> int | None:
        """Let a one-shot child exit by itself (a profiler wrapped around it is writing its
        report), then :meth:`stop` it if it has not."""
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout)
        return self.stop()

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM our child by PID, SIGKILL after ``timeout``; close its pipes."""
        code = super().stop(timeout)
        if self in _LIVE:
            _LIVE.remove(self)
        return code


_LIVE: list[Proc] = []


def stop_all() -> None:
    """Stop every child still running (by PID), newest first."""
    for proc in reversed(list(_LIVE)):
        proc.stop(timeout=5.0)


def child_args(module: str, *args: str, profile_to: Path | None = None) -> list[str]:
    """``python -m module args``; under pyinstrument (a saved session) when ``profile_to``."""
    if profile_to is None:
        return [PY, "-m", module, *args]
    return [
        PY,
        "-m",
        "pyinstrument",
        "--interval",
        "0.0005",
        "-r",
        "pyisession",
        "-o",
        str(profile_to),
        "-m",
        module,
        *args,
    ]


def run_child(name: str, args: Sequence[str], *, log: Path, timeout: float) -> dict[str, Any]:
    """Run a bench child to completion and return the JSON result it prints."""
    proc = Proc(name, args, log=log, env=child_env(), stdout_pipe=True)
    try:
        return proc.recv(timeout)
    finally:
        proc.finish()


@contextlib.contextmanager
def workdir(prefix: str) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# --------------------------------------------------------------------------- models

# ~1.8 MB tokenizer.json (about 17 bytes per vocab entry in the loadable form).
TOKENIZER_VOCAB = 105_000
MERGES_BYTES = 500_000


def write_bench_model(directory: Path, seed: int, *, vocab_size: int = TOKENIZER_VOCAB) -> Path:
    """A 5-file metadata set of ~2.3 MB: config.json, a ~1.8 MB tokenizer.json that the
    HF ``tokenizers`` crate loads (so Dynamo lists it), tokenizer_config.json with a chat
    template, generation_config.json and a ~0.5 MB merges.txt (published as an extra file).
    ``seed`` changes every byte of tokenizer.json and merges.txt, so each seed is cold."""
    from discovery_mdc._sample import write_sample_model

    write_sample_model(
        directory, vocab_size=vocab_size, seed=seed, extra_files=False, weights=False
    )
    rng = random.Random(seed * 7919 + 1)
    alphabet = "abcdefghijklmnopqrstuvwxyz"
    lines = ["#version: 0.2"]
    size = 0
    while size < MERGES_BYTES:
        a = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 6)))
        b = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 6)))
        lines.append(f"{a} {b}")
        size += len(a) + len(b) + 2
    (directory / "merges.txt").write_text("\n".join(lines) + "\n")
    return directory


def model_files(directory: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(directory.iterdir()) if p.is_file()}


# --------------------------------------------------------------------------- our frontend


def start_our_frontend(
    etcd_url: str,
    work: Path,
    name: str = "frontend",
    *,
    profile_to: Path | None = None,
    log_level: str = "info",
) -> tuple[Proc, int]:
    """``discovery-mdc frontend`` on 127.0.0.1 with a fresh cache (and HOME) under ``work``;
    returns the process and its HTTP port once /health answers."""
    launched = launch_our_frontend(etcd_url, work, name, profile_to=profile_to, log_level=log_level)
    return launched[0], wait_our_frontend(*launched)


def launch_our_frontend(
    etcd_url: str,
    work: Path,
    name: str = "frontend",
    *,
    profile_to: Path | None = None,
    log_level: str = "info",
) -> tuple[Proc, Path, str]:
    """Start a frontend (see :func:`start_our_frontend`) without waiting for it; returns
    the process, its port file and its name, for :func:`wait_our_frontend`."""
    home = work / f"{name}-home"
    home.mkdir(parents=True, exist_ok=True)
    port_file = work / f"{name}.port"
    port_file.unlink(missing_ok=True)
    args = child_args(
        "discovery_mdc",
        "--log-level",
        log_level,
        "frontend",
        "--etcd",
        etcd_url,
        "--http-host",
        HOST,
        "--http-port",
        "0",
        "--port-file",
        str(port_file),
        "--cache-dir",
        str(home / "mdc-cache"),
        profile_to=profile_to,
    )
    proc = Proc(name, args, log=work / f"{name}.log", env=child_env(HOME=str(home)))
    return proc, port_file, name


def wait_our_frontend(proc: Proc, port_file: Path, name: str) -> int:
    """The HTTP port of a launched frontend, once /health answers."""
    port = int(
        wait_until_sync(
            lambda: port_file.read_text().strip() if port_file.exists() else None,
            timeout=60,
            message=f"{name} port file",
            proc=proc,
        )
    )
    wait_until_sync(
        lambda: http_json(f"http://{HOST}:{port}/health").get("watch_connected"),
        timeout=30,
        message=f"{name} /health",
        proc=proc,
    )
    return port


def start_publisher(
    etcd_url: str, work: Path, name: str, *, index: int, instances: int, models: Sequence[Path]
) -> Proc:
    """A ``bench._child publisher``: a status server hosting ``models`` that, on ``{"op":
    "go"}``, grants ``instances`` leases and creates one card per lease (``{"op": "revoke"}``
    revokes them). Read its ready line with ``proc.recv()``."""
    return Proc(
        name,
        child_args(
            "bench._child",
            "publisher",
            "--etcd",
            etcd_url,
            "--index",
            str(index),
            "--instances",
            str(instances),
            *map(str, models),
        ),
        log=work / f"{name}.log",
        env=child_env(),
        stdin=subprocess.PIPE,
        stdout_pipe=True,
    )


def start_publishers(
    etcd_url: str, work: Path, tag: str, *, total: int, models: Sequence[Path], count: int = 4
) -> tuple[list[Proc], list[dict[str, Any]]]:
    """``count`` publishers sharing ``total`` leases over ``models``, and their ready lines
    (``base_url``, ``blobs``, ``models``)."""
    procs = [
        start_publisher(
            etcd_url, work, f"publisher-{tag}-{i}", index=i, instances=total // count, models=models
        )
        for i in range(count)
    ]
    return procs, [p.recv(300) for p in procs]


def call_all(procs: Sequence[Proc], cmd: dict[str, Any], timeout: float) -> list[dict[str, Any]]:
    """Send ``cmd`` to every process at once; their replies, in order."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(len(procs)) as pool:
        return [f.result() for f in [pool.submit(p.call, cmd, timeout) for p in procs]]


def prom_get(base: str, name: str, labels: str | tuple[str, ...] | None = None) -> float:
    """One metric of the Prometheus endpoint at ``base`` (see :func:`prom_value`)."""
    return prom_value(http_get(f"{base}/metrics").decode(), name, labels)
