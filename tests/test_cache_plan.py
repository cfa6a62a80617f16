"""The pure cache plan: layout, names, URIs, caps, prune planning. No network, little I/O."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from discovery_mdc.cache import (
    EMPTY_SLUG_DIR,
    MAX_BLOB_SIZE,
    CachedBlob,
    CachedCard,
    CachedFile,
    CacheLayout,
    CacheScan,
    CorruptBlob,
    IncompleteCard,
    SourceHealth,
    TempFile,
    VerifyReport,
    default_cache_root,
    parse_hf_uri,
    plan_card,
    plan_fix,
    plan_prune,
    plan_removal,
    select_cards,
)
from discovery_mdc.cache._plan import (
    link_name,
    local_path_of,
    rank_sources,
    source_label,
    source_uri,
    spread_sources,
    validate_link_name,
)
from discovery_mdc.card import CheckedFile, Checksum, ModelDeploymentCard, Slot, SlotVariant, mdcsum
from discovery_mdc.errors import CardError, ConfigError, FetchError, SizeLimitError

HEX_A = "a" * 64
HEX_B = "b" * 64
LAYOUT = CacheLayout(Path("/cache"))


def card_with(
    *files: CheckedFile, slug: str = "m", source_path: str | None = None
) -> ModelDeploymentCard:
    first, *extras = files
    return ModelDeploymentCard(
        display_name="M",
        slug=slug,
        source_path=source_path,
        model_info=Slot(SlotVariant.HF_CONFIG_JSON, first),
        extra_files=tuple(extras),
    )


def test_plan_points_links_into_by_slug_mdcsum_and_blobs_by_hex() -> None:
    card = card_with(
        CheckedFile("http://h:1/v1/metadata/m/config.json", Checksum(HEX_A), 10),
        CheckedFile("/models/m/special_tokens_map.json", Checksum(HEX_B), 20),
    )
    plan = plan_card(card, LAYOUT)
    assert plan.mdcsum == mdcsum(card)
    assert plan.link_dir == Path("/cache/by-slug/m") / plan.mdcsum
    cfg, extra = plan.files
    assert (cfg.slot, cfg.filename, cfg.cap, cfg.size) == ("model_info", "config.json", 10, 10)
    assert cfg.uris == ("http://h:1/v1/metadata/m/config.json",)
    assert cfg.blob_path == Path("/cache/blobs") / HEX_A
    assert cfg.link_path == plan.link_dir / "config.json"
    assert extra.slot == "extra_files[0]"
    assert extra.uris == ("file:///models/m/special_tokens_map.json",)
    assert LAYOUT.lock(HEX_A) == Path("/cache/.locks") / f"{HEX_A}.lock"


def test_alternates_follow_the_slot_uri_without_duplicates() -> None:
    card = card_with(CheckedFile("http://a/config.json", Checksum(HEX_A), 1))
    plan = plan_card(
        card,
        LAYOUT,
        alternates={HEX_A: ["http://b/config.json", "http://a/config.json"], HEX_B: ["x"]},
    )
    assert plan.files[0].uris == ("http://a/config.json", "http://b/config.json")


REPLICAS = [f"http://10.0.0.{i}:8081/v1/metadata/m/tokenizer.json" for i in range(4)]


def test_spread_ranks_self_hosted_sources_and_keeps_the_others_in_place() -> None:
    uris = ["hf://org/m/tokenizer.json", REPLICAS[0], REPLICAS[1], "file:///m/t.json", REPLICAS[2]]
    ranked = rank_sources(uris, HEX_A, "frontend-1")
    assert (ranked[0], ranked[3]) == (uris[0], uris[3])
    assert sorted(ranked[i] for i in (1, 2, 4)) == sorted(REPLICAS[:3])
    # The order among replicas depends on (frontend, blob, replica) only, not on input order.
    again = rank_sources(list(reversed(uris)), HEX_A, "frontend-1")
    assert [u for u in again if u.startswith("http")] == [u for u in ranked if u.startswith("http")]
    assert rank_sources(uris[:2], HEX_A, "frontend-1") == uris[:2]  # one replica: as given


def test_failover_rank_picks_each_replica_first_for_a_fair_share_of_frontends_and_blobs() -> None:
    fleet = Counter(rank_sources(REPLICAS, HEX_A, f"frontend-{n}")[0] for n in range(1200))
    assert set(fleet) == set(REPLICAS)
    assert max(fleet.values()) < 1.15 * 300  # fair share 300 each
    blobs = Counter(rank_sources(REPLICAS, f"{n:064x}", "frontend-1")[0] for n in range(1200))
    assert max(blobs.values()) < 1.15 * 300


def replica_urls(n_replicas: int, blob: int) -> list[str]:
    return [f"http://10.0.0.{i}:8081/v1/metadata/m/f{blob}.json" for i in range(n_replicas)]


def first_choices(n_blobs: int, n_replicas: int, spread: str) -> Counter[str]:
    """How many of one frontend's blobs go first to each replica host."""
    sources = {f"{b:064x}": replica_urls(n_replicas, b) for b in range(n_blobs)}
    ordered = spread_sources(sources, spread)
    return Counter(urlsplit(uris[0]).hostname or "" for uris in ordered.values())


