"""Env-backed options resolve flag > variable > default, the same way in every subcommand."""

from __future__ import annotations

import argparse

import pytest

from discovery_mdc.cli import build_parser
from discovery_mdc.cli._common import ENV_OPTIONS, apply_env_options
from discovery_mdc.errors import ConfigError


def _resolve(argv: list[str], env: dict[str, str]) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    apply_env_options(args, env)
    return args


def test_the_table_matches_the_wire_format_environment() -> None:
    assert {o.env: o.flag for o in ENV_OPTIONS.values()} == {
        "ETCD_ENDPOINTS": "--etcd",
        "ETCD_LEASE_TTL": "--lease-ttl",
        "DYN_SYSTEM_PORT": "--system-port",
        "DYN_SYSTEM_HOST": "--system-host",
        "DYN_SELF_HOST_METADATA": "--no-self-host",
        "DYN_MDC_CACHE_DIR": "--cache-dir",
        "ETCD_STARTUP_CONNECT_TIMEOUT_SECONDS": "--etcd-startup-timeout",
        "DYN_WORKER_GRACEFUL_SHUTDOWN_TIMEOUT": "--graceful-shutdown-timeout",
        "DYN_NAMESPACE": "--namespace",
        "DYN_NAMESPACE_PREFIX": "--namespace-prefix",
        "DYN_COMPONENT": "--component",
        "DYN_ENDPOINT": "--endpoint",
        "DYN_HTTP_HOST": "--http-host",
        "DYN_HTTP_PORT": "--http-port",
    }


@pytest.mark.parametrize("cmd", [["worker", "--model-path", "m"], ["frontend"], ["ls"]])
def test_etcd_endpoints_in_every_etcd_subcommand(cmd: list[str]) -> None:
    assert _resolve(cmd, {}).etcd == "http://127.0.0.1:2379"
    assert _resolve(cmd, {"ETCD_ENDPOINTS": "http://a:1, b:2"}).etcd == "http://a:1,b:2"
    assert _resolve([*cmd, "--etcd", "http://c:3"], {"ETCD_ENDPOINTS": "http://a:1"}).etcd == (
        "http://c:3"
    )


@pytest.mark.parametrize(
    "cmd",
    [
        ["frontend"],
        ["cache", "ls"],
        ["cache", "verify"],
        ["cache", "prune"],
        ["card", "fetch", "c"],
    ],
)
def test_dyn_mdc_cache_dir_in_every_cache_subcommand(cmd: list[str]) -> None:
    assert _resolve(cmd, {}).cache_dir is None  # then $HOME/.cache/dynamo/mdc
    assert _resolve(cmd, {"DYN_MDC_CACHE_DIR": "/c"}).cache_dir == "/c"
    assert _resolve([*cmd, "--cache-dir", "/f"], {"DYN_MDC_CACHE_DIR": "/c"}).cache_dir == "/f"


def test_worker_options_flag_beats_variable_beats_default() -> None:
    w = ["worker", "--model-path", "m"]
    args = _resolve(w, {})
    assert (args.lease_ttl, args.system_port, args.system_host, args.self_host) == (
        10, None, "0.0.0.0", True
    )  # fmt: skip
    env = {"ETCD_LEASE_TTL": "4", "DYN_SYSTEM_PORT": "9090", "DYN_SYSTEM_HOST": "10.0.0.5",
           "DYN_SELF_HOST_METADATA": "yes"}  # fmt: skip
    args = _resolve(w, env)
    assert (args.lease_ttl, args.system_port, args.system_host, args.self_host) == (
        4, 9090, "10.0.0.5", True
    )  # fmt: skip
    flags = ["--lease-ttl", "6", "--system-port", "0", "--system-host", "::", "--no-self-host"]
    args = _resolve([*w, *flags], env)
    assert (args.lease_ttl, args.system_port, args.system_host, args.self_host) == (
        6, 0, "::", False
    )  # fmt: skip


@pytest.mark.parametrize(
    ("value", "expected"),
    [("off", False), ("OFF", False), ("0", False), ("false", False), ("No", False), ("", False),
     ("on", True), ("1", True), ("true", True), ("anything", True)],
)  # fmt: skip
def test_dyn_self_host_metadata_values(value: str, expected: bool) -> None:
    args = _resolve(["worker", "--model-path", "m"], {"DYN_SELF_HOST_METADATA": value})
    assert args.self_host is expected


def test_empty_variables_count_as_unset() -> None:
    env = {
        "ETCD_ENDPOINTS": "",
        "ETCD_LEASE_TTL": " ",
        "DYN_SYSTEM_PORT": "",
        "DYN_SYSTEM_HOST": "",
    }
    args = _resolve(["worker", "--model-path", "m"], env)
    assert (args.etcd, args.lease_ttl, args.system_port, args.system_host) == (
        "http://127.0.0.1:2379", 10, None, "0.0.0.0"
    )  # fmt: skip


@pytest.mark.parametrize(
    ("var", "value"),
    [("ETCD_ENDPOINTS", "ftp://x:1"), ("ETCD_ENDPOINTS", "http://x"), ("ETCD_LEASE_TTL", "0"),
     ("ETCD_LEASE_TTL", "1.5"), ("DYN_SYSTEM_PORT", "-1"), ("DYN_SYSTEM_PORT", "http")],
)  # fmt: skip
def test_bad_variable_is_a_usage_error_naming_it(var: str, value: str) -> None:
    with pytest.raises(ConfigError, match=f"^{var}="):
        _resolve(["worker", "--model-path", "m"], {var: value})


def test_variables_of_other_subcommands_are_not_applied() -> None:
    args = _resolve(["cache", "ls"], {"ETCD_ENDPOINTS": "ftp://bad", "DYN_SYSTEM_PORT": "x"})
    assert not hasattr(args, "etcd") and not hasattr(args, "system_port")
