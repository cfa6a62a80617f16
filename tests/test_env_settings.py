"""One settings module reads the environment: each variable's parser, Dynamo's syntax, and the
precedence the CLI applies (flag > variable > default)."""

from __future__ import annotations

import argparse
import ast
import logging
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from discovery_mdc import _env
from discovery_mdc.cli import build_parser, main
from discovery_mdc.cli._common import apply_env_options
from discovery_mdc.cli._frontend import _scope
from discovery_mdc.cli._worker import resolve_endpoint_id
from discovery_mdc.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
# The Hugging Face variables are read by the HF resolver, as huggingface_hub reads them.
HF_READERS = {"_hf.py"}


def test_only_the_settings_module_reads_the_environment() -> None:
    package = ROOT / "discovery_mdc"
    readers = {
        str(path.relative_to(package))
        for path in package.rglob("*.py")
        if re.search(r"os\.environ|os\.getenv|environ\.get", path.read_text())
    }
    assert readers - HF_READERS == {"_env.py"}


# Functions outside the CLI that may read a variable: the ``from_env`` constructors, the
# endpoint list ``EtcdClient.from_env`` uses, and the etcd binary lookup of the demo and tests.
ENV_READERS = {"from_env", "endpoints_from_env", "find_etcd_binary"}


def _attribute_calls(
    tree: ast.AST, name_of: Callable[[ast.Attribute], str | None]
) -> Iterator[tuple[str, str, int]]:
    """(enclosing function, name, line) for each ``<expr>.<attr>(...)`` call that
    ``name_of`` names (returns a name for)."""

    def visit(node: ast.AST, function: str) -> Iterator[tuple[str, str, int]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                yield from visit(child, child.name)
                continue
            if isinstance(child, ast.Call) and isinstance(child.func, ast.Attribute):
                name = name_of(child.func)
                if name is not None:
                    yield function, name, child.lineno
            yield from visit(child, function)

    yield from visit(tree, "<module>")


def _env_reads(tree: ast.AST) -> Iterator[tuple[str, str, int]]:
    """(enclosing function, variable, line) for each ``VAR.get()``/``VAR.raw()`` of an
    :class:`~discovery_mdc._env.EnvVar`, however it was imported."""
    variables = {v_name for v_name, v in vars(_env).items() if isinstance(v, _env.EnvVar)}
    imported = {
        alias.asname or alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module == "discovery_mdc._env"
        for alias in node.names
        if alias.name in variables
    }

    def variable(call: ast.Attribute) -> str | None:
        target = call.value
        if call.attr not in ("get", "raw"):
            return None
        if isinstance(target, ast.Name) and target.id in imported:
            return target.id
        if (
            isinstance(target, ast.Attribute)
            and isinstance(target.value, ast.Name)
            and target.value.id == "_env"
            and target.attr in variables
        ):
            return target.attr
        return None

    return _attribute_calls(tree, variable)


def _from_env_calls(tree: ast.AST) -> Iterator[tuple[str, str, int]]:
    """(enclosing function, ``"from_env"``, line) for each ``<anything>.from_env(...)``."""
    return _attribute_calls(tree, lambda call: "from_env" if call.attr == "from_env" else None)


def _outside_the_env_readers(
    finder: Callable[[ast.AST], Iterator[tuple[str, str, int]]],
) -> list[str]:
    """What ``finder`` finds in the package outside the settings module, the HF resolver, the
    CLI and the functions allowed to read the environment."""
    package = ROOT / "discovery_mdc"
    return [
        f"{path.relative_to(package)}:{line} {function}(): {name}"
        for path in sorted(package.rglob("*.py"))
        if path.name not in ("_env.py", *HF_READERS) and path.parent.name != "cli"
        for function, name, line in finder(ast.parse(path.read_text()))
        if function not in ENV_READERS
    ]


def test_outside_the_cli_only_from_env_constructors_read_a_variable() -> None:
    assert _outside_the_env_readers(_env_reads) == []


def test_outside_the_cli_only_from_env_constructors_call_from_env() -> None:
    assert _outside_the_env_readers(_from_env_calls) == []


def test_the_from_env_call_finder_finds_calls_in_methods_and_at_module_level() -> None:
    source = (
        "X = A.from_env()\n"
        "class C:\n"
        "    def __init__(self): self.hf = HfEnv.from_env({})\n"
        "    def from_env(cls): return B.from_env()\n"
    )
    found = [(function, line) for function, _, line in _from_env_calls(ast.parse(source))]
    assert found == [("<module>", 1), ("__init__", 3), ("from_env", 4)]


def test_the_env_read_finder_finds_reads_in_both_import_styles() -> None:
    source = (
        "from discovery_mdc import _env\n"
        "from discovery_mdc._env import SYSTEM_PORT as PORT\n"
        "def a(): return _env.SELF_HOST_METADATA.get()\n"
        "def from_env(): return PORT.raw({})\n"
        "def b(): return _env.parse_port('1'), {}.get('x')\n"
    )
    found = list(_env_reads(ast.parse(source)))
    assert found == [("a", "SELF_HOST_METADATA", 3), ("from_env", "PORT", 4)]


def _readme_variable_rows() -> dict[str, str]:
    """The README's configuration table: each variable named in a row's first cell -> row."""
    readme = (ROOT / "README.md").read_text()
    table = readme.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    return {
        name: row
        for row in table.splitlines()
        if row.startswith("| `")
        for name in re.findall(r"`([A-Z][A-Z0-9_]+)`", row.split("|")[1])
    }


def test_every_variable_is_in_the_readme_marked_as_dynamos_or_ours() -> None:
    rows = _readme_variable_rows()
    for var in _env.VARIABLES:
        assert var.name in rows, var.name
        owner = rows[var.name].split("|")[2].strip()
        assert owner == ("Dynamo" if var.owner == _env.DYNAMO else "ours"), (var.name, owner)


def test_every_variable_the_hf_resolver_reads_is_in_the_readme_as_huggingface_hubs() -> None:
    rows = _readme_variable_rows()
    source = (ROOT / "discovery_mdc" / "_hf.py").read_text()
    read = set(re.findall(r"\be\.get\(\s*\"([A-Z][A-Z0-9_]+)\"", source)) - {"HOME"}
    assert {"HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "TRANSFORMERS_OFFLINE"} <= read
    for name in read:
        assert name in rows, name
        assert rows[name].split("|")[2].strip() == "huggingface_hub", rows[name]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("info", _env.LogFilter("info")),
        ("WARN", _env.LogFilter("warning")),
        ("trace", _env.LogFilter("debug")),
        (
            "warn,discovery_mdc.frontend=debug,dynamo_runtime::component=error",
            _env.LogFilter(
                "warning",
                (("discovery_mdc.frontend", "debug"), ("dynamo_runtime.component", "error")),
            ),
        ),
        ("discovery_mdc.cache", _env.LogFilter(None, (("discovery_mdc.cache", "debug"),))),
        ("info,h2[span]=debug,x=loud", _env.LogFilter("info", (), ("h2[span]=debug", "x=loud"))),
    ],
)
def test_dyn_log_is_read_as_dynamos_env_filter(text: str, expected: _env.LogFilter) -> None:
    assert _env.parse_log_filter(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("generate", _env.DynEndpoint("generate")),
        ("dyn://ns.backend.generate", _env.DynEndpoint("generate", "ns", "backend")),
        ("ns.backend.generate", _env.DynEndpoint("generate", "ns", "backend")),
    ],
)
def test_endpoint_forms(text: str, expected: _env.DynEndpoint) -> None:
    assert _env.parse_dyn_endpoint(text) == expected


