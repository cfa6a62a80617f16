"""compose.yaml and the Dockerfile: services, ports, env vars and healthchecks hang together."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from discovery_mdc._env import VARIABLES
from discovery_mdc.cli import build_parser
from discovery_mdc.cli._common import apply_env_options

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "compose.yaml"
DOCKERFILE = ROOT / "Dockerfile"
# CI lays shared/ beside the clone; the spec's environment table is checked when it is there.
WIRE_FORMAT = ROOT.parent / "shared" / "spec" / "wire-format.md"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def _services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    services = compose["services"]
    assert isinstance(services, dict)
    return services


def _env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    assert isinstance(env, dict), "use the mapping form for environment"
    return {k: str(v) for k, v in env.items()}


def _healthcheck_cmd(service: dict[str, Any]) -> list[str]:
    test = service["healthcheck"]["test"]
    assert isinstance(test, list) and test[0] == "CMD", test
    return [str(t) for t in test[1:]]


def _published(service: dict[str, Any]) -> dict[int, int]:
    out = {}
    for spec in service.get("ports", []):
        host, container = str(spec).rsplit(":", 1)
        out[int(container)] = int(host.rsplit(":", 1)[-1])
    return out


def test_services(compose: dict[str, Any]) -> None:
    assert set(_services(compose)) == {"etcd", "model-init", "worker", "frontend"}


def test_etcd_is_the_official_v3_5_image_with_a_health_check(compose: dict[str, Any]) -> None:
    etcd = _services(compose)["etcd"]
    assert re.fullmatch(
        r"(quay\.io/coreos/etcd|gcr\.io/etcd-development/etcd):v3\.5\.\d+", etcd["image"]
    )
    cmd = _healthcheck_cmd(etcd)
    assert cmd[0] == "etcdctl" and cmd[-2:] == ["endpoint", "health"]
    assert "--endpoints=http://127.0.0.1:2379" in cmd
    flags = dict(f.split("=", 1) for f in etcd["command"][1:])
    assert flags["--listen-client-urls"] == "http://0.0.0.0:2379"
    assert flags["--advertise-client-urls"] == "http://etcd:2379"
    assert _published(etcd) == {2379: 2379}


@pytest.mark.parametrize("name", ["model-init", "worker", "frontend"])
def test_app_services_build_this_repo(compose: dict[str, Any], name: str) -> None:
    service = _services(compose)[name]
    assert service["build"] == "."
    assert service["image"] == "discovery-mdc:local"


@pytest.mark.parametrize("name", ["worker", "frontend"])
def test_app_services_wait_for_a_healthy_etcd(compose: dict[str, Any], name: str) -> None:
    service = _services(compose)[name]
    assert service["depends_on"]["etcd"] == {"condition": "service_healthy"}
    assert _env(service)["ETCD_ENDPOINTS"] == "http://etcd:2379"


def _parse(service: dict[str, Any]) -> Any:
    """The service's command as our CLI parses it, with its environment applied."""
    args = build_parser().parse_args(service["command"])
    apply_env_options(args, _env(service))
    return args


def test_worker_serves_the_generated_model_on_its_status_port(compose: dict[str, Any]) -> None:
    services = _services(compose)
    worker, init = services["worker"], services["model-init"]
    args = _parse(worker)
    assert args.command == "worker"
    env = _env(worker)
    assert env["DYN_SYSTEM_HOST"] == "0.0.0.0"  # advertised as the container's routable IP
    assert args.system_port == int(env["DYN_SYSTEM_PORT"]) == 9090
    assert args.self_host is True
    assert _published(worker) == {9090: 9090}
    cmd = _healthcheck_cmd(worker)
    assert "http://127.0.0.1:9090/health" in cmd[-1]
    # model-init writes the sample model into the volume the worker reads.
    init_args = build_parser().parse_args(init["command"])
    assert init_args.command == "sample-model"
    assert args.model_path == init_args.dir
    assert worker["depends_on"]["model-init"] == {"condition": "service_completed_successfully"}
    volume = {v.split(":")[0]: v.split(":")[1] for v in worker["volumes"]}
    assert volume == {v.split(":")[0]: v.split(":")[1] for v in init["volumes"]}
    assert args.model_path.startswith(volume["models"] + "/")


def test_frontend_serves_http_and_caches_in_a_volume(compose: dict[str, Any]) -> None:
    frontend = _services(compose)["frontend"]
    args = _parse(frontend)
    assert args.command == "frontend"
    assert args.http_host == "0.0.0.0"
    assert _published(frontend) == {args.http_port: args.http_port}
    assert f"http://127.0.0.1:{args.http_port}/health" in _healthcheck_cmd(frontend)[-1]
    mounts = dict(v.split(":")[:2] for v in frontend["volumes"])
    assert args.cache_dir in mounts.values()
    assert set(mounts) <= set(compose["volumes"])


@pytest.mark.parametrize("name", ["worker", "frontend"])
def test_python_healthchecks_compile(compose: dict[str, Any], name: str) -> None:
    cmd = _healthcheck_cmd(_services(compose)[name])
    assert cmd[:2] == ["python", "-c"]
    compile(cmd[2], f"{name}-healthcheck", "exec")


def _documented_variables() -> set[str]:
    return {v.name for v in VARIABLES}


def test_every_env_var_is_documented(compose: dict[str, Any]) -> None:
    used = {k for s in _services(compose).values() for k in _env(s)}
    assert used <= _documented_variables(), used - _documented_variables()


def test_the_cli_reads_every_wire_format_variable() -> None:
    if not WIRE_FORMAT.is_file():
        pytest.skip(f"{WIRE_FORMAT} is not present")
    text = WIRE_FORMAT.read_text()
    table = text.split("## Environment", 1)[1]
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    spec = {name for row in rows for name in re.findall(r"`([A-Z][A-Z0-9_]+)`", row.split("|")[1])}
    # The spec lists the variables of the wire format; Dynamo's operational ones (logging,
    # namespaces, startup and shutdown timeouts) come on top.
    assert spec <= _documented_variables(), spec - _documented_variables()


def test_dockerfile_installs_the_package_with_the_cli_as_entrypoint() -> None:
    text = DOCKERFILE.read_text()
    assert re.search(r"^FROM python:3\.11-slim$", text, re.M)
    assert re.search(r"^RUN pip install \.", text, re.M)
    assert re.search(r'^ENTRYPOINT \["discovery-mdc"\]$', text, re.M)
    # The build context keeps only what `pip install .` needs.
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {"*", "!pyproject.toml", "!README.md", "!discovery_mdc/"} <= set(ignored)


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
