"""``discovery-mdc demo`` end to end, as a newcomer runs it: a real subprocess tree.

While the demo runs, every descendant PID is collected from /proc (with its start time, so a
reused PID is not mistaken for a survivor); after it returns, none may be alive, and the
fresh TMPDIR it used must be empty again.

Ctrl-C is simulated as a terminal does it: SIGINT to the whole foreground process group (the
demo runs in a session of its own here), which reaches etcd too. Exit codes: 130 when
interrupted before the demo finished, 0 for Ctrl-C after ``--keep-running``'s summary.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from testkit import Process, child_env, wait_until_sync

ROOT = Path(__file__).resolve().parents[1]


def _stat(pid: int) -> tuple[int, int] | None:
    """(ppid, start time in clock ticks) of a live, non-zombie process, else None."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[1]), int(fields[19])


def _descendants(root: int) -> dict[int, int]:
    """{pid: start time} of every live descendant of ``root``."""
    children: dict[int, list[tuple[int, int]]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (st := _stat(int(entry))) is not None:
            children.setdefault(st[0], []).append((int(entry), st[1]))
    out: dict[int, int] = {}
    todo = [root]
    while todo:
        for pid, start in children.get(todo.pop(), []):
            out[pid] = start
            todo.append(pid)
    return out


@dataclass
class Demo:
    proc: Process  # stdout is a pipe read line by line; stderr goes to the log file
    tmpdir: Path
    seen: dict[int, int] = field(default_factory=dict)
    lines: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def watch_tree(self) -> None:
        while not self._stop.is_set() and self.proc.alive:
            self.seen.update(_descendants(self.proc.pid))
            self._stop.wait(0.01)

    def read_stdout(self) -> None:
        assert self.proc.popen.stdout is not None
        for line in self.proc.popen.stdout:
            self.lines.append(line.decode(errors="replace").rstrip("\n"))

    def wait_for_line(self, text: str, timeout: float) -> None:
        wait_until_sync(
            lambda: any(text in line for line in self.lines),
            timeout=timeout,
            message=lambda: f"no {text!r} on stdout:\n{self.stdout}",
            proc=self.proc,
        )

    def wait_for_exit(self, timeout: float) -> None:
        """Fails unless the demo exits within ``timeout`` seconds."""
        wait_until_sync(
            lambda: not self.proc.alive,
            timeout=timeout,
            message=lambda: f"the demo still runs after {timeout}s:\n{self.stdout}",
        )

    @property
    def stdout(self) -> str:
        return "\n".join(self.lines)

    def survivors(self) -> list[int]:
        return [pid for pid, start in self.seen.items() if (st := _stat(pid)) and st[1] == start]


@pytest.fixture
def run_demo(tmp_path: Path) -> Iterator[Callable[..., Demo]]:
    demos: list[tuple[Demo, list[threading.Thread]]] = []

    def start(*args: str) -> Demo:
        n = len(demos)
        tmpdir, home = tmp_path / f"tmp{n}", tmp_path / f"home{n}"
        tmpdir.mkdir()
        home.mkdir()
        proc = Process(
            [sys.executable, "-m", "discovery_mdc", "demo", *args],
            log_path=tmp_path / f"demo{n}.stderr",
            env=child_env(TMPDIR=str(tmpdir), HOME=str(home)),
            cwd=ROOT,
            stdout_pipe=True,
            new_session=True,  # its own process group, like a terminal job
        )
        demo = Demo(proc, tmpdir)
        threads = [
            threading.Thread(target=demo.watch_tree),
            threading.Thread(target=demo.read_stdout),
        ]
        for t in threads:
            t.start()
        demos.append((demo, threads))
        return demo

    yield start
    for demo, threads in demos:
        demo.proc.signal(signal.SIGKILL)
        demo.proc.popen.wait()
        demo._stop.set()
        for t in threads:
            t.join(timeout=10)
        demo.proc.stop()
        for pid in demo.survivors():  # never leave a test's etcd behind
            os.kill(pid, signal.SIGKILL)


def _finish(demo: Demo, timeout: float) -> str:
    """Wait, at most ``timeout`` seconds, for the demo to exit; return its stderr."""
    demo.wait_for_exit(timeout)
    # Let the tree watcher see the last exits (a survivor fails _assert_clean).
    with contextlib.suppress(AssertionError):
        wait_until_sync(lambda: not demo.survivors(), timeout=10)
    return demo.proc.log()


def _assert_clean(demo: Demo) -> None:
    assert demo.seen, "never saw the demo's etcd child"
    assert demo.survivors() == [], f"still alive after the demo: {demo.survivors()}"
    assert list(demo.tmpdir.iterdir()) == [], f"left behind: {list(demo.tmpdir.iterdir())}"


def test_demo_end_to_end_lists_the_model_and_leaves_nothing_behind(
    run_demo: Callable[..., Demo],
) -> None:
    demo = run_demo()
    err = _finish(demo, timeout=60)  # the explicit bound: done within a minute
    out = demo.stdout
    assert demo.proc.poll() == 0, f"{out}\n{err}"
    # The summary: keys, URLs, /v1/models, cache tree, timings, the second replica.
    keys = [line.split()[0] for line in out.splitlines() if line.startswith("  v1/mdc/")]
    assert len(keys) == 2 and all(k.startswith("v1/mdc/dynamo/backend/generate/") for k in keys)
    assert out.count("/v1/metadata/sample-model/config.json") == 2  # one URL per replica
    assert '"id": "sample-model"' in out
    assert "blobs/" in out and "by-slug/" in out and "-> ../../../blobs/" in out
    assert "publish -> ready" in out
    assert "metadata requests served: worker-1 5, worker-2 0" in out
    assert "frontend fetches: 5 after worker-1" in out and "5 after worker-2" in out
    assert "joined the ready worker set without another download" in out
    assert "Traceback" not in err and "WARNING" not in err and "ERROR" not in err, err
    _assert_clean(demo)


def test_demo_serves_a_given_model_path(run_demo: Callable[..., Demo], tmp_path: Path) -> None:
    from discovery_mdc._sample import write_sample_model

    model = write_sample_model(tmp_path / "models" / "My.Model", seed=3)
    demo = run_demo("--model-path", str(model), "--model-name", "org/My.Model")
    err = _finish(demo, timeout=60)
    assert demo.proc.poll() == 0, f"{demo.stdout}\n{err}"
    assert '"id": "org/My.Model"' in demo.stdout
    assert "/v1/metadata/org_my_model/config.json" in demo.stdout
    assert model.is_dir()  # the user's model is not part of the temp dir
    _assert_clean(demo)


@pytest.mark.parametrize("after", ["[1/5]", "[3/5]"])
def test_ctrl_c_mid_run_exits_130_promptly_and_cleans_up(
    run_demo: Callable[..., Demo], after: str
) -> None:
    demo = run_demo("--timeout", "60")
    demo.wait_for_line(after, timeout=60)
    os.killpg(demo.proc.pid, signal.SIGINT)
    err = _finish(demo, timeout=15)  # promptly: gone within 15 s of the signal
    # Usually 130; the demo may have finished (0) in the instant before the signal landed.
    assert demo.proc.poll() in (130, 0), f"{demo.stdout}\n{err}"
    if demo.proc.poll() == 130:
        assert "SIGINT: interrupted" in demo.stdout or "interrupted" in err
    assert "Traceback" not in err, err
    _assert_clean(demo)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_keep_running_until_signal_then_exit_0(
    run_demo: Callable[..., Demo], sig: signal.Signals
) -> None:
    demo = run_demo("--keep-running")
    demo.wait_for_line("press Ctrl-C", timeout=60)
    # The URL block is printed after that line; wait for its last line, not a race with it.
    demo.wait_for_line("discovery-mdc cache ls", timeout=10)
    assert demo.proc.alive
    assert any(line.strip().startswith("frontend") for line in demo.lines)
    assert "discovery-mdc ls" in demo.stdout
    if sig is signal.SIGINT:
        os.killpg(demo.proc.pid, sig)  # a terminal's Ctrl-C: etcd gets it too
    else:
        demo.proc.signal(sig)  # e.g. a service manager stopping the demo
    err = _finish(demo, timeout=30)
    assert demo.proc.poll() == 0, f"{demo.stdout}\n{err}"
    assert f"{sig.name}: stopped" in demo.stdout
    assert "Traceback" not in err and "WARNING" not in err, err
    _assert_clean(demo)