@pytest.mark.parametrize(
    "bad", ["dyn://a.b", "a.b", "dyn://a..c", "dyn://a.b.c.d", "dyn://", "x/y", ""]
)
def test_malformed_endpoints_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="invalid endpoint"):
        _env.parse_dyn_endpoint(bad)


def test_endpoint_id_precedence() -> None:
    full = _env.DynEndpoint("chat", "team", "vllm")
    assert resolve_endpoint_id() == ("dynamo", "backend", "generate")
    assert resolve_endpoint_id(env_namespace="ns") == ("ns", "backend", "generate")
    assert resolve_endpoint_id(env_endpoint=full, env_namespace="ns") == ("team", "vllm", "chat")
    assert resolve_endpoint_id(namespace="flag", env_endpoint=full) == ("flag", "vllm", "chat")
    assert resolve_endpoint_id(endpoint=full, env_namespace="ns") == ("team", "vllm", "chat")
    assert resolve_endpoint_id(namespace="team", endpoint=full) == ("team", "vllm", "chat")
    with pytest.raises(ValueError, match="contradicts"):
        resolve_endpoint_id(namespace="other", endpoint=full)
    with pytest.raises(ValueError, match="invalid namespace"):
        resolve_endpoint_id(namespace="")


def test_the_worker_suffix_is_appended_as_dynamos_get_worker_namespace_does() -> None:
    full = _env.DynEndpoint("chat", "team", "vllm")

    def ns(**kw: Any) -> str:
        return resolve_endpoint_id(namespace_suffix="pool2", **kw)[0]

    # DYN_NAMESPACE (default dynamo) or --namespace, then "-{suffix}".
    assert ns() == "dynamo-pool2"
    assert ns(env_namespace="ns") == "ns-pool2"
    assert ns(namespace="flag", env_namespace="ns") == "flag-pool2"
    assert ns(namespace="flag", env_endpoint=full) == "flag-pool2"
    # A dyn://namespace.component.endpoint names the namespace exactly, as in Dynamo.
    assert ns(endpoint=full) == "team"
    assert ns(env_endpoint=full, env_namespace="ns") == "team"
    assert ns(namespace="team", endpoint=full) == "team"
    assert resolve_endpoint_id(namespace_suffix=None) == ("dynamo", "backend", "generate")