def test_one_frontend_spreads_its_blobs_as_evenly_as_possible_over_the_replicas() -> None:
    for n_replicas in (2, 3, 4, 5):
        for n_blobs in range(1, 13):
            for fe in ("fe-0", "fe-1", "host:/var/cache/x"):
                counts = first_choices(n_blobs, n_replicas, fe)
                assert sum(counts.values()) == n_blobs
                if n_blobs >= n_replicas:
                    assert len(counts) == n_replicas, (n_blobs, n_replicas, fe, counts)
                assert max(counts.values()) - min(counts.values()) <= 1, counts


def test_a_fleet_of_frontends_spreads_evenly_even_where_blobs_do_not_divide() -> None:
    # 5 blobs over 4 replicas: each frontend gives one replica two; which one is its own.
    fleet: Counter[str] = Counter()
    for n in range(1200):
        fleet += first_choices(5, 4, f"frontend-{n}")
    fair = 1200 * 5 / 4
    assert max(fleet.values()) < 1.05 * fair, fleet
    # P7's shape, 12 frontends x 5 blobs x 4 replicas: no fleet puts 1.5x the fair share on
    # one replica (independent per-blob picks did in ~6% of fleets).
    worst = 0.0
    for fleet_no in range(300):
        gets: Counter[str] = Counter()
        for n in range(12):
            gets += first_choices(5, 4, f"fleet-{fleet_no}/fe-{n}")
        worst = max(worst, max(gets.values()) / 15)
    assert worst <= 1.5


def test_spread_fails_over_in_rank_order_and_keeps_other_sources_in_place() -> None:
    uris = ["hf://org/m/tokenizer.json", REPLICAS[0], REPLICAS[1], "file:///m/t.json", REPLICAS[2]]
    sources = {HEX_A: uris, HEX_B: [u.replace("tokenizer", "config") for u in uris]}
    ordered = spread_sources(sources, "frontend-1")
    for hex_, given in sources.items():
        got = ordered[hex_]
        assert (got[0], got[3]) == (given[0], given[3])
        assert sorted(got) == sorted(given)
        http = [got[i] for i in (1, 2, 4)]
        ranked = [u for u in rank_sources(given, hex_, "frontend-1") if u.startswith("http")]
        assert http[1:] == [u for u in ranked if u != http[0]]
    # Two blobs, three replicas: two different first choices.
    assert ordered[HEX_A][1].split("/")[2] != ordered[HEX_B][1].split("/")[2]
    # The result depends on the blobs and replicas, not on the order they are given in.
    again = spread_sources(
        {HEX_B: list(reversed(sources[HEX_B])), HEX_A: list(reversed(sources[HEX_A]))},
        "frontend-1",
    )
    for hex_ in sources:
        assert [u for u in again[hex_] if u.startswith("http")] == [
            u for u in ordered[hex_] if u.startswith("http")
        ]
    one = {HEX_A: ["file:///m/t.json", REPLICAS[0]]}
    assert spread_sources(one, "frontend-1") == one  # one replica: as given


