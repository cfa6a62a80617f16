"""The pure halves import no I/O library: checked in a fresh interpreter (a subprocess, so it
lives here rather than in tests/)."""

from __future__ import annotations

import pytest

from testkit import run_python

IO_LIBRARIES = ("aiohttp", "prometheus_client", "filelock")


@pytest.mark.parametrize(
    "module",
    [
        "discovery_mdc",
        "discovery_mdc.card",
        "discovery_mdc.errors",
        "discovery_mdc.frontend",  # the registry, eagerly; the watcher and HTTP API lazily
        "discovery_mdc.frontend._state",
    ],
)
def test_importing_the_pure_code_loads_no_io_library(module: str) -> None:
    script = (
        f"import sys, {module}\nprint(' '.join(m for m in {IO_LIBRARIES!r} if m in sys.modules))\n"
    )
    out = run_python("-c", script)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [], f"import {module} loads {out.stdout.strip()}"


def test_the_lazy_frontend_names_still_resolve() -> None:
    script = (
        "import sys, discovery_mdc.frontend as f\n"
        "assert 'aiohttp' not in sys.modules\n"
        "from discovery_mdc.frontend import ModelWatcher, build_app, FrontendMetrics\n"
        "assert ModelWatcher.__module__ == 'discovery_mdc.frontend._watcher'\n"
        "assert set(f.__all__) <= set(dir(f))\n"
        "assert 'aiohttp' in sys.modules\n"
    )
    done = run_python("-c", script)
    assert done.returncode == 0, done.stderr
