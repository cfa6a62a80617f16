"""The informer's pure state: replays, relist diffs, and the reconcile checks.

The checks are also exercised against a simulated etcd whose watch loses random events
(hypothesis): a quick check that passes must mean the state is exact, and the pinned
comparison plus its repairs must always make it exact.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st_

from discovery_mdc.etcd import Change, ChangeKind, WatchState


def test_watch_state_ignores_replays_and_tracks_revision() -> None:
    st = WatchState()
    assert st.on_put("a", b"1", 5) is not None
    assert st.on_put("a", b"1", 5) is None
    assert st.on_put("a", b"2", 4) is None
    assert st.revision == 5
    assert st.on_delete("missing", 7) is None and st.revision == 7
    assert st.on_delete("a", 8) is not None and st.known == {}


def test_relist_diff_emits_deletes_for_vanished_keys_and_upserts_for_changes() -> None:
    st = WatchState()
    for key, rev in (("gone", 1), ("same", 2), ("changed", 3)):
        st.on_put(key, b"v", rev)
    changes = st.diff({"same": (b"v", 2), "changed": (b"w", 10), "new": (b"n", 11)}, revision=12)
    assert [(c.kind, c.key) for c in changes] == [
        (ChangeKind.DELETE, "gone"),
        (ChangeKind.PUT, "changed"),
        (ChangeKind.PUT, "new"),
    ]
    assert st.known == {"same": 2, "changed": 10, "new": 11} and st.revision == 12
    assert st.diff({"same": (b"v", 2), "changed": (b"w", 10), "new": (b"n", 11)}, 12) == []


def test_watch_events_at_or_below_the_last_snapshot_are_already_applied() -> None:
    st = WatchState()
    assert st.diff({"a": (b"v", 5)}, revision=10) == [Change(ChangeKind.PUT, "a", b"v", 5)]
    # A lagging watch delivers what the snapshot already holds: nothing to do.
    assert st.on_delete("a", 4) is None and st.on_put("b", b"x", 9) is None
    assert st.known == {"a": 5}
    assert st.on_delete("a", 11) is not None and st.known == {}


def test_a_stale_snapshot_never_undoes_newer_watch_events() -> None:
    st = WatchState()
    st.diff({"old": (b"v", 3)}, revision=10)
    st.on_put("new", b"n", 12)
    st.on_delete("old", 13)
    # A relist that started before those events answers at revision 11.
    assert st.diff({"old": (b"v", 3)}, revision=11) == []
    assert st.known == {"new": 12}
    # One older than the last snapshot applied is ignored outright.
    assert st.diff({}, revision=9) == []
    assert st.known == {"new": 12}


# --------------------------------------------------------------------------- quick check


def _state(**keys: int) -> WatchState:
    st = WatchState()
    st.diff({k: (b"v", m) for k, m in keys.items()}, revision=max(keys.values(), default=1))
    return st


def test_quick_check_with_nothing_changed_proves_the_state_at_etcds_revision() -> None:
    st = _state(a=3, b=4)
    probe = st.probe()
    assert probe.verified == 4
    # Other prefixes moved etcd to 20; nothing under ours changed since 4.
    assert st.quick_check(probe, {}, count=2, header_revision=20)
    assert st.snapshot_revision == 20 and st.revision == 20
    assert st.probe().verified == 20  # the next check asks only for changes after 20


def test_quick_check_accepts_changes_the_watch_already_applied() -> None:
    st = _state(a=3)
    st.on_put("b", b"v", 7)
    st.on_delete("a", 8)
    probe = st.probe()
    assert st.quick_check(probe, {"b": 7}, count=1, header_revision=9)


def test_quick_check_fails_on_anything_the_state_cannot_vouch_for() -> None:
    st = _state(a=3, b=4)
    p = st.probe()
    assert not st.quick_check(p, {"c": 9}, count=3, header_revision=9)  # newer than the state
    assert not st.quick_check(p, {"a": 4}, count=2, header_revision=9)  # other mod revision
    assert not st.quick_check(p, {}, count=1, header_revision=9)  # a delete the state lacks
    assert not st.quick_check(p, {}, count=2, header_revision=3)  # etcd went backwards
    st.on_put("c", b"v", 10)  # the watch applied something while the check was in flight
    assert not st.quick_check(p, {}, count=2, header_revision=9)
    assert st.snapshot_revision == 4


# --------------------------------------------------------------------------- pinned comparison


def test_compare_finds_missed_puts_and_deletes_of_recent_keys() -> None:
    st = _state(old=2)
    st.on_put("gone", b"v", 5)
    st.on_put("stale", b"v", 6)
    st.observe_revision(9)  # a progress header: the watch claims completeness through 9
    probe, known = st.exact_probe()
    etcd = {"stale": 8, "new": 7}  # modified after the last proof (2), at revision 9
    found = WatchState.compare(probe, known, etcd, count=3)
    assert found.puts == ("new", "stale")
    assert found.deletes == ("gone",)
    assert not found.listing and not found.unexplained


def test_compare_sends_an_unexplained_count_to_a_listing_that_finds_the_old_delete() -> None:
    st = _state(a=2, b=3)
    st.observe_revision(9)
    probe, known = st.exact_probe()
    found = WatchState.compare(probe, known, {}, count=1)  # b vanished, unseen, long ago
    assert found.listing and found.deletes == ()
    listed = WatchState.compare(probe, known, {"a": 2})
    assert listed.deletes == ("b",) and listed.puts == ()


def test_compare_calls_an_older_etcd_revision_unexplained() -> None:
    st = _state(a=5)
    probe, known = st.exact_probe()
    assert WatchState.compare(probe, known, {"a": 4}).unexplained


def test_repairs_never_undo_what_the_watch_applied_since() -> None:
    st = _state(a=2)
    st.on_put("a", b"new", 12)
    assert st.repair_put("a", b"old", 10) is None
    assert st.repair_delete("a", 11) is None and st.known == {"a": 12}
    st.on_delete("b", 13)
    assert st.repair_put("b", b"v", 12) is None  # deleted after that value
    assert st.repair_put("c", b"v", 12) == Change(ChangeKind.PUT, "c", b"v", 12)
    assert st.repair_delete("c", 14) == Change(ChangeKind.DELETE, "c", mod_revision=14)


def test_mark_verified_drops_replays_and_old_tombstones() -> None:
    st = _state(a=2)
    st.on_delete("a", 5)
    st.on_delete("x", 9)
    st.mark_verified(6)
    assert st.tombstones == {"x": 9}
    assert st.on_put("y", b"v", 6) is None  # at or below the proof: already reflected


# --------------------------------------------------------------------------- lossy watch


class _Etcd:
    """A prefix in a simulated etcd: key -> (value, mod revision), one revision per op."""

    def __init__(self) -> None:
        self.kvs: dict[str, tuple[bytes, int]] = {}
        self.rev = 1

    def mods(self, since: int = 0) -> dict[str, int]:
        return {k: m for k, (_, m) in self.kvs.items() if m > since}


_ops = st_.lists(
    st_.tuples(st_.sampled_from(["put", "delete"]), st_.integers(0, 7), st_.booleans()),
    max_size=30,
)


@settings(max_examples=300, deadline=None)
@given(rounds=st_.lists(_ops, min_size=1, max_size=4), initial=st_.integers(0, 5))
def test_checks_are_sound_and_repairs_make_a_lossy_watch_exact(
    rounds: list[list[tuple[str, int, bool]]], initial: int
) -> None:
    etcd = _Etcd()
    for i in range(initial):
        etcd.rev += 1
        etcd.kvs[f"k{i}"] = (b"v0", etcd.rev)
    st = WatchState()
    st.diff(dict(etcd.kvs), etcd.rev)
    for ops in rounds:
        for op, n, delivered in ops:
            key = f"k{n}"
            etcd.rev += 1
            if op == "put":
                etcd.kvs[key] = (f"v{etcd.rev}".encode(), etcd.rev)
                if delivered:
                    st.on_put(key, etcd.kvs[key][0], etcd.rev)
            elif etcd.kvs.pop(key, None) is not None and delivered:
                st.on_delete(key, etcd.rev)
        st.observe_revision(etcd.rev)  # a progress header claims the watch is complete
        exact = st.known == etcd.mods()
        probe = st.probe()
        if st.unchanged(probe, len(etcd.kvs), etcd.rev):
            assert exact, "an unchanged etcd revision must mean an exact state"
        passed = st.quick_check(probe, etcd.mods(probe.verified), len(etcd.kvs), etcd.rev)
        assert passed == exact, "the quick check passes exactly when the state is exact"
        if passed:
            continue
        probe, known = st.exact_probe()
        found = WatchState.compare(probe, known, etcd.mods(probe.verified), count=len(etcd.kvs))
        if found.listing:
            found = WatchState.compare(probe, known, etcd.mods())
        assert not found.unexplained and not found.listing
        for key in found.deletes:
            st.repair_delete(key, probe.revision)
        for key in found.puts:
            value, mod = etcd.kvs[key]
            assert st.repair_put(key, value, mod) is not None
        st.mark_verified(probe.revision)
        assert st.known == etcd.mods()


def test_an_answer_below_the_revision_reached_or_from_another_cluster_is_lost_history() -> None:
    st = WatchState()
    assert st.history_lost(0, 5, cluster_id=7) is None and st.cluster_id == 7
    assert st.history_lost(5, 5, cluster_id=7) is None
    assert st.history_lost(5, 9) is None  # no cluster id in the answer: not checked
    assert "below revision 5" in (st.history_lost(5, 4, cluster_id=7) or "")
    assert "cluster id changed from 7 to 8" in (st.history_lost(5, 50, cluster_id=8) or "")


def test_forgetting_history_makes_the_next_relist_replace_every_key() -> None:
    st = WatchState()
    st.diff({"gone": (b"v", 40), "kept": (b"old", 41)}, revision=50)
    st.on_delete("deleted", 51)
    st.forget_history()
    assert (st.revision, st.snapshot_revision, st.tombstones) == (0, 0, {})
    # etcd restarted empty and a worker wrote "kept" again, at a revision far below 41.
    changes = st.diff({"kept": (b"new", 2), "deleted": (b"back", 3)}, revision=3)
    assert changes == [
        Change(ChangeKind.DELETE, "gone", mod_revision=3),
        Change(ChangeKind.PUT, "deleted", b"back", 3),
        Change(ChangeKind.PUT, "kept", b"new", 2),
    ]
    assert st.known == {"kept": 2, "deleted": 3} and st.revision == 3
