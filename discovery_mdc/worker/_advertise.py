"""The host name a worker advertises in its self-hosted metadata URLs.

A specific bind host is advertised as given. A wildcard bind (``0.0.0.0``, ``::``, empty)
is not reachable from elsewhere, so we advertise this host's routable IP instead, found
without sending a packet: ``connect()`` on a UDP socket only asks the kernel which source
address it would route from. Hostname lookups are the fallback and ``127.0.0.1`` the last
resort. IPv4 is preferred; IPv6 is bracketed in URLs.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Callable, Sequence
from typing import Final

__all__ = [
    "advertise_host",
    "format_host_for_url",
    "hostname_addresses",
    "is_wildcard_host",
    "probe_routable_address",
]

log = logging.getLogger("discovery_mdc.worker")

LAST_RESORT: Final = "127.0.0.1"
# Any public address works: a UDP connect() picks a route and a source address but sends
# nothing. These are well-known resolvers, chosen only because a default route covers them.
_PROBE_TARGETS: Final = {
    socket.AF_INET: ("8.8.8.8", 53),
    socket.AF_INET6: ("2001:4860:4860::8888", 53),
}

Probe = Callable[[socket.AddressFamily], str | None]
HostLookup = Callable[[], Sequence[str]]


def _strip_brackets(host: str) -> str:
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def is_wildcard_host(host: str | None) -> bool:
    """True for a bind host that means "every interface": empty, ``0.0.0.0``, ``::``."""
    if not host:
        return True
    try:
        return ipaddress.ip_address(_strip_brackets(host)).is_unspecified
    except ValueError:
        return False


def _routable(address: str, family: socket.AddressFamily) -> bool:
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    wanted = 4 if family == socket.AF_INET else 6
    return ip.version == wanted and not (
        ip.is_loopback or ip.is_unspecified or ip.is_link_local or ip.is_multicast
    )


def probe_routable_address(family: socket.AddressFamily) -> str | None:
    """The source address the kernel would use to reach the internet; no packet is sent."""
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.connect(_PROBE_TARGETS[family])
            address = sock.getsockname()[0]
    except (OSError, KeyError):
        return None
    return address if isinstance(address, str) else None


def hostname_addresses() -> list[str]:
    """Addresses this host's name resolves to (may be empty or loopback only)."""
    out: list[str] = []
    for name in dict.fromkeys((socket.gethostname(), socket.getfqdn())):
        try:
            infos = socket.getaddrinfo(name, None, proto=socket.IPPROTO_TCP)
        except OSError:
            continue
        for info in infos:
            address = info[4][0]
            if isinstance(address, str) and address not in out:
                out.append(address)
    return out


def advertise_host(
    bind_host: str | None,
    *,
    probe: Probe = probe_routable_address,
    host_lookup: HostLookup = hostname_addresses,
) -> str:
    """The host to put in URLs for a server bound to ``bind_host`` (unbracketed).

    ``0.0.0.0`` only considers IPv4 (the socket is IPv4-only); ``::`` and empty consider IPv4
    first, then IPv6 (the server binds those dual-stack). ``probe`` and ``host_lookup`` are
    injectable for tests.
    """
    if not is_wildcard_host(bind_host):
        assert bind_host is not None
        return _strip_brackets(bind_host)
    families = [socket.AF_INET]
    if not bind_host or ":" in bind_host:
        families.append(socket.AF_INET6)
    looked_up: list[str] | None = None
    for family in families:
        probed = probe(family)
        if probed is not None and _routable(probed, family):
            return probed
        if looked_up is None:
            try:
                looked_up = list(host_lookup())
            except OSError:
                looked_up = []
        for address in looked_up:
            if _routable(address, family):
                return address
    log.warning(
        "no routable address found for wildcard bind host %r; advertising %s",
        bind_host,
        LAST_RESORT,
    )
    return LAST_RESORT


def format_host_for_url(host: str) -> str:
    """Bracket an IPv6 literal (percent-encoding a zone id); leave names and IPv4 alone."""
    host = _strip_brackets(host)
    if ":" in host:
        return "[" + host.replace("%", "%25") + "]"
    return host
