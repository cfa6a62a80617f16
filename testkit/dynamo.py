"""Helpers for running the real NVIDIA Dynamo runtime as a peer (tests and benchmarks).

The peer lives in its own venv (it is not a project dependency). Everything here talks to it
through subprocesses, so this module imports nothing from Dynamo and works on any interpreter.

Peer recipe (see docs/interop.md)::

    python -m venv ~/.cache/discovery-mdc/dynamo-1.6.1
    pip install ai-dynamo-runtime==1.6.1 packaging PyYAML msgspec
    pip install --no-deps ai-dynamo==1.6.1

A plain ``pip install ai-dynamo`` fails on this kind of machine: one of its dependencies
downloads from an unreachable host, and neither the worker API nor the frontend needs it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

from testkit._gateway import (
    etcd_delete_prefix,
    etcd_get_prefix,
    etcd_lease_grant,
    etcd_lease_revoke,
    etcd_put,
)
from testkit._process import Process, child_env
from testkit._servers import free_port
from testkit._wait import wait_until_sync

__all__ = [
    "DYNAMO_VERSION",
    "FRONTEND_MODULE",
    "WORKER_SCRIPT",
    "default_venv_dir",
    "dynamo_env",
    "dynamo_instances",
    "dynamo_model_workers",
    "ensure_dynamo_venv",
    "etcd_delete_prefix",
    "etcd_get_prefix",
    "etcd_lease_grant",
    "etcd_lease_revoke",
    "etcd_put",
    "free_port_below_32768",
    "http_json",
    "in_ci",
    "install_lock_path",
    "list_models",
    "oracle_local_dir",
    "oracle_local_dirs",
    "raw_card_json",
    "read_port_file",
    "start_dynamo_frontend",
    "start_dynamo_worker",
    "start_our_frontend",
    "start_our_worker",
    "wait_for_keys",
    "wait_for_models",
    "write_dynamo_sample_model",
    "write_worker_script",
]

DYNAMO_VERSION: Final = "1.6.1"
FRONTEND_MODULE: Final = "dynamo.frontend"
_PIP_STEPS: Final = (
    ["install", f"ai-dynamo-runtime=={DYNAMO_VERSION}", "packaging", "PyYAML", "msgspec"],
    ["install", "--no-deps", f"ai-dynamo=={DYNAMO_VERSION}"],
)
# A whole install is ~75 MB; allow slow mirrors, but never hang forever on a stale lock.
_INSTALL_TIMEOUT: Final = 1200.0
_LOCK_TIMEOUT: Final = _INSTALL_TIMEOUT + 60.0


# --------------------------------------------------------------------------- the peer venv


_REPO: Final = Path(__file__).resolve().parent.parent
_FRESH_DONE: set[Path] = set()  # venvs this process already installed fresh


def in_ci() -> bool:
    """True when ``$CI`` is set to anything but ``""``/``0``/``false`` (as CI services do)."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def default_venv_dir() -> Path:
    """``$DMDC_DYNAMO_VENV``; else ``<repo>/.venv-dynamo-ci`` in CI (never the developer's
    cache); else ``~/.cache/discovery-mdc/dynamo-<version>`` (reused between local runs)."""
    env = os.environ.get("DMDC_DYNAMO_VENV")
    if env:
        return Path(env).expanduser()
    if in_ci():
        return _REPO / ".venv-dynamo-ci"
    return Path.home() / ".cache" / "discovery-mdc" / f"dynamo-{DYNAMO_VERSION}"


