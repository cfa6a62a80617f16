"""What a prefix informer knows, as plain code: known keys, revisions, and the checks a
reconcile makes against etcd. Nothing here touches sockets; the driver is ``_informer.py``.

The state is *exact at* a revision R when its keys and their mod revisions equal etcd's under
the prefix at R. The watch keeps it exact at ``revision`` (every event through it applied). A
reconcile proves it, cheaply, against etcd:

- :meth:`WatchState.unchanged` needs only the prefix's key count and etcd's revision, which
  etcd answers from its in-memory index: if etcd's revision is still the one of the last
  proof, nothing changed anywhere, so nothing changed under the prefix either.
- :meth:`WatchState.quick_check` reads only the keys modified since the last proof
  (``min_mod_revision = verified + 1``, keys only) and the prefix's key count. If every such
  key carries the mod revision the state holds, none is newer than ``revision``, and the
  counts agree, the state is exact at etcd's current revision, whatever the number of keys.
  (A key modified after ``verified`` is in the answer; a key untouched since then was
  checked before; so only deletes could hide, and the count shows them.)
- Anything else is either still in flight on the watch or missed by it.
  :meth:`WatchState.compare` settles it exactly against etcd *at the state's own revision*
  (a pinned read, so nothing is in flight): the keys to fetch, the deletes the watch never
  delivered, whether the count still hides a delete (then a keys-only listing decides), and
  whether the difference cannot be explained at all (then etcd lost history: forget every
  revision and relist).
- :meth:`WatchState.history_lost` checks every range answer: a header revision below what
  the state already reached, or another cluster id, means etcd lost history.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from discovery_mdc._changes import Change, ChangeKind

__all__ = ["Change", "ChangeKind", "Comparison", "Probe", "WatchState"]


@dataclass(frozen=True, slots=True)
class Probe:
    """The state when a reconcile check was sent."""

    revision: int
    """The state is exact at this revision (the watch delivered everything through it)."""
    count: int
    """Keys known at ``revision``."""
    verified: int
    """The last revision at which a relist or a check proved the state exact."""
    version: int
    """Changes applied so far; if it moves while a check is in flight, the answer is stale."""


@dataclass(frozen=True, slots=True)
class Comparison:
    """What a pinned check found (see :meth:`WatchState.compare`)."""

    puts: tuple[str, ...] = ()
    """Keys whose newer value (or whose existence) the watch never delivered: fetch them."""
    deletes: tuple[str, ...] = ()
    """Keys the watch never saw deleted."""
    listing: bool = False
    """The count still differs: some older key was deleted unseen; list every key to find it."""
    unexplained: bool = False
    """etcd holds an older revision of a key than the state: its history changed under us
    (data loss, not a lost event); only forgetting every revision and relisting can tell."""

    @property
    def clean(self) -> bool:
        return not (self.puts or self.deletes or self.listing or self.unexplained)


@dataclass(slots=True)
class WatchState:
    """Known keys (key -> mod_revision), the highest revision seen, and the last proof.

    The watch stream and a relist race: a relist may return a snapshot older than events the
    watch already applied, and the watch may still deliver events older than the snapshot.
    Two rules keep the result exact whatever the interleaving:

    - an event at or below ``snapshot_revision`` is already part of that snapshot: ignored;
    - a diff never undoes a watch event newer than its snapshot: a key put after the snapshot
      is not deleted, and a key deleted after it (``tombstones``) is not put back.

    ``snapshot_revision`` is also the revision of the last successful check
    (:meth:`mark_verified`), which proves the same thing a snapshot does.
    """

    revision: int = 0
    known: dict[str, int] = field(default_factory=dict)
    snapshot_revision: int = 0
    tombstones: dict[str, int] = field(default_factory=dict)  # key -> delete revision
    version: int = 0
    cluster_id: int = 0

    def observe_revision(self, revision: int) -> None:
        if revision > self.revision:
            self.revision = revision

    def forget_history(self) -> None:
        """etcd lost history (data dir wiped, restored from an older snapshot, another
        cluster): its revisions no longer relate to ours. Keep the keys, so the next
        :meth:`diff` deletes those that vanished, but trust none of their revisions: every
        key etcd lists is applied again, and no snapshot counts as stale."""
        self.known = dict.fromkeys(self.known, 0)
        self.revision = 0
        self.snapshot_revision = 0
        self.tombstones.clear()
        self.version += 1
        self.cluster_id = 0

    def history_lost(self, floor: int, header_revision: int, cluster_id: int = 0) -> str | None:
        """Why an answer from etcd shows that it lost history, or None.

        ``floor`` is :attr:`revision` when the read was sent. etcd's reads are linearizable,
        so one sent after the state reached ``floor`` answers at ``floor`` or later, whatever
        member serves it: a header revision below it means etcd went back in time (data dir
        wiped, restored from an older snapshot). A different ``cluster_id`` is another
        cluster altogether. Otherwise the cluster id is remembered (0: unknown, not checked).
        """
        if cluster_id and self.cluster_id and cluster_id != self.cluster_id:
            return f"etcd's cluster id changed from {self.cluster_id:x} to {cluster_id:x}"
        if header_revision < floor:
            return (
                f"etcd answered at revision {header_revision}, below revision {floor} "
                "it had already reached"
            )
        if cluster_id:
            self.cluster_id = cluster_id
        return None

    # ------------------------------------------------------------------ watch events

    def on_put(self, key: str, value: bytes, mod_revision: int) -> Change | None:
        self.observe_revision(mod_revision)
        if mod_revision <= self.snapshot_revision or self.known.get(key, -1) >= mod_revision:
            return None  # replay of something already applied
        self.tombstones.pop(key, None)
        self.known[key] = mod_revision
        self.version += 1
        return Change(ChangeKind.PUT, key, value, mod_revision)

    def on_delete(self, key: str, revision: int) -> Change | None:
        self.observe_revision(revision)
        if revision <= self.snapshot_revision or self.known.get(key, -1) >= revision:
            return None
        self.tombstones[key] = revision
        if self.known.pop(key, None) is None:
            return None
        self.version += 1
        return Change(ChangeKind.DELETE, key, mod_revision=revision)

    # ------------------------------------------------------------------ full relist

    def diff(self, snapshot: Mapping[str, tuple[bytes, int]], revision: int) -> list[Change]:
        """Changes that take the known state to ``snapshot`` (key -> (value, mod_revision))
        taken at ``revision``.

        Deletes for vanished keys come first, then upserts for new or changed keys. A snapshot
        older than the last one applied is stale and yields nothing.
        """
        if revision < self.snapshot_revision:
            return []
        changes = []
        for key in sorted(self.known.keys() - snapshot.keys()):
            if self.known[key] > revision:
                continue  # put after the snapshot was taken
            del self.known[key]
            changes.append(Change(ChangeKind.DELETE, key, mod_revision=revision))
        for key in sorted(snapshot):
            value, mod_revision = snapshot[key]
            if self.tombstones.get(key, -1) > revision:
                continue  # deleted after the snapshot was taken
            if self.known.get(key, -1) >= mod_revision:
                continue  # unchanged, or the watch already applied a newer value
            self.known[key] = mod_revision
            changes.append(Change(ChangeKind.PUT, key, value, mod_revision))
        self.version += len(changes)
        self.mark_verified(revision)
        return changes

    # ------------------------------------------------------------------ checks

    def probe(self) -> Probe:
        """Take this just before sending a quick check."""
        return Probe(self.revision, len(self.known), self.snapshot_revision, self.version)

    def unchanged(self, probe: Probe, count: int, header_revision: int) -> bool:
        """True if etcd's revision is still the last proof's (so nothing in etcd changed)
        and the prefix still holds as many keys as the state."""
        return (
            self.version == probe.version
            and probe.verified > 0
            and header_revision == probe.verified
            and count == probe.count
        )

    def quick_check(
        self, probe: Probe, changed: Mapping[str, int], count: int, header_revision: int
    ) -> bool:
        """True if etcd's answer at ``header_revision`` proves the state exact there.

        ``changed`` is every key under the prefix with a mod revision above
        ``probe.verified`` (key -> mod revision, values not needed) and ``count`` the number
        of keys under the prefix, both read at ``header_revision``. On success the state
        counts as verified (and caught up) at ``header_revision``.
        """
        if self.version != probe.version or count != probe.count:
            return False
        if header_revision < probe.revision:
            return False  # etcd is behind what the watch saw: not something a check settles
        for key, mod_revision in changed.items():
            if mod_revision > probe.revision or self.known.get(key) != mod_revision:
                return False
        self.mark_verified(header_revision)
        return True

    def exact_probe(self) -> tuple[Probe, dict[str, int]]:
        """The probe and a copy of the known keys, for a check pinned at ``probe.revision``."""
        return self.probe(), dict(self.known)

    @staticmethod
    def compare(
        probe: Probe,
        known: Mapping[str, int],
        etcd: Mapping[str, int],
        *,
        count: int | None = None,
    ) -> Comparison:
        """Compare the state at ``probe.revision`` (``known``, from :meth:`exact_probe`) with
        etcd at that same revision.

        ``etcd`` holds etcd's keys (key -> mod revision) modified after ``probe.verified``
        with ``count`` the number of all keys; or, with ``count=None``, every key (a
        keys-only listing).
        """
        since = probe.verified if count is not None else 0
        puts = []
        unexplained = False
        for key, mod_revision in etcd.items():
            mine = known.get(key, -1)
            if mine < mod_revision:
                puts.append(key)
            elif mine > mod_revision:
                unexplained = True  # etcd went back on a key: data loss, not a lost event
        deletes = sorted(k for k, m in known.items() if m > since and k not in etcd)
        listing = False
        if count is not None:
            created = sum(1 for k in puts if k not in known)
            listing = count != len(known) - len(deletes) + created
        return Comparison(tuple(sorted(puts)), tuple(deletes), listing, unexplained)

    def repair_put(self, key: str, value: bytes, mod_revision: int) -> Change | None:
        """Apply a value a check found missing, unless the watch has since applied newer."""
        if self.known.get(key, -1) >= mod_revision or self.tombstones.get(key, -1) > mod_revision:
            return None
        self.observe_revision(mod_revision)
        self.tombstones.pop(key, None)
        self.known[key] = mod_revision
        self.version += 1
        return Change(ChangeKind.PUT, key, value, mod_revision)

    def repair_delete(self, key: str, revision: int) -> Change | None:
        """Delete a key a check found gone, unless the watch has since put it again."""
        mine = self.known.get(key)
        if mine is None or mine > revision:
            return None
        del self.known[key]
        self.tombstones[key] = max(revision, self.tombstones.get(key, 0))
        self.version += 1
        return Change(ChangeKind.DELETE, key, mod_revision=revision)

    def mark_verified(self, revision: int) -> None:
        """The state is proved exact at ``revision``: later checks start there, events at or
        below it are already applied, and older tombstones can go."""
        if revision <= self.snapshot_revision:
            return
        self.snapshot_revision = revision
        self.observe_revision(revision)
        if self.tombstones:
            self.tombstones = {k: r for k, r in self.tombstones.items() if r > revision}
