"""Advertise host selection, with injected resolvers (never the machine's network)."""

from __future__ import annotations

import socket
from collections.abc import Callable, Sequence

import pytest

from discovery_mdc.worker._advertise import (
    advertise_host,
    format_host_for_url,
    is_wildcard_host,
)


class FakeProbe:
    """Answers the UDP-connect probe from a table and records which families were asked."""

    def __init__(self, table: dict[socket.AddressFamily, str]) -> None:
        self.table = table
        self.calls: list[socket.AddressFamily] = []

    def __call__(self, family: socket.AddressFamily) -> str | None:
        self.calls.append(family)
        return self.table.get(family)


def probe_of(table: dict[socket.AddressFamily, str]) -> FakeProbe:
    return FakeProbe(table)


def lookup_of(addresses: Sequence[str]) -> Callable[[], list[str]]:
    return lambda: list(addresses)


def never() -> list[str]:
    raise AssertionError("lookup must not be needed")


@pytest.mark.parametrize("host", ["127.0.0.1", "10.1.2.3", "worker-7.example", "::1"])
def test_specific_bind_host_is_advertised_as_given(host: str) -> None:
    assert advertise_host(host, probe=probe_of({}), host_lookup=never) == host


def test_bracketed_ipv6_bind_host_is_unbracketed() -> None:
    assert advertise_host("[fd00::5]", probe=probe_of({}), host_lookup=never) == "fd00::5"


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "", "[::]", None])
def test_wildcard_prefers_the_probed_ipv4(host: str | None) -> None:
    probe = probe_of({socket.AF_INET: "192.168.1.20", socket.AF_INET6: "2001:db8::1"})
    assert advertise_host(host, probe=probe, host_lookup=never) == "192.168.1.20"


def test_probe_failure_falls_back_to_hostname_lookup() -> None:
    lookup = lookup_of(["127.0.1.1", "fe80::1", "10.0.0.7"])
    assert advertise_host("0.0.0.0", probe=probe_of({}), host_lookup=lookup) == "10.0.0.7"


def test_loopback_probe_result_is_not_routable() -> None:
    probe = probe_of({socket.AF_INET: "127.0.0.1"})
    assert advertise_host("0.0.0.0", probe=probe, host_lookup=lookup_of(["10.9.9.9"])) == (
        "10.9.9.9"
    )


def test_ipv6_only_host_with_dual_stack_wildcard() -> None:
    probe = probe_of({socket.AF_INET6: "2001:db8::42"})
    assert advertise_host("::", probe=probe, host_lookup=lookup_of(["::1"])) == "2001:db8::42"


def test_ipv4_wildcard_never_advertises_ipv6() -> None:
    probe = probe_of({socket.AF_INET6: "2001:db8::42"})
    lookup = lookup_of(["2001:db8::43"])
    assert advertise_host("0.0.0.0", probe=probe, host_lookup=lookup) == "127.0.0.1"
    assert socket.AF_INET6 not in probe.calls


def test_last_resort_is_loopback(caplog: pytest.LogCaptureFixture) -> None:
    assert advertise_host("::", probe=probe_of({}), host_lookup=lookup_of([])) == "127.0.0.1"
    assert "127.0.0.1" in caplog.text


def test_lookup_errors_are_survived() -> None:
    def broken() -> list[str]:
        raise OSError("no resolver")

    assert advertise_host("0.0.0.0", probe=probe_of({}), host_lookup=broken) == "127.0.0.1"


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("127.0.0.1", "127.0.0.1"),
        ("worker.example", "worker.example"),
        ("2001:db8::1", "[2001:db8::1]"),
        ("[2001:db8::1]", "[2001:db8::1]"),
        ("fe80::1%eth0", "[fe80::1%25eth0]"),
    ],
)
def test_format_host_for_url(host: str, expected: str) -> None:
    assert format_host_for_url(host) == expected


def test_is_wildcard_host() -> None:
    assert all(is_wildcard_host(h) for h in ("", None, "0.0.0.0", "::", "[::]", "::0"))
    assert not any(is_wildcard_host(h) for h in ("127.0.0.1", "::1", "host", "0.0.0.1"))