def _venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def _venv_works(python: Path) -> bool:
    if not python.exists():
        return False
    try:
        subprocess.run(
            [str(python), "-c", "import dynamo.llm, dynamo.runtime, dynamo._core"],
            check=True,
            capture_output=True,
            timeout=120,
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return True


def install_lock_path(venv: Path) -> Path:
    """The lock that serialises installs into ``venv``: beside it (``.<name>.lock``), unless
    that is inside this repository (CI's ``<repo>/.venv-dynamo-ci`` made a stray
    ``<repo>/..venv-dynamo-ci.lock``); then in the temp dir, keyed by the venv's path."""
    venv = venv.absolute()
    beside = venv.parent / f".{venv.name}.lock"
    if _REPO not in beside.parents:
        return beside
    key = hashlib.sha256(os.fsencode(venv)).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"discovery-mdc-{venv.name.lstrip('.')}-{key}.lock"


@contextlib.contextmanager
def _file_lock(path: Path, timeout: float) -> Iterator[None]:
    """An exclusive ``flock`` with a deadline (a lock with no timeout hangs after a crash;
    the kernel drops an flock when its holder dies, so a killed installer frees it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"timed out after {timeout:.0f}s waiting for {path}"
                    ) from None
                time.sleep(0.5)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def ensure_dynamo_venv(venv: Path | None = None, *, fresh: bool = False) -> Path:
    """Return the peer venv's python, creating the venv first if it is missing or broken.

    ``fresh=True`` reinstalls it from scratch (``venv --clear``) the first time this process
    asks for that venv, and reuses it afterwards; CI uses it so every run tests a clean
    install of the pinned versions. Idempotent, and safe when several test processes call
    it at once (a lock file beside the venv serialises installs; latecomers find the
    finished venv and reuse it).
    """
    venv = (venv if venv is not None else default_venv_dir()).absolute()
    python = _venv_python(venv)
    fresh = fresh and venv not in _FRESH_DONE
    if not fresh and _venv_works(python):
        return python
    with _file_lock(install_lock_path(venv), _LOCK_TIMEOUT):
        if not fresh and _venv_works(python):  # another process installed it meanwhile
            return python
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        for step in _PIP_STEPS:
            subprocess.run(
                [str(python), "-m", "pip", "--disable-pip-version-check", "-q", *step],
                check=True,
                timeout=_INSTALL_TIMEOUT,
            )
        if not _venv_works(python):
            raise RuntimeError(
                f"installed the Dynamo peer into {venv} but `import dynamo.llm` fails"
            )
        _FRESH_DONE.add(venv)
    return python


# --------------------------------------------------------------------------- environment


def free_port_below_32768(host: str = "127.0.0.1") -> int:
    """A free port ≤ 32767: Dynamo parses ``DYN_SYSTEM_PORT`` as a signed 16-bit number."""
    for _ in range(200):
        port = free_port(host)
        if port <= 32767:
            return port
    # The ephemeral range is above 32767 on this host; probe the low range directly.
    for port in range(20000 + os.getpid() % 10000, 32768):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free TCP port at or below 32767")


def dynamo_env(
    etcd_url: str,
    home: str | os.PathLike[str],
    *,
    system_port: int | None = None,
    self_host: bool | None = None,
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The environment for a Dynamo worker or frontend on loopback, with a cold cache.

    ``system_port`` sets ``DYN_SYSTEM_PORT`` (needed for self-hosting; ≤ 32767);
    ``self_host`` sets ``DYN_SELF_HOST_METADATA`` to ``1``/``0`` (unset: Dynamo's default, on).
    """
    if system_port is not None and not 0 <= system_port <= 32767:
        raise ValueError(f"DYN_SYSTEM_PORT must be in 0..32767 (parsed as i16), got {system_port}")
    env = {
        k: v
        for k, v in os.environ.items()
        # Never inherit Dynamo/etcd knobs from the caller's shell: tests must be hermetic.
        if not k.startswith(("DYN_", "ETCD_", "NATS_", "VIRTUAL_ENV"))
    }
    env.update(
        ETCD_ENDPOINTS=etcd_url,
        DYN_DISCOVERY_BACKEND="etcd",
        DYN_REQUEST_PLANE="tcp",
        DYN_TCP_RPC_HOST="127.0.0.1",
        DYN_TCP_RESPONSE_STREAM_HOST="127.0.0.1",
        DYN_EVENT_PLANE_HOST="127.0.0.1",
        DYN_SYSTEM_HOST="127.0.0.1",
        HOME=os.fspath(home),
        PYTHONUNBUFFERED="1",
    )
    if system_port is not None:
        env["DYN_SYSTEM_PORT"] = str(system_port)
    if self_host is not None:
        env["DYN_SELF_HOST_METADATA"] = "1" if self_host else "0"
    if extra:
        env.update(extra)
    return env


# --------------------------------------------------------------------------- model dirs


def write_dynamo_sample_model(directory: str | os.PathLike[str], **kwargs: Any) -> Path:
    """``discovery_mdc._sample.write_sample_model``, whose tokenizer.json Dynamo loads.

    A Chat model needs ``chat_template=True`` (the default): Dynamo's frontend refuses a Chat
    model whose tokenizer_config.json has no chat_template.
    """
    from discovery_mdc._sample import write_sample_model

    return write_sample_model(directory, **kwargs)


# --------------------------------------------------------------------------- worker, frontend

# Checked against the 1.6.1 API (dynamo/_core.pyi): `DistributedRuntime(loop, discovery_backend,
# request_plane)`, `rt.endpoint("ns.comp.ep")`, `dynamo.llm.register_model(model_input,
# model_type, endpoint, model_path, model_name, *, worker_type=..., lora_name=...,
# base_model_path=..., custom_template_path=..., self_host_metadata=...)` and
# `ep.serve_endpoint(handler)`. Configuration comes in as JSON in argv[1].
WORKER_SCRIPT: Final = r"""
import asyncio, json, signal, sys

from dynamo.llm import (
    ModelInput, ModelRuntimeConfig, ModelType, RouterConfig, RouterMode, WorkerType,
    register_model,
)
from dynamo.runtime import DistributedRuntime

CFG = json.loads(sys.argv[1])


async def handler(request, context=None):
    yield {"token_ids": [2], "finish_reason": "stop"}


async def main():
    loop = asyncio.get_running_loop()
    rt = DistributedRuntime(loop, "etcd", "tcp")
    # Without this the worker's keys outlive it until the lease (30 s) expires.
    loop.add_signal_handler(signal.SIGTERM, rt.shutdown)
    loop.add_signal_handler(signal.SIGINT, rt.shutdown)
    ep = rt.endpoint(CFG["endpoint"])
    model_type = ModelType.Empty
    for flag in CFG["model_type"]:
        model_type = model_type | getattr(ModelType, flag)
    kw = dict(CFG.get("register_kwargs") or {})
    if CFG.get("needs") is not None:
        kw["needs"] = [[getattr(WorkerType, w) for w in alt] for alt in CFG["needs"]]
    if CFG.get("router_mode"):
        kw["router_config"] = RouterConfig(getattr(RouterMode, CFG["router_mode"]))
    if CFG.get("runtime_config"):
        rc = ModelRuntimeConfig()
        for key, value in CFG["runtime_config"].items():
            setattr(rc, key, value)
        kw["runtime_config"] = rc
    worker_type = getattr(WorkerType, CFG["worker_type"])
    model_input = getattr(ModelInput, CFG["model_input"])
    await register_model(
        model_input, model_type, ep, CFG["model_dir"], CFG["name"], worker_type=worker_type, **kw
    )
    for lora in CFG.get("loras", []):
        await register_model(
            model_input, model_type, ep, lora["path"], lora["name"], worker_type=worker_type,
            lora_name=lora["name"], base_model_path=CFG["model_dir"], **kw)
    print("DYNAMO_WORKER_REGISTERED", flush=True)
    await ep.serve_endpoint(handler)


asyncio.run(main())
"""


def write_worker_script(directory: str | os.PathLike[str]) -> Path:
    """Write :data:`WORKER_SCRIPT` to ``directory/dynamo_worker.py`` and return its path."""
    path = Path(directory) / "dynamo_worker.py"
    path.write_text(WORKER_SCRIPT)
    return path


def _spawn(
    argv: Sequence[str], env: Mapping[str, str], log: str | os.PathLike[str] | None
) -> Process:
    """Start ``argv`` in its own session with stdout+stderr appended to ``log``."""
    log_path = Path(log) if log is not None else Path(os.devnull)
    return Process(argv, log_path=log_path, env=env, append=True, new_session=True)


def start_dynamo_worker(
    python: str | os.PathLike[str],
    env: Mapping[str, str],
    model_dir: str | os.PathLike[str],
    name: str | None = None,
    *,
    endpoint: str = "dynamo.backend.generate",
    model_type: Sequence[str] = ("Chat", "Completions"),
    model_input: str = "Tokens",
    worker_type: str = "Aggregated",
    needs: Sequence[Sequence[str]] | None = None,
    router_mode: str | None = None,
    runtime_config: Mapping[str, Any] | None = None,
    loras: Sequence[tuple[str, str | os.PathLike[str]]] = (),
    register_kwargs: Mapping[str, Any] | None = None,
    log: str | os.PathLike[str] | None = None,
    workdir: str | os.PathLike[str] | None = None,
) -> Process:
    """Start a Dynamo worker serving ``model_dir`` as ``name`` on ``endpoint`` (``ns.comp.ep``).

    Names are the Python enum members (``"Chat"``, ``"Tokens"``, ``"Aggregated"``,
    ``"Prefill"``, ``"KV"``). ``needs`` is DNF (``[["Decode"]]``); ``runtime_config`` sets
    ``ModelRuntimeConfig`` attributes (e.g. ``{"context_length": 1024}``); ``loras`` is
    ``[(lora_name, lora_dir), ...]`` registered on the same endpoint; ``register_kwargs``
    go to ``register_model`` as is (JSON values only: ``kv_cache_block_size``,
    ``custom_template_path``, ``self_host_metadata``, ``user_data``, ``model_aliases``, ...).
    Output goes to ``log``; the worker prints ``DYNAMO_WORKER_REGISTERED`` once registered.
    Stop it with its ``stop()``.
    """
    cfg: dict[str, Any] = {
        "endpoint": endpoint,
        "model_dir": os.fspath(model_dir),
        "name": name,
        "model_type": list(model_type),
        "model_input": model_input,
        "worker_type": worker_type,
        "needs": [list(alt) for alt in needs] if needs is not None else None,
        "router_mode": router_mode,
        "runtime_config": dict(runtime_config) if runtime_config else None,
        "loras": [{"name": n, "path": os.fspath(p)} for n, p in loras],
        "register_kwargs": dict(register_kwargs or {}),
    }
    script_dir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="dyn-w-"))
    script = write_worker_script(script_dir)
    return _spawn([os.fspath(python), str(script), json.dumps(cfg)], env, log)


