"""Run ``python -m discovery_mdc worker`` as a real process and read what it logs
(built on :class:`integration._faults.CliProcess`)."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from integration._faults import STATUS_LISTENING, CliProcess, child_env

__all__ = ["Registered", "WorkerProcess", "WorkerSpawner", "status_env", "worker_env"]

_REGISTERED = re.compile(
    r"registered model '(?P<name>[^']*)' at (?P<key>\S+) \(lease (?P<lease>[0-9a-f]+)\)"
)


@dataclass(frozen=True, slots=True)
class Registered:
    """What the worker's "registered" log line says."""

    name: str
    key: str
    lease: int


worker_env = child_env


def status_env() -> dict[str, str]:
    """A worker environment with the status server on a free loopback port."""
    return worker_env(DYN_SYSTEM_PORT="0", DYN_SYSTEM_HOST="127.0.0.1")


class WorkerProcess(CliProcess):
    """One ``discovery-mdc worker`` process; only this process is ever signalled, by its PID."""

    def __init__(
        self,
        args: list[str],
        *,
        env: dict[str, str],
        log_path: Path,
        cwd: Path | None = None,
        preexec_fn: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(
            ["worker", *args], log_path=log_path, env=env, cwd=cwd, preexec_fn=preexec_fn
        )

    def registered_lines(self) -> list[Registered]:
        return [
            Registered(m["name"], m["key"], int(m["lease"], 16))
            for m in _REGISTERED.finditer(self.log())
        ]

    async def wait_registered(self, *, timeout: float = 30.0) -> Registered:  # noqa: ASYNC109
        await self.wait_log(_REGISTERED.pattern, timeout=timeout)
        return self.registered_lines()[0]

    def status_port(self) -> int:
        m = STATUS_LISTENING.search(self.log())
        assert m is not None, f"no status server line: {self.describe()}"
        return int(m["port"])


class WorkerSpawner:
    """Starts worker processes for one test; :meth:`close` kills the ones still running."""

    def __init__(self, log_dir: Path) -> None:
        self._log_dir = log_dir
        self._procs: list[WorkerProcess] = []

    def __call__(
        self,
        *args: str,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        preexec_fn: Callable[[], None] | None = None,
    ) -> WorkerProcess:
        proc = WorkerProcess(
            list(args),
            env=worker_env() if env is None else env,
            log_path=self._log_dir / f"worker-{len(self._procs)}.log",
            cwd=cwd,
            preexec_fn=preexec_fn,
        )
        self._procs.append(proc)
        return proc

    def close(self) -> None:
        for proc in self._procs:
            proc.close()
