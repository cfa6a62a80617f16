"""Run ``python -m discovery_mdc worker`` as a real process and read what it logs."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from integration._util import wait_until

__all__ = ["Registered", "WorkerProcess", "WorkerSpawner", "worker_env"]

_REGISTERED = re.compile(
    r"registered model '(?P<name>[^']*)' at (?P<key>\S+) \(lease (?P<lease>[0-9a-f]+)\)"
)
_LISTENING = re.compile(r"status server listening on \S+:(?P<port>\d+)")


@dataclass(frozen=True, slots=True)
class Registered:
    """What the worker's "registered" log line says."""

    name: str
    key: str
    lease: int


def worker_env(**extra: str) -> dict[str, str]:
    """This environment without any ETCD_* / DYN_* / HF_* variable, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ETCD_", "DYN_", "HF_"))}
    env.update(extra)
    return env


class WorkerProcess:
    """One worker process; stderr goes to a file so a full pipe can never block it.

    Only this process is ever signalled, by its PID.
    """

    def __init__(
        self, args: list[str], *, env: dict[str, str], log_path: Path, cwd: Path | None = None
    ) -> None:
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "discovery_mdc", "worker", *args],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def describe(self) -> str:
        return f"worker pid {self.pid} (exit {self.proc.poll()}), log:\n{self.log()}"

    def registered_lines(self) -> list[Registered]:
        return [
            Registered(m["name"], m["key"], int(m["lease"], 16))
            for m in _REGISTERED.finditer(self.log())
        ]

    async def wait_log(self, pattern: str, *, count: int = 1, within: float = 30.0) -> str:
        """Wait until ``pattern`` (a regex) matched ``count`` lines of the log."""

        def seen() -> str | None:
            hits = [ln for ln in self.log().splitlines() if re.search(pattern, ln)]
            if len(hits) >= count:
                return hits[count - 1]
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited early: {self.describe()}")
            return None

        line = await wait_until(seen, timeout=within, message=self.describe)
        assert line is not None
        return line

    async def wait_registered(self, *, within: float = 30.0) -> Registered:
        await self.wait_log(_REGISTERED.pattern, within=within)
        return self.registered_lines()[0]

    def status_port(self) -> int:
        m = _LISTENING.search(self.log())
        assert m is not None, f"no status server line: {self.describe()}"
        return int(m["port"])

    def signal(self, sig: signal.Signals) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    async def wait_exit(self, *, within: float = 30.0) -> int:
        await wait_until(lambda: self.proc.poll() is not None, timeout=within,
                         message=self.describe)  # fmt: skip
        return self.proc.returncode

    def close(self) -> None:
        """Kill the process if it still runs (finalizer), and close the log."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self._log.close()


class WorkerSpawner:
    """Starts worker processes for one test; :meth:`close` kills the ones still running."""

    def __init__(self, log_dir: Path) -> None:
        self._log_dir = log_dir
        self._procs: list[WorkerProcess] = []

    def __call__(
        self, *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
    ) -> WorkerProcess:
        proc = WorkerProcess(
            list(args),
            env=worker_env() if env is None else env,
            log_path=self._log_dir / f"worker-{len(self._procs)}.log",
            cwd=cwd,
        )
        self._procs.append(proc)
        return proc

    def close(self) -> None:
        for proc in self._procs:
            proc.close()