def test_the_worker_cli_reads_dyn_namespace_worker_suffix(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from discovery_mdc.cli._worker import _endpoint_id

    def endpoint_id(argv: list[str], env: dict[str, str]) -> tuple[str, str, str]:
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        args = _resolve(["worker", "--model-path", "m", *argv], env)
        return _endpoint_id(args, args.from_env)

    monkeypatch.delenv("DYN_NAMESPACE", raising=False)
    monkeypatch.delenv("DYN_ENDPOINT", raising=False)
    monkeypatch.delenv("DYN_NAMESPACE_WORKER_SUFFIX", raising=False)
    assert endpoint_id([], {})[0] == "dynamo"
    env = {"DYN_NAMESPACE": "prod", "DYN_NAMESPACE_WORKER_SUFFIX": "b"}
    assert endpoint_id([], env) == ("prod-b", "backend", "generate")
    assert endpoint_id(["--namespace", "x"], env)[0] == "x-b"
    assert endpoint_id(["--endpoint", "dyn://exact.c.e"], env) == ("exact", "c", "e")
    # Empty is unset, as Dynamo's `if suffix:` reads it; a '/' cannot be a key segment.
    assert endpoint_id([], {**env, "DYN_NAMESPACE_WORKER_SUFFIX": ""})[0] == "prod"
    with pytest.raises(ConfigError, match=r"^DYN_NAMESPACE_WORKER_SUFFIX='a/b': invalid"):
        endpoint_id([], {**env, "DYN_NAMESPACE_WORKER_SUFFIX": "a/b"})


def _resolve(argv: list[str], env: dict[str, str]) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    args.from_env = apply_env_options(args, env)
    return args


@pytest.mark.parametrize(
    ("argv", "env", "scope"),
    [
        ([], {"DYN_NAMESPACE": "a"}, ("a", None)),
        ([], {"DYN_NAMESPACE": "a", "DYN_NAMESPACE_PREFIX": "p"}, (None, "p")),  # as Dynamo
        (["--namespace", "b"], {"DYN_NAMESPACE_PREFIX": "p"}, ("b", None)),
        (["--namespace-prefix", "q"], {"DYN_NAMESPACE": "a"}, (None, "q")),
        (["--namespace", "b"], {"DYN_NAMESPACE": "a"}, ("b", None)),
    ],
)
def test_frontend_scope_flags_beat_variables(
    argv: list[str], env: dict[str, str], scope: tuple[str | None, str | None]
) -> None:
    assert _scope(_resolve(["frontend", *argv], env)) == scope


def test_frontend_http_settings_and_startup_timeout_from_dynamos_variables() -> None:
    env = {"DYN_HTTP_HOST": "127.0.0.1", "DYN_HTTP_PORT": "9001",
           "ETCD_STARTUP_CONNECT_TIMEOUT_SECONDS": "7"}  # fmt: skip
    args = _resolve(["frontend"], env)
    assert (args.http_host, args.http_port, args.startup_timeout) == ("127.0.0.1", 9001, 7)
    args = _resolve(["frontend", "--http-port", "9002", "--etcd-startup-timeout", "0"], env)
    assert (args.http_port, args.startup_timeout) == (9002, 0)
    defaults = _resolve(["frontend"], {})
    assert (defaults.http_host, defaults.http_port, defaults.startup_timeout) == (
        "127.0.0.1", 8000, 120
    )  # fmt: skip


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("ETCD_STARTUP_CONNECT_TIMEOUT_SECONDS", "1.5"),
        ("ETCD_STARTUP_CONNECT_TIMEOUT_SECONDS", "-1"),
        ("DYN_WORKER_GRACEFUL_SHUTDOWN_TIMEOUT", "soon"),
        ("DYN_HTTP_PORT", "70000"),
        ("DYN_ENDPOINT", "dyn://a.b"),
        ("DYN_COMPONENT", "a/b"),
        ("ETCD_LEASE_TTL", "9000000001"),
    ],
)
def test_a_bad_value_is_a_config_error_naming_the_variable(var: str, value: str) -> None:
    (parsed,) = [v for v in _env.VARIABLES if v.name == var]
    with pytest.raises(ConfigError, match=f"^{var}={value!r}: "):
        parsed.get({var: value})


