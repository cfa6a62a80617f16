"""``docker-compose config`` validates compose.yaml against the Compose schema, without an
engine (Debian: ``apt-get install docker-compose``); skipped where no compose tool is
installed. What the file says is checked in ``tests/test_compose.py``."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "compose.yaml"


def _compose_tool() -> list[str] | None:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    docker = shutil.which("docker")
    if (
        docker
        and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0
    ):
        return [docker, "compose"]
    return None


def test_compose_config_validates() -> None:
    """`docker-compose config` checks the file against the Compose schema, without an engine
    (Debian: `apt-get install docker-compose`)."""
    tool = _compose_tool()
    if tool is None:
        pytest.skip("no docker-compose or docker compose installed")
    proc = subprocess.run(
        [*tool, "-f", str(COMPOSE), "config", "-q"],
        capture_output=True, text=True, timeout=60, check=False, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
