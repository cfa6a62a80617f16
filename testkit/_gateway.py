"""etcd through its v3 JSON gateway, with nothing of ours in between: what a test reads or
writes to check our client, our processes or a peer against etcd itself."""

from __future__ import annotations

import base64
import json
import ssl
import urllib.request
from collections.abc import Mapping
from typing import Any

__all__ = [
    "enable_auth",
    "etcd_delete_prefix",
    "etcd_get_prefix",
    "etcd_lease_grant",
    "etcd_lease_revoke",
    "etcd_leases",
    "etcd_put",
    "gateway_post",
    "grant_prefix_user",
]


def gateway_post(
    etcd_url: str,
    path: str,
    body: Mapping[str, Any],
    *,
    token: str = "",
    context: ssl.SSLContext | None = None,
    timeout: float = 10.0,
) -> Any:
    """POST ``body`` to the gateway's ``path`` (e.g. ``/v3/kv/range``); the decoded reply."""
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = token
    req = urllib.request.Request(
        etcd_url.rstrip("/") + path, data=json.dumps(body).encode(), headers=headers, method="POST"
    )
    with urllib.request.urlopen(req, timeout=timeout, context=context) as resp:
        return json.loads(resp.read())


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _prefix_end(prefix: bytes) -> bytes:
    end = bytearray(prefix)
    while end and end[-1] == 0xFF:
        end.pop()
    if not end:
        return b"\x00"
    end[-1] += 1
    return bytes(end)


def etcd_get_prefix(etcd_url: str, prefix: str) -> dict[str, bytes]:
    """Every key under ``prefix`` with its raw value bytes, via etcd's v3 JSON gateway."""
    p = prefix.encode()
    body = gateway_post(
        etcd_url, "/v3/kv/range", {"key": _b64(p), "range_end": _b64(_prefix_end(p))}
    )
    return {
        base64.b64decode(kv["key"]).decode(): base64.b64decode(kv.get("value", ""))
        for kv in body.get("kvs", [])
    }


def etcd_put(etcd_url: str, key: str, value: bytes, lease: int | None = None) -> None:
    """Put one key (optionally bound to ``lease``) through the gateway."""
    body: dict[str, Any] = {"key": _b64(key.encode()), "value": _b64(value)}
    if lease is not None:
        body["lease"] = lease
    gateway_post(etcd_url, "/v3/kv/put", body)


def etcd_lease_grant(etcd_url: str, ttl: int = 30) -> int:
    """Grant a lease; return its id."""
    return int(gateway_post(etcd_url, "/v3/lease/grant", {"TTL": ttl})["ID"])


def etcd_lease_revoke(etcd_url: str, lease: int) -> None:
    """Revoke a lease, deleting every key bound to it."""
    gateway_post(etcd_url, "/v3/lease/revoke", {"ID": lease})


def etcd_delete_prefix(etcd_url: str, prefix: str) -> int:
    """Delete every key under ``prefix``; return how many were deleted."""
    p = prefix.encode()
    body = gateway_post(
        etcd_url, "/v3/kv/deleterange", {"key": _b64(p), "range_end": _b64(_prefix_end(p))}
    )
    return int(body.get("deleted", 0))


def etcd_leases(etcd_url: str) -> list[int]:
    """The ids of every lease etcd holds now."""
    return [
        int(le["ID"]) for le in gateway_post(etcd_url, "/v3/lease/leases", {}).get("leases") or []
    ]


def grant_prefix_user(
    etcd_url: str, user: str, password: str, prefix: str, *, context: ssl.SSLContext | None = None
) -> None:
    """Add ``user``, whose one role may read and write the keys under ``prefix`` only (before
    :func:`enable_auth`)."""
    role = f"{user}-rw"
    p = prefix.encode()
    perm = {"permType": "READWRITE", "key": _b64(p), "range_end": _b64(_prefix_end(p))}
    for path, body in (
        ("/v3/auth/user/add", {"name": user, "password": password}),
        ("/v3/auth/role/add", {"name": role}),
        ("/v3/auth/role/grant", {"name": role, "perm": perm}),
        ("/v3/auth/user/grant", {"user": user, "role": role}),
    ):
        gateway_post(etcd_url, path, body, context=context)


def enable_auth(
    etcd_url: str, *, root_password: str = "rootpw", context: ssl.SSLContext | None = None
) -> None:
    """Turn authentication on, with user ``root`` (role ``root``: every key)."""
    for path, body in (
        ("/v3/auth/user/add", {"name": "root", "password": root_password}),
        ("/v3/auth/role/add", {"name": "root"}),
        ("/v3/auth/user/grant", {"user": "root", "role": "root"}),
        ("/v3/auth/enable", {}),
    ):
        gateway_post(etcd_url, path, body, context=context)