@pytest.mark.parametrize(("env", "ttl"), [({}, 10), ({"ETCD_LEASE_TTL": "3"}, 3),
                                          ({"ETCD_LEASE_TTL": " 7 "}, 7)])  # fmt: skip
def test_etcd_lease_ttl(env: dict[str, str], ttl: int) -> None:
    assert _env.ETCD_LEASE_TTL.get(env) == ttl


@pytest.mark.parametrize("bad", ["0", "-1", "1.5", "ten"])
def test_etcd_lease_ttl_rejects_bad_values(bad: str) -> None:
    with pytest.raises(ValueError, match="ETCD_LEASE_TTL"):
        _env.ETCD_LEASE_TTL.get({"ETCD_LEASE_TTL": bad})


@pytest.mark.parametrize(
    ("value", "on"), [("1", True), ("TRUE", True), ("on", True), ("yes", True), ("0", False),
                      ("false", False), ("anything", False)]
)  # fmt: skip
def test_dyn_logging_jsonl_is_dynamos_is_truthy(value: str, on: bool) -> None:
    assert _env.LOGGING_JSONL.get({"DYN_LOGGING_JSONL": value}) is on


@pytest.mark.usefixtures("restore_root_logger")
def test_dyn_log_sets_levels_unless_the_flag_is_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DYN_LOG", "error,discovery_mdc.cache=debug")
    assert main(["cache", "ls", "--cache-dir", str(tmp_path)]) == 0
    assert logging.getLogger().level == logging.ERROR
    assert logging.getLogger("discovery_mdc.cache").level == logging.DEBUG
    logging.getLogger("discovery_mdc.cache").setLevel(logging.NOTSET)
    assert main(["cache", "ls", "--cache-dir", str(tmp_path), "--log-level", "Warning"]) == 0
    assert logging.getLogger().level == logging.WARNING
    assert logging.getLogger("discovery_mdc.cache").level == logging.NOTSET