def start_dynamo_frontend(
    python: str | os.PathLike[str],
    env: Mapping[str, str],
    http_port: int,
    *,
    extra_args: Sequence[str] = (),
    log: str | os.PathLike[str] | None = None,
) -> Process:
    """Start ``python -m dynamo.frontend --http-host 127.0.0.1 --http-port P``."""
    argv = [
        os.fspath(python),
        "-m",
        FRONTEND_MODULE,
        "--http-host",
        "127.0.0.1",
        "--http-port",
        str(http_port),
        *extra_args,
    ]
    return _spawn(argv, env, log)


# --------------------------------------------------------------------------- our processes


def start_our_worker(
    etcd_url: str,
    model_dir: str | os.PathLike[str],
    name: str,
    *,
    namespace: str = "dynamo",
    system_port: int | None = 0,
    self_host: bool | None = None,
    instance_transport: str | None = None,
    extra_args: Sequence[str] = (),
    env_extra: Mapping[str, str] | None = None,
    log: str | os.PathLike[str] | None = None,
) -> Process:
    """``python -m discovery_mdc worker`` for ``model_dir`` (passed exactly as given).

    ``system_port`` sets ``DYN_SYSTEM_PORT`` (0: any free port; None: no status server) with
    ``DYN_SYSTEM_HOST=127.0.0.1``; ``self_host=False`` adds ``--no-self-host``;
    ``instance_transport`` adds ``--instance-transport``. Stop it with its ``stop()``.
    """
    env = child_env(**dict(env_extra or {}))
    if system_port is not None:
        env.update(DYN_SYSTEM_HOST="127.0.0.1", DYN_SYSTEM_PORT=str(system_port))
    argv = [
        sys.executable, "-m", "discovery_mdc", "worker", "--etcd", etcd_url,
        "--model-path", os.fspath(model_dir), "--model-name", name, "--namespace", namespace,
        "--lease-ttl", "30",
    ]  # fmt: skip
    if self_host is False:
        argv.append("--no-self-host")
    if instance_transport is not None:
        argv += ["--instance-transport", instance_transport]
    return _spawn([*argv, *extra_args], env, log)


