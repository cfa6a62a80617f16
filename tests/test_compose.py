"""compose.yaml and the Dockerfile: services, ports, env vars and healthchecks hang together."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement

from discovery_mdc._env import VARIABLES
from discovery_mdc.cli import build_parser
from discovery_mdc.cli._common import apply_env_options

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "compose.yaml"
DOCKERFILE = ROOT / "Dockerfile"
LOCK = ROOT / "requirements.lock"
PYPROJECT = ROOT / "pyproject.toml"
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


def _interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's `${VAR:-default}` substitution (the only form compose.yaml uses)."""

    def sub(m: re.Match[str]) -> str:
        return env.get(m["name"]) or m["default"]

    out = re.sub(r"\$\{(?P<name>[A-Z0-9_]+):-(?P<default>[^}]*)\}", sub, text)
    assert "$" not in out, f"unsupported interpolation in {text!r}"
    return out


def _published(service: dict[str, Any], env: dict[str, str] | None = None) -> dict[int, str]:
    """Container port -> `host_ip:host_port` it is published on."""
    out = {}
    for spec in service.get("ports", []):
        host_ip, host_port, container = _interpolate(str(spec), env or {}).split(":")
        out[int(container)] = f"{host_ip}:{host_port}"
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
    assert _published(etcd) == {2379: "127.0.0.1:2379"}


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
    assert _published(worker) == {9090: "127.0.0.1:9090"}
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
    assert _published(frontend) == {args.http_port: f"127.0.0.1:{args.http_port}"}
    assert f"http://127.0.0.1:{args.http_port}/health" in _healthcheck_cmd(frontend)[-1]
    mounts = dict(v.split(":")[:2] for v in frontend["volumes"])
    assert args.cache_dir in mounts.values()
    assert set(mounts) <= set(compose["volumes"])


def test_ports_are_published_on_loopback_unless_overridden(compose: dict[str, Any]) -> None:
    services = _services(compose)
    env = {
        "DMDC_PUBLISH_HOST": "0.0.0.0",
        "DMDC_ETCD_PORT": "12379",
        "DMDC_WORKER_PORT": "19090",
        "DMDC_FRONTEND_PORT": "18000",
    }
    published = {name: _published(s, env) for name, s in services.items() if "ports" in s}
    assert published == {
        "etcd": {2379: "0.0.0.0:12379"},
        "worker": {9090: "0.0.0.0:19090"},
        "frontend": {8000: "0.0.0.0:18000"},
    }
    assert all(
        h.startswith("127.0.0.1:") for s in services.values() for h in _published(s).values()
    )


@pytest.mark.parametrize("name", ["etcd", "worker", "frontend"])
def test_healthcheck_arguments_have_no_whitespace(compose: dict[str, Any], name: str) -> None:
    """Podman's Docker API (4.3 in Debian 12) splits exec-form arguments at whitespace."""
    for arg in _healthcheck_cmd(_services(compose)[name]):
        assert not re.search(r"\s", arg), arg


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


def test_dockerfile_installs_the_locked_package_with_the_cli_as_entrypoint() -> None:
    text = DOCKERFILE.read_text()
    # A pinned base: a full Python version and the Debian release.
    bases = re.findall(r"^FROM (\S+)$", text, re.M)
    assert len(bases) == 1 and re.fullmatch(r"python:3\.11\.\d+-slim-bookworm", bases[0]), bases
    assert re.search(r"^RUN pip install --no-deps -r requirements\.lock$", text, re.M)
    assert re.search(
        r"^RUN pip install --no-deps --no-build-isolation \. \\\n\s+&& pip check", text, re.M
    )
    assert re.search(r'^ENTRYPOINT \["discovery-mdc"\]$', text, re.M)
    # The build context keeps only what the install needs.
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {
        "*",
        "!requirements.lock",
        "!pyproject.toml",
        "!README.md",
        "!discovery_mdc/",
    } <= ignored
    # The license files pyproject.toml names are in the context and copied before the build
    # (setuptools builds without them, silently leaving them out of the installed metadata).
    license_files = tomllib.loads(PYPROJECT.read_text())["project"]["license-files"]
    (copy,) = re.findall(r"^COPY pyproject\.toml (.+) \./$", text, re.M)
    for name in license_files:
        assert f"!{name}" in ignored and name in copy.split(), name


def _lock() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==" and not req.extras and not req.marker, line
            pins[req.name.lower().replace("_", "-")] = spec.version
    return pins


def test_the_lock_pins_every_runtime_and_build_requirement() -> None:
    meta = tomllib.loads(PYPROJECT.read_text())
    pins = _lock()
    wanted = [*meta["project"]["dependencies"], *meta["build-system"]["requires"]]
    for text in wanted:
        req = Requirement(text)
        name = req.name.lower().replace("_", "-")
        assert name in pins, f"{name} is not pinned in {LOCK.name}"
        assert req.specifier.contains(pins[name]), f"{name}=={pins[name]} violates {text!r}"
