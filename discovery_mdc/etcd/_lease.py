"""LeaseSession: one lease, kept alive, with keys that are re-created whenever it is replaced.

The session grants a lease and sends a keepalive every TTL/3. Each reply with a positive TTL
moves the deadline to (time the keepalive was sent) + TTL. The lease counts as **lost** when a
reply says TTL ≤ 0 (expired or revoked) or when the deadline passes with no reply. Then the
session retries with jittered exponential backoff until etcd grants a new lease, and creates
every registered key again under it. A registration is a function of the lease id, so a key
that embeds the instance id gets a new name with the new lease. The background task never
dies from an error; it logs and carries on until :meth:`LeaseSession.close`.

A key can also vanish while its lease lives (``etcdctl del`` by an operator). Every
``key_check_every`` keepalives the session asks etcd which keys the lease holds
(``timetolive`` with ``keys``) and re-creates any missing one, create-if-absent, so a key
someone else wrote in the meantime is never overwritten.

Time is injected (``clock`` and ``sleep``), so tests can run deadlines and backoff instantly.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import random
import time
from collections.abc import Callable

from discovery_mdc import _env
from discovery_mdc._backoff import RECONNECT_BACKOFF_MAX, Backoff
from discovery_mdc._clock import Clock, Sleep
from discovery_mdc._lifecycle import AsyncService
from discovery_mdc.errors import EtcdError, KeyExistsError
from discovery_mdc.etcd._codec import Lease
from discovery_mdc.etcd._startup import retry_until_reachable
from discovery_mdc.etcd._store import Store

__all__ = [
    "DEFAULT_LEASE_TTL",
    "KeyExistsError",
    "KeyHandle",
    "LeaseSession",
    "Registration",
    "SessionState",
]

log = logging.getLogger("discovery_mdc.etcd")

DEFAULT_LEASE_TTL = _env.DEFAULT_LEASE_TTL

Registration = Callable[[int], tuple[str, bytes]]
"""Maps a lease id to the (key, value) to create under that lease."""


class SessionState(enum.Enum):
    """Where a LeaseSession is in its life."""

    STARTING = "starting"
    REGISTERED = "registered"
    LOST = "lost"
    CLOSED = "closed"


class KeyHandle:
    """A key the session keeps registered. ``key`` and ``value`` follow the current lease;
    ``key`` is None while the key is not in etcd (lease lost, or its create failed)."""

    __slots__ = ("key", "registration", "value")

    def __init__(self, registration: Registration) -> None:
        self.registration = registration
        self.key: str | None = None
        self.value: bytes = b""

    def __repr__(self) -> str:
        return f"KeyHandle(key={self.key!r})"


class LeaseSession(AsyncService):
    """Holds one lease for a set of keys and re-registers them when the lease is lost.

    ``async with LeaseSession(store) as s: handle = await s.add(reg)``; leaving the block
    revokes the lease, so the keys vanish at once. Every ``key_check_every`` keepalives (0:
    never) keys missing from the live lease are created again; ``on_key_recreated(key)`` is
    called for each.
    """

    def __init__(
        self,
        store: Store,
        *,
        ttl: int = DEFAULT_LEASE_TTL,
        startup_timeout: float = 0.0,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
        on_state_change: Callable[[SessionState], None] | None = None,
        backoff_initial: float = 0.5,
        backoff_max: float = RECONNECT_BACKOFF_MAX,
        rng: Callable[[], float] = random.random,
        close_timeout: float = 5.0,
        key_check_every: int = 3,
        on_key_recreated: Callable[[str], None] | None = None,
    ) -> None:
        self._store = store
        self._ttl = _env.check_lease_ttl(ttl)
        self._startup_timeout = startup_timeout
        self._clock = clock
        self._sleep = sleep
        self._on_state_change = on_state_change
        self._backoff = Backoff(backoff_initial, backoff_max, rng)
        self._close_timeout = close_timeout
        self._state = SessionState.STARTING
        self._lease_id: int | None = None
        self._lease_ttl = self._ttl
        self._deadline = 0.0
        self._next_delay = self._ttl / 3
        self._recover_failures = 0
        self._handles: list[KeyHandle] = []
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._waiters: list[tuple[SessionState, asyncio.Future[None]]] = []
        self._key_check_every = key_check_every
        self._keepalives = 0
        self._keys_recreated = 0
        self.on_key_recreated = on_key_recreated

    # ------------------------------------------------------------------ public

    @property
    def state(self) -> SessionState:
        """The current state."""
        return self._state

    @property
    def lease_id(self) -> int:
        """The id of the current (or, while LOST, the last) lease."""
        if self._lease_id is None:
            raise EtcdError("lease session not started")
        return self._lease_id

    @property
    def ttl(self) -> int:
        """The TTL etcd granted for the current lease."""
        return self._lease_ttl

    @property
    def keys_recreated(self) -> int:
        """How many keys were found missing while their lease lived, and re-created."""
        return self._keys_recreated

    @property
    def handles(self) -> tuple[KeyHandle, ...]:
        """Every registration, in the order added."""
        return tuple(self._handles)

    async def start(self) -> None:
        """Grant the lease and start the keepalive task. While etcd is unreachable it retries
        for up to ``startup_timeout`` seconds, then raises."""
        if self._state is not SessionState.STARTING or self._task is not None:
            raise EtcdError(f"lease session already {self._state.value}")
        sent = self._clock()

        async def grant() -> Lease:
            nonlocal sent
            sent = self._clock()
            return await self._store.lease_grant(self._ttl)

        lease = await retry_until_reachable(
            grant,
            timeout=self._startup_timeout,
            what="a lease",
            endpoints=getattr(self._store, "endpoints", ()),
            clock=self._clock,
            sleep=self._sleep,
        )
        self._adopt(lease.id, lease.ttl, sent)
        log.info("granted etcd lease %x (ttl %ds)", lease.id, lease.ttl,
                 extra={"lease": f"{lease.id:x}"})  # fmt: skip
        self._set_state(SessionState.REGISTERED)
        self._task = asyncio.create_task(self._run(), name=f"lease-keepalive-{lease.id:x}")

    async def add(self, registration: Registration) -> KeyHandle:
        """Create ``registration(lease_id)`` under the lease and keep it registered.

        Raises :class:`KeyExistsError` if the key exists (it is never overwritten), or the
        store's error if etcd fails; either way the registration is not kept. While the lease
        is LOST the registration is kept and created with the next lease.
        """
        async with self._lock:
            if self._state in (SessionState.STARTING, SessionState.CLOSED):
                raise EtcdError(f"cannot add a key to a lease session that is {self._state.value}")
            handle = KeyHandle(registration)
            if self._state is SessionState.REGISTERED:
                await self._create(handle, self.lease_id)
            else:
                log.info("lease lost; the new key will be created once a new lease is granted")
            self._handles.append(handle)
            return handle

    async def remove(self, handle: KeyHandle) -> None:
        """Stop keeping ``handle`` registered and delete its key."""
        async with self._lock:
            if handle not in self._handles:
                return
            key = handle.key
            if key is not None and self._state is SessionState.REGISTERED:
                # Delete before forgetting: if etcd fails, the key is still tracked (and kept
                # alive), so the caller can retry instead of leaving an untracked key behind.
                await self._store.delete(key)
                log.info("deleted etcd key %s (lease %x)", key, self.lease_id,
                         extra={"key": key, "lease": f"{self.lease_id:x}"})  # fmt: skip
            self._handles.remove(handle)
            handle.key = None

    async def wait_state(self, state: SessionState) -> None:
        """Return once the session is in ``state`` (bound it with ``asyncio.timeout``)."""
        if self._state is state:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (state, fut)
        self._waiters.append(entry)
        try:
            await fut
        finally:
            self._waiters.remove(entry)

    async def close(self) -> None:
        """Stop the keepalives and revoke the lease (bounded by ``close_timeout`` if etcd is
        down: the keys then expire with the TTL)."""
        if self._state is SessionState.CLOSED:
            return
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        lease_id = self._lease_id
        self._set_state(SessionState.CLOSED)
        if lease_id is None:
            return
        try:
            async with asyncio.timeout(self._close_timeout):
                revoked = await self._store.lease_revoke(lease_id)
        except (EtcdError, OSError, TimeoutError) as exc:
            log.warning("could not revoke etcd lease %x on close (%s); its keys expire within "
                        "%ds", lease_id, exc, self._lease_ttl)  # fmt: skip
            return
        log.info("revoked etcd lease %x%s", lease_id, "" if revoked else " (already gone)",
                 extra={"lease": f"{lease_id:x}"})  # fmt: skip

    # ------------------------------------------------------------------ internals

    def _set_state(self, state: SessionState) -> None:
        if state is self._state:
            return
        self._state = state
        for want, fut in self._waiters:
            if want is state and not fut.done():
                fut.set_result(None)
        if self._on_state_change is not None:
            try:
                self._on_state_change(state)
            except Exception:
                log.exception("lease session on_state_change callback failed")

    def _adopt(self, lease_id: int, ttl: int, sent: float) -> None:
        self._lease_id = lease_id
        self._lease_ttl = ttl
        self._deadline = sent + ttl
        self._next_delay = ttl / 3

    async def _create(self, handle: KeyHandle, lease_id: int) -> None:
        key, value = handle.registration(lease_id)
        if not await self._store.create(key, value, lease=lease_id):
            raise KeyExistsError(key)
        handle.key, handle.value = key, value
        log.info("created etcd key %s (lease %x)", key, lease_id,
                 extra={"key": key, "lease": f"{lease_id:x}"})  # fmt: skip

    async def _run(self) -> None:
        while True:
            try:
                if self._state is SessionState.LOST:
                    await self._recover()
                else:
                    await self._keepalive_step()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("lease session: unexpected error (lease %x); carrying on",
                              self._lease_id or 0)  # fmt: skip
                await self._sleep(self._backoff.initial)

    async def _keepalive_step(self) -> None:
        await self._sleep(self._next_delay)
        lease_id = self.lease_id
        sent = self._clock()
        if sent >= self._deadline:
            self._lose(f"no keepalive reply before its {self._lease_ttl}s deadline")
            return
        try:
            # A hung request must not outlive the deadline: that alone means the lease is lost.
            async with asyncio.timeout(max(0.05, self._deadline - sent)):
                ttl = await self._store.lease_keepalive(lease_id)
        except (EtcdError, OSError, TimeoutError) as exc:
            left = self._deadline - self._clock()
            if left <= 0:
                self._lose(f"no keepalive reply before its {self._lease_ttl}s deadline ({exc})")
            else:
                log.warning("keepalive for etcd lease %x failed (%s); %.1fs left before it "
                            "counts as lost", lease_id, exc, left)  # fmt: skip
                self._next_delay = min(self._lease_ttl / 3, 1.0)
            return
        if ttl <= 0:
            self._lose("etcd reports it expired or was revoked (keepalive TTL=0)")
            return
        self._deadline = sent + ttl
        self._next_delay = self._lease_ttl / 3
        self._keepalives += 1
        if self._key_check_every > 0 and self._keepalives % self._key_check_every == 0:
            await self._check_keys()

    async def _check_keys(self) -> None:
        """Create again, if absent, every key the live lease should hold but does not."""
        async with self._lock:
            if self._state is not SessionState.REGISTERED or not self._handles:
                return
            lease_id = self.lease_id
            try:
                async with asyncio.timeout(max(0.05, self._deadline - self._clock())):
                    info = await self._store.lease_time_to_live(lease_id, keys=True)
            except (EtcdError, OSError, TimeoutError) as exc:
                log.debug("listing the keys of etcd lease %x failed: %s", lease_id, exc)
                return
            if info.ttl <= 0:
                return  # gone: the next keepalive notices and re-registers everything
            attached = set(info.keys)
            for handle in self._handles:
                if handle.key is not None and handle.key in attached:
                    continue
                key, value = handle.registration(lease_id)
                try:
                    created = await self._store.create(key, value, lease=lease_id)
                except (EtcdError, OSError) as exc:
                    log.warning("re-creating etcd key %s (lease %x) failed: %s; will retry",
                                key, lease_id, exc)  # fmt: skip
                    return
                if created:
                    handle.key, handle.value = key, value
                    self._keys_recreated += 1
                    log.warning("etcd key %s was missing while lease %x lives (deleted by "
                                "someone else?); re-created it", key, lease_id)  # fmt: skip
                    if self.on_key_recreated is not None:
                        try:
                            self.on_key_recreated(key)
                        except Exception:
                            log.exception("lease session on_key_recreated callback failed")
                elif handle.key is not None:
                    log.error("etcd key %s is held by someone else, not by lease %x; not "
                              "overwriting it (it is created again once it is gone)",
                              key, lease_id)  # fmt: skip
                    handle.key = None

    def _lose(self, reason: str) -> None:
        log.warning("etcd lease %x lost: %s; re-registering %d key(s) once etcd grants a new "
                    "lease", self._lease_id or 0, reason, len(self._handles),
                    extra={"lease": f"{self._lease_id or 0:x}", "reason": reason})  # fmt: skip
        self._recover_failures = 0
        self._backoff.reset()
        self._set_state(SessionState.LOST)

    async def _recover(self) -> None:
        if self._recover_failures:
            await self._sleep(self._backoff.next_delay())
        old = self._lease_id
        try:
            sent = self._clock()
            lease = await self._store.lease_grant(self._ttl)
        except (EtcdError, OSError) as exc:
            self._recover_failures += 1
            log.warning("granting a new etcd lease failed (attempt %d): %s",
                        self._recover_failures, exc)  # fmt: skip
            return
        async with self._lock:
            self._adopt(lease.id, lease.ttl, sent)
            if old is not None:
                await self._revoke_quietly(old)
            try:
                for handle in self._handles:
                    handle.key = None
                    try:
                        await self._create(handle, lease.id)
                    except KeyExistsError as exc:
                        log.error("re-registering under lease %x: %s", lease.id, exc)
            except (EtcdError, OSError) as exc:
                self._recover_failures += 1
                log.warning("re-registering keys under new lease %x failed (%s); will retry "
                            "with another lease", lease.id, exc)  # fmt: skip
                await self._revoke_quietly(lease.id)
                for handle in self._handles:
                    handle.key = None
                return
        self._recover_failures = 0
        self._backoff.reset()
        log.info("etcd lease %x replaced by %x; re-registered %d key(s)", old or 0, lease.id,
                 sum(h.key is not None for h in self._handles),
                 extra={"lease": f"{lease.id:x}"})  # fmt: skip
        self._set_state(SessionState.REGISTERED)

    async def _revoke_quietly(self, lease_id: int) -> None:
        # The old lease may have outlived its deadline (etcd renews every lease when it
        # restarts), so its keys would linger next to the new ones for a whole TTL.
        try:
            async with asyncio.timeout(self._close_timeout):
                await self._store.lease_revoke(lease_id)
        except (EtcdError, OSError, TimeoutError) as exc:
            log.debug("revoking stale etcd lease %x failed: %s", lease_id, exc)