def start_our_frontend(
    etcd_url: str,
    cache_dir: str | os.PathLike[str],
    port_file: str | os.PathLike[str],
    *,
    log: str | os.PathLike[str] | None = None,
) -> Process:
    """``python -m discovery_mdc frontend`` on 127.0.0.1 with a free port (written to
    ``port_file``; read it with :func:`read_port_file`)."""
    argv = [
        sys.executable, "-m", "discovery_mdc", "frontend", "--etcd", etcd_url,
        "--http-host", "127.0.0.1", "--http-port", "0", "--port-file", os.fspath(port_file),
        "--cache-dir", os.fspath(cache_dir),
    ]  # fmt: skip
    return _spawn(argv, child_env(), log)


def read_port_file(
    path: str | os.PathLike[str],
    *,
    timeout: float = 60.0,
    proc: Process | None = None,
) -> int:
    """Wait for a ``--port-file`` to hold a port number and return it."""

    def read() -> int | None:
        text = Path(path).read_text().strip() if Path(path).exists() else ""
        return int(text) if text.isdigit() else None

    port: int = wait_until_sync(read, timeout=timeout, message=f"port file {path}", proc=proc)
    return port


def http_json(url: str, timeout: float = 5.0) -> Any:
    """GET ``url`` and decode its JSON body."""
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read())


