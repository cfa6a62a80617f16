"""The test kit: every helper that unit tests (``tests/``), integration tests
(``integration/``) and benchmarks (``bench/``) share, in one place.

It lives in the repository, not in the wheel: the process wrappers, scripted servers and fake
stores serve this project's own suites. It needs nothing beyond the package's dependencies
(no pytest), so the benchmarks import it too. ``tests/`` and ``integration/`` hold only test
modules and their ``conftest.py``; no test module imports another. The Dynamo peer's helpers
are the submodule ``testkit.dynamo`` (imported by name: they are many and specific).
"""

from testkit._cards import (
    FakeResolved,
    FakeResolver,
    card_keys,
    card_keys_are,
    envelope_kv,
    instance_key,
    make_card,
    model_dirs,
    publish,
    published_card,
)
from testkit._certs import Pki, make_pki
from testkit._clock import FakeClock
from testkit._files import backdate, snapshot
from testkit._gateway import (
    enable_auth,
    etcd_delete_prefix,
    etcd_get_prefix,
    etcd_lease_grant,
    etcd_lease_revoke,
    etcd_leases,
    etcd_put,
    gateway_post,
    grant_prefix_user,
)
from testkit._process import (
    CliProcess,
    FrontendProcess,
    Process,
    Registered,
    Spawn,
    WorkerProcess,
    child_env,
    converged,
    run_cli,
    run_python,
    start_frontend,
)
from testkit._procfs import (
    TcpConnection,
    parse_metrics,
    peak_rss_kib,
    proc_status_kib,
    tcp_connections,
    tcp_peer_ports,
)
from testkit._proxy import TcpProxy
from testkit._servers import Handler, MetaServer, free_port, silent_port
from testkit._store import RecordingStore
from testkit._wait import wait_until, wait_until_sync

__all__ = [
    "CliProcess",
    "FakeClock",
    "FakeResolved",
    "FakeResolver",
    "FrontendProcess",
    "Handler",
    "MetaServer",
    "Pki",
    "Process",
    "RecordingStore",
    "Registered",
    "Spawn",
    "TcpConnection",
    "TcpProxy",
    "WorkerProcess",
    "backdate",
    "card_keys",
    "card_keys_are",
    "child_env",
    "converged",
    "enable_auth",
    "envelope_kv",
    "etcd_delete_prefix",
    "etcd_get_prefix",
    "etcd_lease_grant",
    "etcd_lease_revoke",
    "etcd_leases",
    "etcd_put",
    "free_port",
    "gateway_post",
    "grant_prefix_user",
    "instance_key",
    "make_card",
    "make_pki",
    "model_dirs",
    "parse_metrics",
    "peak_rss_kib",
    "proc_status_kib",
    "publish",
    "published_card",
    "run_cli",
    "run_python",
    "silent_port",
    "snapshot",
    "start_frontend",
    "tcp_connections",
    "tcp_peer_ports",
    "wait_until",
    "wait_until_sync",
]
