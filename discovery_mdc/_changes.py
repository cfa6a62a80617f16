"""A key change under a watched etcd prefix, as plain data (no I/O, stdlib only).

The prefix informer (``discovery_mdc.etcd``) yields these and the frontend's pure registry
consumes them; it lives outside the etcd package so the registry does not import the client.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = ["Change", "ChangeKind"]


class ChangeKind(enum.Enum):
    PUT = "put"
    DELETE = "delete"


@dataclass(frozen=True, slots=True)
class Change:
    """One key change to apply, in revision order per key."""

    kind: ChangeKind
    key: str
    value: bytes = b""
    mod_revision: int = 0