def dynamo_instances(http_port: int) -> list[dict[str, Any]]:
    """The Endpoint records a Dynamo frontend knows, from its ``GET /health``."""
    body = http_json(f"http://127.0.0.1:{http_port}/health")
    return list(body.get("instances", []))


def dynamo_model_workers(http_port: int, model: str) -> dict[str, int]:
    """``{namespace: admitted workers}`` from a Dynamo frontend's ``/v1/models/{m}/ready``.

    The count is of instances admitted into the model's worker set: a card with another
    mdcsum is rejected and not counted.
    """
    quoted = urllib.parse.quote(model, safe="")
    try:
        body = http_json(f"http://127.0.0.1:{http_port}/v1/models/{quoted}/ready")
    except urllib.error.HTTPError:
        return {}
    out: dict[str, int] = {}
    for ns, info in (body.get("namespaces") or {}).items():
        types = info.get("worker_types") or {}
        out[ns] = sum(int(t.get("workers", 0)) for t in types.values())
    return out


# --------------------------------------------------------------------------- mdcsum oracle

_ORACLE: Final = r"""
import json, sys
from dynamo._core import ModelDeploymentCard
out = []
for text in json.load(sys.stdin):
    try:
        out.append({"local_dir": ModelDeploymentCard.from_json_str(text).local_dir()})
    except Exception as exc:  # report per card; one bad card must not hide the others
        out.append({"error": f"{type(exc).__name__}: {exc}"})
json.dump(out, sys.stdout)
"""


def oracle_local_dirs(
    cards_json: Sequence[str], python: str | os.PathLike[str] | None = None
) -> list[str]:
    """``ModelDeploymentCard.from_json_str(c).local_dir()`` for each card, in one subprocess.

    The result is ``.../by-slug/<slug>/<mdcsum>`` as computed by Dynamo's Rust code (no disk
    access). Raises ``ValueError`` naming the card index if the peer rejects a card.
    """
    py = os.fspath(python) if python is not None else os.fspath(ensure_dynamo_venv())
    proc = subprocess.run(
        [py, "-c", _ORACLE],
        input=json.dumps(list(cards_json)).encode(),
        capture_output=True,
        check=True,
        timeout=120,
    )
    results = json.loads(proc.stdout)
    out = []
    for i, item in enumerate(results):
        if "error" in item:
            raise ValueError(f"Dynamo rejected card #{i}: {item['error']}")
        out.append(str(item["local_dir"]))
    return out


def oracle_local_dir(card_json: str, python: str | os.PathLike[str] | None = None) -> str:
    """Dynamo's ``local_dir()`` for one card JSON string: ``.../by-slug/<slug>/<mdcsum>``."""
    return oracle_local_dirs([card_json], python)[0]


# --------------------------------------------------------------------------- etcd (gateway)


# --------------------------------------------------------------------------- waiting