def test_plan_with_spread_orders_every_file_for_that_frontend() -> None:
    configs = [u.replace("tokenizer", "config") for u in REPLICAS]
    card = card_with(CheckedFile(REPLICAS[0], Checksum(HEX_A), 1),
                     CheckedFile(configs[0], Checksum(HEX_B), 1))  # fmt: skip
    alternates = {HEX_A: REPLICAS[1:], HEX_B: configs}
    plan = plan_card(card, LAYOUT, alternates=alternates, spread="fe")
    expected = spread_sources({HEX_A: REPLICAS, HEX_B: configs}, "fe")
    assert [list(fp.uris) for fp in plan.files] == [expected[HEX_A], expected[HEX_B]]
    assert plan_card(card, LAYOUT, alternates=alternates).files[0].uris == tuple(REPLICAS)


def test_files_sharing_a_blob_share_its_sources() -> None:
    card = card_with(CheckedFile("http://a:1/m/x.json", Checksum(HEX_A), 1),
                     CheckedFile("http://b:1/m/y.json", Checksum(HEX_A), 1))  # fmt: skip
    x, y = plan_card(card, LAYOUT, spread="fe").files
    assert (x.filename, y.filename) == ("x.json", "y.json")
    assert x.uris == y.uris
    assert sorted(x.uris) == ["http://a:1/m/x.json", "http://b:1/m/y.json"]


def test_source_labels_are_host_port_or_the_scheme() -> None:
    assert source_label("http://W1.example:8081/v1/x") == "w1.example:8081"
    assert source_label("https://h/x") == "h:443"
    assert source_label("http://h/x") == "h:80"
    assert source_label("file:///m/config.json") == "file"
    assert source_label("hf://org/m/config.json") == "hf"


def test_empty_slug_uses_placeholder_dir() -> None:
    card = card_with(CheckedFile("/m/config.json", Checksum(HEX_A), 1), slug="")
    plan = plan_card(card, LAYOUT)
    assert plan.link_dir.parent == Path("/cache/by-slug") / EMPTY_SLUG_DIR


@pytest.mark.parametrize("slug", ["../x", "a/b", ".", "..", "A", "a.b"])
def test_unsafe_slug_is_a_card_error(slug: str) -> None:
    card = card_with(CheckedFile("/m/config.json", Checksum(HEX_A), 1), slug=slug)
    with pytest.raises(CardError):
        plan_card(card, LAYOUT)


@pytest.mark.parametrize(
    "path",
    [
        "http://h/v1/metadata/m/..",
        "http://h/v1/metadata/m/%2E%2E",
        "http://h/v1/metadata/m/a%2Fb",
        "http://h/v1/metadata/m/a%5Cb",
        "http://h/v1/metadata/m/a%00b",
        "http://h/",
        "/models/..",
        "..",
        "C:\\x\\..",
        "http://h/" + "x" * 300,
        "/m/.tmp-link.1.abc",
    ],
)
def test_unsafe_file_names_are_rejected_before_any_path_is_built(path: str) -> None:
    card = card_with(CheckedFile(path, Checksum(HEX_A), 1))
    with pytest.raises(CardError):
        plan_card(card, LAYOUT)


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "a\\b", "a\x00b"])
def test_validate_link_name_rejects(name: str) -> None:
    with pytest.raises(CardError):
        validate_link_name(name)


def test_link_name_percent_decodes_urls_only() -> None:
    assert link_name("http://h/my%20file.json") == "my file.json"
    assert link_name("/models/my%20file.json") == "my%20file.json"


def test_two_different_files_with_one_name_are_rejected() -> None:
    card = card_with(
        CheckedFile("/a/config.json", Checksum(HEX_A), 1),
        CheckedFile("/b/config.json", Checksum(HEX_B), 1),
    )
    with pytest.raises(CardError, match="two different files"):
        plan_card(card, LAYOUT)


