"""The etcd layer: a v3 JSON-gateway client, a lease session, and a small store protocol.

Layers, bottom up:

- ``_codec``: pure encoding/decoding of gateway JSON into typed structs (no sockets);
- ``EtcdClient``: asyncio transport with endpoint failover, auth and TLS; ``watch()`` streams
  and never resumes by itself (see its module docs for the resume pattern);
- ``Store``: the operations publisher and watcher need; ``EtcdClient`` and the in-memory
  ``MemoryStore`` (for unit tests) implement it;
- ``LeaseSession``: one lease, kept alive, whose keys are re-created if it is lost;
- ``PrefixInformer``: list + watch + resume + compaction relist + cheap reconcile of one key
  prefix, yielding ``ChangeBatch``es of ``Change``s (its pure state is ``WatchState``);
- ``EtcdServer`` / ``EtcdCluster``: real etcd processes for tests and the demo.
"""

from discovery_mdc.etcd._client import DEFAULT_ENDPOINT, EtcdClient, endpoints_from_env
from discovery_mdc.etcd._codec import (
    KeyValue,
    Lease,
    LeaseInfo,
    RangeResult,
    WatchEvent,
    WatchResponse,
)
from discovery_mdc.etcd._informer import (
    DEFAULT_RECONCILE_INTERVAL,
    ChangeBatch,
    InformerStats,
    PrefixInformer,
)
from discovery_mdc.etcd._lease import (
    DEFAULT_LEASE_TTL,
    KeyExistsError,
    KeyHandle,
    LeaseSession,
    Registration,
    SessionState,
)
from discovery_mdc.etcd._server import EtcdCluster, EtcdServer, find_etcd_binary
from discovery_mdc.etcd._startup import retry_until_reachable
from discovery_mdc.etcd._store import MemoryStore, Store
from discovery_mdc.etcd._watchstate import Change, ChangeKind, WatchState

__all__ = [
    "DEFAULT_ENDPOINT",
    "DEFAULT_LEASE_TTL",
    "DEFAULT_RECONCILE_INTERVAL",
    "Change",
    "ChangeBatch",
    "ChangeKind",
    "EtcdClient",
    "EtcdCluster",
    "EtcdServer",
    "KeyExistsError",
    "KeyHandle",
    "InformerStats",
    "KeyValue",
    "Lease",
    "LeaseInfo",
    "LeaseSession",
    "MemoryStore",
    "PrefixInformer",
    "RangeResult",
    "Registration",
    "SessionState",
    "Store",
    "WatchEvent",
    "WatchResponse",
    "WatchState",
    "endpoints_from_env",
    "find_etcd_binary",
    "retry_until_reachable",
]