def wait_for_keys(
    etcd_url: str,
    prefix: str,
    count: int = 1,
    *,
    timeout: float = 60.0,
    proc: Process | None = None,
) -> dict[str, bytes]:
    """Wait until at least ``count`` keys exist under ``prefix``; return them."""

    def check() -> dict[str, bytes] | None:
        kvs = etcd_get_prefix(etcd_url, prefix)
        return kvs if len(kvs) >= count else None

    result: dict[str, bytes] = wait_until_sync(
        check, timeout=timeout, message=f"{count} key(s) under {prefix!r}", proc=proc
    )
    return result


def list_models(http_port: int, host: str = "127.0.0.1") -> list[str]:
    """Model ids from an OpenAI-compatible ``GET /v1/models``."""
    url = f"http://{host}:{http_port}/v1/models"
    with urllib.request.urlopen(url, timeout=5) as resp:
        body = json.loads(resp.read())
    return [str(m["id"]) for m in body.get("data", [])]


def wait_for_models(
    http_port: int,
    expected: Sequence[str],
    *,
    present: bool = True,
    timeout: float = 60.0,
    proc: Process | None = None,
) -> list[str]:
    """Wait until every model in ``expected`` is listed (or, with ``present=False``, none is)."""

    def check() -> list[str] | None:
        models = list_models(http_port)
        if present:
            ok = all(m in models for m in expected)
        else:
            ok = not any(m in models for m in expected)
        return (models or ["<none>"]) if ok else None

    result: list[str] = wait_until_sync(
        check, timeout=timeout, message=f"models {list(expected)} present={present}", proc=proc
    )
    return result


# --------------------------------------------------------------------------- golden capture

# Each scenario: (name, model dir under models/, display name, options). Options:
# sysport (run the status server, so Dynamo self-hosts by default), self_host (sets
# DYN_SELF_HOST_METADATA), and start_dynamo_worker keyword arguments.
_SCENARIOS: Final[tuple[tuple[str, str, str | None, dict[str, Any]], ...]] = (
    ("selfhost", "basic", None, {"sysport": True}),
    ("noport", "basic", None, {"sysport": False}),
    ("selfhost_off", "basic", None, {"sysport": True, "self_host": False}),
    ("jinja_selfhost", "jinja", None, {"sysport": True}),
    ("jinja_noport", "jinja", None, {"sysport": False}),
    ("extras_selfhost", "extras", None, {"sysport": True}),
    ("extras_noport", "extras", None, {"sysport": False}),
    ("custom_template_selfhost", "basic", None,
     {"sysport": True, "custom_template": "custom_template.jinja"}),
    ("nochat_completions", "nochat", None, {"sysport": True, "model_type": ("Completions",)}),
    ("tokenizer_ctx_noport", "tcctx", None, {"sysport": False}),
    ("slashname_selfhost", "basic", "Org/Model-1.5B v2", {"sysport": True}),
    ("lora_selfhost", "basic", None, {"sysport": True, "loras": [("Adapter.A", "lora-a")]}),
    ("lora_noport", "basic", None, {"sysport": False, "loras": [("Adapter.A", "lora-a")]}),
    ("extmatrix_selfhost", "extmatrix", None, {"sysport": True}),
    ("prefill_ns", "basic", None,
     {"sysport": True, "endpoint": "myns.prefill.generate", "worker_type": "Prefill",
      "model_type": (), "needs": [["Decode"], ["Aggregated"]]}),
    ("knobs_selfhost", "basic", None,
     {"sysport": True, "router_mode": "KV",
      "runtime_config": {"context_length": 1024, "max_num_seqs": 8,
                         "reasoning_parser": "deepseek_r1", "total_kv_blocks": 100},
      "register_kwargs": {"kv_cache_block_size": 32, "user_data": {"team": "x", "n": 1},
                          "model_aliases": ["alias-one", "Alias.Two"]}}),
    ("knobs_noport", "basic", None,
     {"sysport": False, "router_mode": "RoundRobin", "runtime_config": {"context_length": 0},
      "register_kwargs": {"kv_cache_block_size": 64}}),
)  # fmt: skip