def test_declared_size_above_ceiling_fails_at_plan_time() -> None:
    card = card_with(CheckedFile("http://h/config.json", Checksum(HEX_A), MAX_BLOB_SIZE + 1))
    with pytest.raises(SizeLimitError, match="ceiling"):
        plan_card(card, LAYOUT)
    ok = card_with(CheckedFile("http://h/config.json", Checksum(HEX_A), MAX_BLOB_SIZE))
    assert plan_card(ok, LAYOUT).files[0].cap == MAX_BLOB_SIZE


def test_legacy_hf_fallback_uris_use_source_path() -> None:
    card = card_with(CheckedFile("/gone/config.json", Checksum(HEX_A)), source_path="org/name")
    plan = plan_card(card, LAYOUT, hf_fallback=True)
    assert plan.files[0].uris == ("hf://org/name/config.json",)
    assert plan.files[0].cap == MAX_BLOB_SIZE
    with pytest.raises(CardError, match="source_path"):
        plan_card(
            card_with(CheckedFile("/gone/config.json", Checksum(HEX_A))), LAYOUT, hf_fallback=True
        )


def test_uri_helpers() -> None:
    assert source_uri("/a b/c.json") == "file:///a%20b/c.json"
    assert source_uri("http://x/y") == "http://x/y"
    assert local_path_of("file:///a%20b/c.json") == "/a b/c.json"
    assert local_path_of("/x/y") == "/x/y"
    assert local_path_of("http://x/y") is None
    assert local_path_of("file://otherhost/y") is None


def test_default_cache_root_is_under_home_and_leaves_the_variable_to_the_cli() -> None:
    assert default_cache_root({"HOME": "/h"}) == Path("/h/.cache/dynamo/mdc")
    assert default_cache_root({"DYN_MDC_CACHE_DIR": "/c", "HOME": "/h"}) == Path(
        "/h/.cache/dynamo/mdc"
    )


@pytest.mark.parametrize(
    ("uri", "repo", "rev", "file"),
    [
        ("hf://org/name/config.json", "org/name", "main", "config.json"),
        ("hf://gpt2/config.json", "gpt2", "main", "config.json"),
        ("hf://org/name@v1.0/config.json", "org/name", "v1.0", "config.json"),
        ("hf://org/name@refs/pr/1/config.json", "org/name", "refs/pr/1", "config.json"),
        ("hf://org/name@refs%2Fpr%2F1/config.json", "org/name", "refs/pr/1", "config.json"),
    ],
)
def test_parse_hf_uri(uri: str, repo: str, rev: str, file: str) -> None:
    ref = parse_hf_uri(uri)
    assert (ref.repo, ref.revision, ref.filename) == (repo, rev, file)


@pytest.mark.parametrize(
    "uri",
    [
        "hf://config.json",
        "hf://a/b/c/config.json",
        "hf://../x/config.json",
        "hf://org/name/",
        # The revision names a file under refs/: never absolute, dotted or NUL.
        "hf://org/name@/dev/zero/config.json",
        "hf://org/name@%2Fetc%2Fpasswd/config.json",
        "hf://org/name@refs/../../x/config.json",
        "hf://org/name@./config.json",
        "hf://org/name@%00/config.json",
        "hf://org/name@refs//pr/config.json",
    ],
)
def test_parse_hf_uri_rejects_malformed(uri: str) -> None:
    with pytest.raises(FetchError):
        parse_hf_uri(uri)


# --------------------------------------------------------------------------- prune planning

HEX_C = "c" * 64
NOW = 1000.0 + 60 * 86400


def _card(
    slug: str, sum_: str, last_used: float, *files: tuple[str, str, int | None]
) -> CachedCard:
    d = Path("/c/by-slug") / slug / (sum_ * 64)
    links = tuple(CachedFile(n, d / n, h, size) for n, h, size in files)
    return CachedCard(slug, sum_ * 64, d, links, last_used)


