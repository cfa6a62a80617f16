"""What ``/proc`` says about a process we started, and Prometheus text as a dict."""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "TcpConnection",
    "parse_metrics",
    "peak_rss_kib",
    "proc_status_kib",
    "tcp_connections",
    "tcp_peer_ports",
]

_METRIC = re.compile(r"^(?P<name>[a-zA-Z_:][\w:]*)(?:\{(?P<labels>[^}]*)\})? (?P<value>\S+)$")


def proc_status_kib(pid: int, key: str) -> int:
    """A ``kB`` field of ``/proc/<pid>/status`` (``VmRSS``, ``VmHWM``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(f"no {key} for pid {pid}")


def peak_rss_kib(pid: int) -> int:
    """``VmHWM`` (peak resident set) of a live process, in KiB."""
    return proc_status_kib(pid, "VmHWM")


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> ``name`` or ``name{labels}`` -> value."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = _METRIC.match(line)
        if m:
            labels = f"{{{m['labels']}}}" if m["labels"] else ""
            out[m["name"] + labels] = float(m["value"])
    return out


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