def write_golden_models(models: Path) -> None:
    """The model dirs the golden scenarios serve (deterministic bytes; committed as data)."""
    import shutil

    shutil.rmtree(models, ignore_errors=True)
    for name in ("basic", "jinja", "extras", "extmatrix"):
        write_dynamo_sample_model(models / name, vocab_size=100)
    write_dynamo_sample_model(
        models / "nochat", vocab_size=100, chat_template=False, generation_config=False,
        extra_files=False,
    )  # fmt: skip
    tc = write_dynamo_sample_model(models / "tcctx", vocab_size=100, max_position_embeddings=None)
    cfg = json.loads((tc / "tokenizer_config.json").read_text())
    cfg["model_max_length"] = 2048
    (tc / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    (models / "jinja" / "chat_template.jinja").write_text(
        "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    )
    (models / "custom_template.jinja").write_text("{{ messages[0]['content'] }}")
    extras = models / "extras"
    (extras / "tokenizer.model").write_bytes(bytes(range(256)) * 2)
    (extras / "added_tokens.json").write_text(json.dumps({"<pad>": 100}))
    (extras / "vocab.json").write_text(json.dumps({"a": 0, "b": 1}))
    (extras / "merges.txt").write_text("#version: 0.2\na b\n")
    (extras / "preprocessor_config.json").write_text(json.dumps({"do_resize": False}))
    (extras / "README.md").write_text("# sample\n")
    (extras / ".hidden").write_text("hidden\n")
    (extras / "pytorch_model.bin").write_bytes(b"\0" * 64)
    (extras / "sub").mkdir()
    (extras / "sub" / "nested.json").write_text("{}")
    matrix = models / "extmatrix"
    for n in (
        "vocab.txt", "spiece.model", "notes.md", "LICENSE", "script.py", "conf.yaml",
        "extra.jinja", "data.npy", "processor_config.json", "README.txt", ".hidden.json",
        "UPPER.JSON", "w.msgpack", "x.pt", "y.gguf", "z.onnx", "a.h5", "t.tflite", "f.pth",
        "tokenizer.tiktoken.bak", "README", "readme.md", "USE_POLICY.md", "LICENSE.md",
    ):  # fmt: skip
        (matrix / n).write_text("{}")
    (matrix / "big.json").write_text(json.dumps({"k": "x" * (100 << 10)}))
    (matrix / "chat_template.json").write_text(
        json.dumps({"chat_template": "{{ messages[0]['content'] }}"})
    )
    os.symlink("vocab.txt", matrix / "linked.txt")
    lora = models / "lora-a"
    lora.mkdir()
    (lora / "adapter_config.json").write_text(
        json.dumps({"r": 8, "lora_alpha": 16, "target_modules": ["q_proj"], "peft_type": "LORA"})
    )
    (lora / "adapter_model.safetensors").write_bytes(b"\0" * 64)


def raw_card_json(envelope: bytes) -> str:
    """The exact bytes of ``card_json`` inside an envelope (no re-serialisation)."""
    import msgspec

    fields = msgspec.json.decode(envelope, type=dict[str, msgspec.Raw])
    return bytes(fields["card_json"]).decode()


def capture_goldens(out_dir: Path, python: Path | None = None) -> dict[str, Any]:
    """Run every scenario against a fresh etcd and a Dynamo frontend; write the raw values of
    ``v1/mdc/...`` and ``v1/instances/...`` plus ``manifest.json`` into ``out_dir``."""
    import shutil

    from discovery_mdc.etcd import EtcdServer

    py = python or ensure_dynamo_venv()
    models = out_dir / "models"
    write_golden_models(models)
    for old in out_dir.glob("*.json"):
        old.unlink()
    work = Path(tempfile.mkdtemp(prefix="dyn-capture-"))
    manifest: dict[str, Any] = {
        "dynamo": {"ai-dynamo": DYNAMO_VERSION, "ai-dynamo-runtime": DYNAMO_VERSION},
        "produced_by": "python -m testkit.dynamo capture (capture_goldens)",
        "envelopes": [],
        "instances": [],
    }
    with EtcdServer() as etcd:
        url = etcd.client_url
        fhome = work / "frontend-home"
        fhome.mkdir()
        fport = free_port()
        fe = start_dynamo_frontend(py, dynamo_env(url, fhome), fport, log=work / "fe.log")
        try:
            wait_until_sync(
                lambda: list_models(fport) is not None, message="frontend up", proc=fe, timeout=60.0
            )
            for scen, model, display, opts in _SCENARIOS:
                opts = dict(opts)
                sysport = free_port_below_32768() if opts.pop("sysport") else None
                self_host = opts.pop("self_host", None)
                home = work / f"home-{scen}"
                home.mkdir()
                env = dynamo_env(url, home, system_port=sysport, self_host=self_host)
                custom = opts.pop("custom_template", None)
                if custom:
                    opts.setdefault("register_kwargs", {})["custom_template_path"] = str(
                        models / custom
                    )
                loras = [(n, models / d) for n, d in opts.pop("loras", [])]
                name = display or scen
                w = start_dynamo_worker(
                    py, env, models / model, name, loras=loras, log=work / f"w-{scen}.log",
                    workdir=home, **opts,
                )  # fmt: skip
                try:
                    kvs = wait_for_keys(url, "v1/", 2 + len(loras), proc=w)
                    listed: list[str] | None = None
                    if opts.get("worker_type", "Aggregated") != "Prefill":
                        expected = [name, *(n for n, _ in loras)]
                        listed = wait_for_models(fport, expected, proc=fe)
                finally:
                    w.stop()
                etcd_delete_prefix(url, "v1/")
                wait_for_models(fport, [name], present=False, proc=fe)
                common = {
                    "scenario": scen,
                    "model_dir": f"models/{model}",
                    "display_name": name,
                    "system_port": sysport is not None,
                    "DYN_SELF_HOST_METADATA": self_host,
                    "register": {k: v for k, v in opts.items()} | (
                        {"loras": [[n, str(d.relative_to(out_dir))] for n, d in loras]}
                        if loras else {}
                    ),
                }  # fmt: skip
                for key, value in sorted(kvs.items()):
                    kind = "mdc" if key.startswith("v1/mdc/") else "instance"
                    lora_part = key.split("/")[6] if kind == "mdc" and key.count("/") == 6 else ""
                    fname = f"{scen}.{kind}{'.' + lora_part if lora_part else ''}.json"
                    (out_dir / fname).write_bytes(value)
                    entry = {"file": fname, "key": key, **common}
                    if kind == "mdc":
                        entry["frontend_listed"] = listed
                        manifest["envelopes"].append(entry)
                    else:
                        manifest["instances"].append(entry)
        finally:
            fe.stop()
        # What the frontend cached: by-slug/<slug>/<mdcsum>/<files>.
        by_slug = fhome / ".cache" / "dynamo" / "mdc" / "by-slug"
        frontend_dirs = {
            f"{p.parent.name}/{p.name}": sorted(f.name for f in p.iterdir())
            for p in sorted(by_slug.glob("*/*"))
        }
    cards = [raw_card_json((out_dir / e["file"]).read_bytes()) for e in manifest["envelopes"]]
    for entry, local_dir in zip(manifest["envelopes"], oracle_local_dirs(cards, py), strict=True):
        slug, mdcsum = Path(local_dir).parts[-2:]
        entry["oracle_local_dir"] = local_dir
        entry["oracle_slug"] = slug
        entry["oracle_mdcsum"] = mdcsum
        entry["frontend_cache_files"] = frontend_dirs.get(f"{slug}/{mdcsum}")
    manifest["frontend_cache_dirs"] = sorted(frontend_dirs)
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    return manifest


def _main(argv: Sequence[str]) -> int:
    usage = "usage: python -m testkit.dynamo capture [OUT_DIR] | install [--fresh]"
    if argv[:1] == ["capture"]:
        out = Path(argv[1]) if len(argv) > 1 else Path("tests/data/dynamo")
        result = capture_goldens(out.resolve())
        print(f"captured {len(result['envelopes'])} envelopes into {out}")
        return 0
    if argv[:1] == ["install"] and set(argv[1:]) <= {"--fresh"}:
        started = time.monotonic()
        python = ensure_dynamo_venv(fresh="--fresh" in argv[1:])
        print(f"Dynamo {DYNAMO_VERSION} peer: {python} ({time.monotonic() - started:.0f}s)")
        return 0
    print(usage, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