def _scan() -> CacheScan:
    root = Path("/c")
    return CacheScan(
        layout=CacheLayout(root),
        cards=(
            _card("m", "1", NOW - 40 * 86400, ("config.json", HEX_A, 10)),
            _card("m", "3", NOW - 10 * 86400, ("config.json", HEX_A, 10), ("x.json", HEX_C, 30)),
            _card("m", "4", NOW, ("config.json", HEX_A, 10)),
            _card("gone", "2", NOW, ("tok.json", HEX_B, None)),
        ),
        blobs=(
            CachedBlob(HEX_A, root / "blobs" / HEX_A, 10, 0.0, referenced=True),
            CachedBlob(HEX_C, root / "blobs" / HEX_C, 30, 0.0, referenced=True),
            CachedBlob("d" * 64, root / "blobs" / ("d" * 64), 50, 0.0, referenced=False),
        ),
        temp_files=(
            TempFile(root / "tmp/dead.part", 5, NOW - 60, owner_pid=1, owner_alive=False),
            TempFile(root / "tmp/live.part", 7, NOW - 60, owner_pid=2, owner_alive=True),
            TempFile(root / "tmp/old.part", 9, 0.0, owner_pid=3, owner_alive=True),
        ),
        empty_dirs=(),
        warnings=(),
        incomplete=(
            IncompleteCard(
                "m",
                root / "by-slug/m/.tmp-card.x.5.y",
                "5" * 64,
                (HEX_C,),
                NOW - 60,
                owner_pid=5,
                owner_alive=False,
            ),
            IncompleteCard(
                "m",
                root / "by-slug/m/.tmp-card.x.6.y",
                "6" * 64,
                (),
                NOW - 60,
                owner_pid=6,
                owner_alive=True,
            ),
        ),
    )


def test_prune_plan_lists_broken_cards_dead_staging_temps_unreferenced_blobs_and_dirs() -> None:
    plan = plan_prune(_scan(), now=NOW, stale_after=3600)
    assert [(i.kind, i.path.name) for i in plan.cards] == [
        ("card", "2" * 64),
        ("incomplete", ".tmp-card.x.5.y"),
    ]
    assert plan.cards[0].broken == (HEX_B,) and "1 of 1 links broken" in plan.cards[0].reason
    assert [i.path.name for i in plan.temp_files] == ["dead.part", "old.part"]
    assert [i.hex for i in plan.blobs] == ["d" * 64]
    assert [i.path for i in plan.dirs] == [Path("/c/by-slug/gone")]
    assert plan.expected_freed_bytes == 5 + 9 + 50
    # Execution order: cards, temp files, blobs, dirs.
    assert [i.kind for i in plan.items] == ["card", "incomplete", "temp", "temp", "blob", "dir"]


def test_prune_plan_removes_old_temp_files_even_if_owner_pid_looks_alive() -> None:
    plan = plan_prune(_scan(), now=NOW, stale_after=10 * 86400)
    assert [i.path.name for i in plan.temp_files] == ["dead.part", "old.part"]
    plan = plan_prune(_scan(), now=NOW + 7200, stale_after=3600)
    assert sorted(i.path.name for i in plan.temp_files) == ["dead.part", "live.part", "old.part"]
    assert [i.kind for i in plan.cards].count("incomplete") == 2


def test_prune_older_than_and_keep_select_by_last_use_per_model() -> None:
    old = plan_prune(_scan(), now=NOW, older_than=30 * 86400)
    assert [i.path.name for i in old.cards if i.kind == "card"] == ["2" * 64, "1" * 64]
    unused = next(i for i in old.cards if i.path.name == "1" * 64)
    assert unused.unused_since == NOW - 40 * 86400 and unused.reason == "last used 40d ago"
    # HEX_A is still linked by the cards that stay: only the link of card 1 goes.
    assert [i.hex for i in old.blobs] == ["d" * 64]
    keep = plan_prune(_scan(), now=NOW, keep=1)
    assert sorted(i.path.name for i in keep.cards if i.kind == "card") == [
        "1" * 64, "2" * 64, "3" * 64,
    ]  # fmt: skip
    # Card 3 and a dead writer's staging dir (pruned too) were all that linked HEX_C.
    assert sorted(i.hex or "" for i in keep.blobs) == [HEX_C, "d" * 64]


def test_removal_plan_takes_only_blobs_no_other_card_links() -> None:
    scan = _scan()
    plan = plan_removal(scan, [c for c in scan.cards if c.mdcsum == "3" * 64])
    assert [i.reason for i in plan.cards] == ["requested"]
    assert plan.temp_files == () and plan.dirs == ()
    # HEX_C is linked by the dead staging dir too, which a removal leaves alone.
    assert plan.blobs == ()
    everything = plan_removal(scan, [c for c in scan.cards if c.slug == "gone"])
    assert [i.path for i in everything.dirs] == [Path("/c/by-slug/gone")]


def test_select_cards_by_name_slug_and_mdcsum_prefix() -> None:
    scan = _scan()
    assert {c.mdcsum[0] for c in select_cards(scan, "m")} == {"1", "3", "4"}
    assert {c.mdcsum[0] for c in select_cards(scan, "M")} == {"1", "3", "4"}
    assert [c.mdcsum[0] for c in select_cards(scan, "m/3333")] == ["3"]
    assert select_cards(scan, "nope") == []
    assert select_cards(scan, "nope/3333") == []
    assert select_cards(scan, "m/xyz") == []  # not hex: a model name, not cached
    with pytest.raises(ConfigError, match=r"'m/33': the mdcsum prefix '33' is too short"):
        select_cards(scan, "m/33")


def test_select_cards_refuses_a_prefix_that_matches_more_than_one_card() -> None:
    scan = _scan()
    twins = [replace(c, mdcsum=f"abcd{d * 60}") for c, d in zip(scan.cards[:2], "12", strict=True)]
    scan = replace(scan, cards=(*twins, *scan.cards[2:]))
    assert {c.slug for c in twins} == {"m"}
    with pytest.raises(ConfigError, match=r"'m/abcd' is ambiguous: it matches 2 cards") as err:
        select_cards(scan, "m/abcd")
    assert all(c.id in str(err.value) for c in twins)
    assert select_cards(scan, "m/abcd2") == [twins[1]]


def test_fix_plan_takes_corrupt_blobs_and_the_cards_linking_them() -> None:
    scan = _scan()
    report = VerifyReport(3, (CorruptBlob(HEX_C, scan.blobs[1].path, "f" * 64),), ())
    plan = plan_fix(scan, report)
    assert [i.path.name for i in plan.cards] == ["3" * 64]
    [blob] = plan.blobs
    assert blob.hex == HEX_C and blob.corrupt and "f" * 64 in blob.reason


# --------------------------------------------------------------------------- source health


def test_a_failing_source_backs_off_doubling_up_to_the_cap_and_an_answer_clears_it() -> None:
    now = [0.0]
    health = SourceHealth(initial=2.0, cap=10.0, clock=lambda: now[0])
    assert health.claim("h:1") and health.backing_off("h:1") is None
    health.record("h:1", False)
    windows = []
    for _ in range(4):
        assert not health.claim("h:1")
        left = health.backing_off("h:1") or ""
        windows.append(float(left.rsplit("next try in ", 1)[1].rstrip("s")))
        now[0] += windows[-1]
        assert health.claim("h:1")  # time is up: this request probes it
        health.record("h:1", False)
    assert windows == [2.0, 4.0, 8.0, 10.0]
    assert health.sources() == {"h:1": 5}
    now[0] += 10.0
    assert health.claim("h:1")
    health.record("h:1", True)  # it answered: healthy again
    assert health.sources() == {} and health.claim("h:1")


def test_requests_failing_together_count_once_and_only_one_probe_goes() -> None:
    now = [0.0]
    health = SourceHealth(initial=2.0, clock=lambda: now[0])
    for _ in range(5):  # the files of one card, sent at once
        assert health.claim("h:1")
    for _ in range(5):
        health.record("h:1", False)
    assert health.sources() == {"h:1": 1}
    now[0] += 2.0
    assert health.claim("h:1")
    assert not health.claim("h:1")
    assert "another request is trying it now" in (health.backing_off("h:1") or "")
    health.record("h:1", None)  # the probe was cancelled: no verdict, the next may go
    assert health.claim("h:1")
    assert health.claim("h:2") and health.sources() == {"h:1": 1}
