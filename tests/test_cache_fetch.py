"""resolve_metadata_files against real local servers: every scheme, hostile servers, locks,
single-flight, repair and legacy cards."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import math
import os
import socket
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from discovery_mdc.cache import (
    AllSourcesFailedError,
    CacheLayout,
    CacheStats,
    FetchConfig,
    HfOfflineError,
    MetadataCache,
    ResolvedCard,
    SourceHealth,
    _store,
    resolve_metadata_files,
)
from discovery_mdc.card import (
    CheckedFile,
    Checksum,
    ModelDeploymentCard,
    Slot,
    SlotVariant,
    from_dir,
    hash_bytes,
    hash_file,
)
from discovery_mdc.errors import (
    CacheError,
    CardError,
    ChecksumMismatchError,
    FetchError,
    LockTimeoutError,
    SizeLimitError,
    SourceUnreachableError,
    UnsupportedSchemeError,
)
from testkit import FakeClock, MetaServer, wait_until


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for var in ("HF_HUB_OFFLINE", "HF_TOKEN", "HF_ENDPOINT", "HF_HOME", "DYN_MDC_CACHE_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-hub"))
    monkeypatch.setenv("HF_TOKEN_PATH", str(tmp_path / "hf-token"))


def read(path: str | Path) -> bytes:
    return Path(path).read_bytes()


def tree(path: Path) -> list[str]:
    return sorted(str(p) for p in path.rglob("*"))


def listing(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir()) if path.exists() else []


def assert_nothing_published(cache: CacheLayout) -> None:
    assert listing(cache.blobs) == []
    assert listing(cache.tmp) == []
    links = (
        [p for p in cache.by_slug.rglob("*") if p.is_symlink()] if cache.by_slug.exists() else []
    )
    assert links == []


def assert_cached(
    resolved: ResolvedCard, original: ModelDeploymentCard, cache: CacheLayout
) -> None:
    """Every slot points into by-slug/<slug>/<mdcsum>/ at a link to a blob with the right bytes."""
    assert resolved.local_dir == cache.by_slug / original.slug / resolved.mdcsum
    pairs = list(zip(original.files(), resolved.card.files(), strict=True))
    assert pairs
    for (_, before), (_, after) in pairs:
        link = Path(after.path)
        assert link.parent == resolved.local_dir
        assert link.is_symlink() and not os.path.isabs(os.readlink(link))
        blob = cache.blob(before.checksum.hex)
        assert link.resolve() == blob.resolve()
        assert hash_bytes(blob.read_bytes()) == before.checksum
        assert after.checksum == before.checksum and after.size == before.size
    assert listing(cache.tmp) == []


@pytest.fixture
def card(make_model_dir: Callable[..., Path]) -> ModelDeploymentCard:
    return from_dir(make_model_dir(), include_extra_files=True)


# --------------------------------------------------------------------------- schemes


async def test_http_card_is_cached_as_blobs_and_links(
    meta_server: MetaServer, card: ModelDeploymentCard, cache: CacheLayout
) -> None:
    http_card = meta_server.http_card(card)
    stats = CacheStats()
    resolved = await resolve_metadata_files(http_card, cache_dir=cache.root, stats=stats)
    assert_cached(resolved, http_card, cache)
    assert stats.fetches == len(list(card.files())) and stats.hits == 0
    assert stats.bytes_fetched == sum(f.size or 0 for _, f in card.files())
    # Warm: no request at all.
    before = sum(meta_server.gets.values())
    again = await resolve_metadata_files(http_card, cache_dir=cache.root, stats=stats)
    assert again == resolved
    assert sum(meta_server.gets.values()) == before
    assert stats.hits == len(list(card.files()))


async def test_file_paths_are_copied_into_the_cache(
    card: ModelDeploymentCard, cache: CacheLayout
) -> None:
    resolved = await resolve_metadata_files(card, cache_dir=cache.root)
    assert_cached(resolved, card, cache)


async def test_the_default_cache_root_is_under_home_whatever_the_variable_says(
    card: ModelDeploymentCard, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # DYN_MDC_CACHE_DIR is the CLI's (--cache-dir); the library takes the directory as a value.
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DYN_MDC_CACHE_DIR", str(tmp_path / "envcache"))
    resolved = await resolve_metadata_files(card)
    assert_cached(resolved, card, CacheLayout(tmp_path / "home" / ".cache" / "dynamo" / "mdc"))
    assert not (tmp_path / "envcache").exists()


def hf_card(card: ModelDeploymentCard, repo: str) -> ModelDeploymentCard:
    return card.with_paths(lambda _, f: f"hf://{repo}/{f.basename}")


async def test_hf_resolves_from_local_hf_cache_offline(
    card: ModelDeploymentCard,
    cache: CacheLayout,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    make_hf_repo: Callable[..., Path],
) -> None:
    make_hf_repo(tmp_path / "hf-hub", "org/tiny", Path(card.source_path or ""))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # never contacted
    remote = hf_card(card, "org/tiny")
    resolved = await resolve_metadata_files(remote, cache_dir=cache.root)
    assert_cached(resolved, remote, cache)


async def test_hf_revision_is_looked_up_in_refs(
    card: ModelDeploymentCard,
    cache: CacheLayout,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    make_hf_repo: Callable[..., Path],
) -> None:
    make_hf_repo(tmp_path / "hf-hub", "org/tiny", Path(card.source_path or ""), "v1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    resolved = await resolve_metadata_files(hf_card(card, "org/tiny@v1"), cache_dir=cache.root)
    assert resolved.local_dir is not None and resolved.local_dir.is_dir()


async def test_hf_offline_and_not_cached_is_a_connection_error(
    card: ModelDeploymentCard, cache: CacheLayout, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HfOfflineError, match="HF_HUB_OFFLINE") as info:
        await resolve_metadata_files(hf_card(card, "org/missing"), cache_dir=cache.root)
    assert isinstance(info.value, ConnectionError) and isinstance(info.value, FetchError)
    assert_nothing_published(cache)


@pytest.mark.parametrize("source", ["HF_TOKEN", "the file `hf auth login` writes"])
async def test_hf_downloads_from_endpoint_with_token(
    meta_server: MetaServer,
    card: ModelDeploymentCard,
    cache: CacheLayout,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    source: str,
) -> None:
    for _, f in card.files():
        meta_server.files[f"/org/tiny/resolve/main/{f.basename}"] = read(f.path)
    monkeypatch.setenv("HF_ENDPOINT", meta_server.url(""))
    if source == "HF_TOKEN":
        monkeypatch.setenv("HF_TOKEN", "secret")
    else:
        monkeypatch.delenv("HF_TOKEN_PATH")
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
        (tmp_path / "hf-home").mkdir()
        (tmp_path / "hf-home" / "token").write_text("secret\n")
    remote = hf_card(card, "org/tiny")
    resolved = await resolve_metadata_files(remote, cache_dir=cache.root)
    assert_cached(resolved, remote, cache)
    assert set(meta_server.auth.values()) == {"Bearer secret"}


async def test_token_is_not_forwarded_to_another_host_on_redirect(
    meta_server: MetaServer,
    card: ModelDeploymentCard,
    cache: CacheLayout,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _, config = next(card.files())
    small = card.replace(tokenizer=None, prompt_formatter=None, gen_config=None, extra_files=())
    meta_server.files["/cdn/config.json"] = read(config.path)

    async def to_cdn(_: web.Request) -> web.StreamResponse:
        # localhost is another origin than 127.0.0.1.
        raise web.HTTPFound(f"http://localhost:{meta_server.port}/cdn/config.json")

    meta_server.handlers["/org/tiny/resolve/main/config.json"] = to_cdn
    monkeypatch.setenv("HF_ENDPOINT", meta_server.url(""))
    monkeypatch.setenv("HF_TOKEN", "secret")
    await resolve_metadata_files(hf_card(small, "org/tiny"), cache_dir=cache.root)
    assert meta_server.auth["/org/tiny/resolve/main/config.json"] == "Bearer secret"
    assert meta_server.auth["/cdn/config.json"] is None


# --------------------------------------------------------------------------- hostile servers


def one_file_card(url: str, data: bytes, size: int | None = None) -> ModelDeploymentCard:
    """A new-format card with one slot whose checksum and size describe ``data``."""
    return ModelDeploymentCard.new(
        "Evil/Model",
        model_info=_slot(CheckedFile(url, hash_bytes(data), len(data) if size is None else size)),
    )


def _slot(f: CheckedFile) -> Slot:
    return Slot(SlotVariant.HF_CONFIG_JSON, f)


GOOD = b'{"max_position_embeddings": 4096}' * 100


async def test_wrong_bytes_are_rejected_naming_uri_expected_and_actual(
    meta_server: MetaServer, cache: CacheLayout
) -> None:
    meta_server.files["/config.json"] = b"X" * len(GOOD)
    card = one_file_card(meta_server.url("/config.json"), GOOD)
    with pytest.raises(ChecksumMismatchError) as info:
        await resolve_metadata_files(card, cache_dir=cache.root)
    err = info.value
    assert isinstance(err, ValueError)
    assert err.uri == meta_server.url("/config.json")
    assert hash_bytes(GOOD).hex in err.expected
    assert hash_bytes(b"X" * len(GOOD)).hex in err.actual
    assert_nothing_published(cache)


async def test_short_body_is_a_mismatch(meta_server: MetaServer, cache: CacheLayout) -> None:
    meta_server.files["/config.json"] = GOOD[:-1]
    with pytest.raises(ChecksumMismatchError, match=f"{len(GOOD) - 1} bytes"):
        await resolve_metadata_files(
            one_file_card(meta_server.url("/config.json"), GOOD), cache_dir=cache.root
        )
    assert_nothing_published(cache)


async def test_content_length_above_size_is_rejected_before_reading(
    meta_server: MetaServer, cache: CacheLayout
) -> None:
    meta_server.files["/config.json"] = GOOD + b"more"
    with pytest.raises(SizeLimitError, match="Content-Length"):
        await resolve_metadata_files(
            one_file_card(meta_server.url("/config.json"), GOOD), cache_dir=cache.root
        )
    assert_nothing_published(cache)


async def test_endless_chunked_body_is_cut_at_the_cap(
    meta_server: MetaServer, cache: CacheLayout
) -> None:
    sent = 0

    async def endless(request: web.Request) -> web.StreamResponse:
        nonlocal sent
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        await resp.write(GOOD)
        for _ in range(10_000):  # 640 MiB if nobody stops reading
            await resp.write(b"z" * 65536)
            sent += 65536
        return resp

    meta_server.handlers["/config.json"] = endless
    with pytest.raises(SizeLimitError, match="exceeds the cap"):
        await resolve_metadata_files(
            one_file_card(meta_server.url("/config.json"), GOOD), cache_dir=cache.root
        )
    assert_nothing_published(cache)


async def _raw_server(response: bytes) -> tuple[asyncio.Server, str]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(response)
        await writer.drain()
        writer.close()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    return srv, f"http://127.0.0.1:{port}/config.json"


async def test_lying_content_length_with_truncated_body_is_a_fetch_error(
    cache: CacheLayout,
) -> None:
    half = GOOD[: len(GOOD) // 2]
    head = f"HTTP/1.1 200 OK\r\nContent-Length: {len(GOOD)}\r\nConnection: close\r\n\r\n"
    srv, url = await _raw_server(head.encode() + half)
    async with srv:
        with pytest.raises(FetchError, match=url):
            await resolve_metadata_files(one_file_card(url, GOOD), cache_dir=cache.root)
    assert_nothing_published(cache)


async def test_content_length_smaller_than_body_is_rejected(cache: CacheLayout) -> None:
    head = f"HTTP/1.1 200 OK\r\nContent-Length: {len(GOOD) - 10}\r\nConnection: close\r\n\r\n"
    srv, url = await _raw_server(head.encode() + GOOD)
    async with srv:
        # aiohttp may see the surplus as a protocol error, or stop at Content-Length and
        # leave a short body: either way it is rejected, with a one-line message.
        with pytest.raises((FetchError, ChecksumMismatchError)) as info:
            await resolve_metadata_files(one_file_card(url, GOOD), cache_dir=cache.root)
    assert "\n" not in str(info.value) and len(str(info.value)) < 1000
    assert_nothing_published(cache)


async def test_stalled_body_times_out(meta_server: MetaServer, cache: CacheLayout) -> None:
    async def stall(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.content_length = len(GOOD)
        await resp.prepare(request)
        await resp.write(GOOD[:100])
        await meta_server.release.wait()
        return resp

    meta_server.handlers["/config.json"] = stall
    with pytest.raises(SourceUnreachableError, match="timed out"):
        await resolve_metadata_files(
            one_file_card(meta_server.url("/config.json"), GOOD),
            cache_dir=cache.root,
            read_timeout=0.2,
        )
    assert_nothing_published(cache)


@pytest.fixture
async def tarpit() -> AsyncIterator[str]:
    """``host:port`` of a server that accepts connections and never answers."""
    hold = asyncio.Event()
    writers: list[asyncio.StreamWriter] = []

    async def accept(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        await hold.wait()

    srv = await asyncio.start_server(accept, "127.0.0.1", 0)
    yield f"127.0.0.1:{srv.sockets[0].getsockname()[1]}"
    hold.set()
    for writer in writers:
        writer.close()
    srv.close()


async def test_a_server_that_accepts_and_never_answers_is_given_up_on_at_the_first_byte(
    tarpit: str, cache: CacheLayout
) -> None:
    card = one_file_card(f"http://{tarpit}/config.json", GOOD)
    async with asyncio.timeout(30):  # main waited for the 60 s read timeout
        with pytest.raises(SourceUnreachableError, match=r"no response within 0\.2s"):
            await resolve_metadata_files(card, cache_dir=cache.root, first_byte_timeout=0.2)
    assert_nothing_published(cache)


def two_file_card(config_url: str, tokenizer_url: str) -> ModelDeploymentCard:
    return ModelDeploymentCard.new(
        "Some/Model",
        model_info=_slot(CheckedFile(config_url, hash_bytes(GOOD), len(GOOD))),
        tokenizer=Slot(
            SlotVariant.HF_TOKENIZER_JSON, CheckedFile(tokenizer_url, hash_bytes(b"{}"), 2)
        ),
    )


async def test_a_source_that_stopped_answering_backs_off_and_is_tried_after_the_others(
    meta_server: MetaServer, tarpit: str, cache: CacheLayout
) -> None:
    now = [100.0]
    health = SourceHealth(initial=2.0, clock=lambda: now[0])
    stats = CacheStats()

    async def resolve(card: ModelDeploymentCard, **kw: Any) -> Any:
        return await resolve_metadata_files(
            card, cache_dir=cache.root, first_byte_timeout=0.2, health=health, stats=stats, **kw
        )

    # Both files time out together: one failure, not two.
    with pytest.raises(SourceUnreachableError, match="no response"):
        await resolve(two_file_card(f"http://{tarpit}/a/config.json", f"http://{tarpit}/a/t"))
    assert health.sources() == {tarpit: 1}
    # Another card on it fails at once, without a request.
    with pytest.raises(SourceUnreachableError, match=r"backing off: failed 1 time\(s\) in a row"):
        await resolve(one_file_card(f"http://{tarpit}/b/config.json", GOOD))
    assert stats.by_source[tarpit, "skipped"] == 1
    # A card whose other replica answers is served by it; the tarpit is not even tried.
    meta_server.files["/c/config.json"] = GOOD
    card = one_file_card(f"http://{tarpit}/c/config.json", GOOD)
    await resolve(card, alternates={hash_bytes(GOOD).hex: [meta_server.url("/c/config.json")]})
    assert stats.by_source[tarpit, "skipped"] == 1 and meta_server.gets["/c/config.json"] == 1
    # Its time up, one request probes it again; failing, it backs off twice as long.
    now[0] += 2.0
    with pytest.raises(SourceUnreachableError, match="no response"):
        await resolve(one_file_card(f"http://{tarpit}/d/config.json", b"not cached yet"))
    assert health.sources() == {tarpit: 2}
    assert "next try in 4.0s" in (health.backing_off(tarpit) or "")


async def test_a_card_on_a_frozen_host_gets_a_shared_file_from_another_card_waiting_for_it(
    meta_server: MetaServer, tarpit: str, cache: CacheLayout
) -> None:
    # Two models share generation_config.json (fine-tunes of one base). The first card's
    # host never answers; while it holds the blob's lock the second card waits for it.
    meta_server.files["/good/config.json"] = GOOD
    frozen = one_file_card(f"http://{tarpit}/frozen/config.json", GOOD)
    healthy = one_file_card(meta_server.url("/good/config.json"), GOOD).replace(
        display_name="Other"
    )
    health = SourceHealth()
    async with MetadataCache(
        cache.root, fetch=FetchConfig(first_byte_timeout=0.5), health=health
    ) as shared:
        first = asyncio.ensure_future(shared.resolve(frozen))
        await wait_until(lambda: any(cache.locks.glob("*")) if cache.locks.exists() else False)
        second = asyncio.ensure_future(shared.resolve(healthy))
        async with asyncio.timeout(30):
            done = await asyncio.gather(first, second)
    # The frozen card's fetch, once its own host timed out, took the bytes from the host the
    # other card knows: both resolve, with one GET in all.
    assert [read(r.files[0]) for r in done] == [GOOD, GOOD]
    assert meta_server.gets["/good/config.json"] == 1
    assert health.sources() == {tarpit: 1}


async def test_total_timeout_bounds_a_slow_trickle(
    meta_server: MetaServer, cache: CacheLayout
) -> None:
    async def trickle(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.content_length = len(GOOD)
        await resp.prepare(request)
        for i in range(len(GOOD)):
            await resp.write(GOOD[i : i + 1])
            await asyncio.sleep(0.01)
        return resp

    meta_server.handlers["/config.json"] = trickle
    with pytest.raises(FetchError, match="timed out"):
        await resolve_metadata_files(
            one_file_card(meta_server.url("/config.json"), GOOD),
            cache_dir=cache.root,
            total_timeout=0.3,
        )
    assert_nothing_published(cache)


async def test_redirect_to_file_is_refused(meta_server: MetaServer, cache: CacheLayout) -> None:
    async def to_file(_: web.Request) -> web.StreamResponse:
        raise web.HTTPFound("file:///etc/passwd")

    meta_server.handlers["/config.json"] = to_file
    with pytest.raises(UnsupportedSchemeError, match="file:///etc/passwd"):
        await resolve_metadata_files(
            one_file_card(meta_server.url("/config.json"), GOOD), cache_dir=cache.root
        )
    assert_nothing_published(cache)


async def test_http_redirect_is_followed(meta_server: MetaServer, cache: CacheLayout) -> None:
    meta_server.files["/real.json"] = GOOD

    async def moved(_: web.Request) -> web.StreamResponse:
        raise web.HTTPMovedPermanently("/real.json")

    meta_server.handlers["/config.json"] = moved
    resolved = await resolve_metadata_files(
        one_file_card(meta_server.url("/config.json"), GOOD), cache_dir=cache.root
    )
    assert read(resolved.files[0]) == GOOD


async def test_non_2xx_names_status_and_uri(meta_server: MetaServer, cache: CacheLayout) -> None:
    url = meta_server.url("/missing.json")
    with pytest.raises(FetchError, match=rf"{url} returned HTTP 404"):
        await resolve_metadata_files(one_file_card(url, GOOD), cache_dir=cache.root)
    assert_nothing_published(cache)


async def test_declared_size_above_ceiling_fails_before_any_request(
    meta_server: MetaServer, cache: CacheLayout
) -> None:
    meta_server.files["/config.json"] = GOOD
    card = one_file_card(meta_server.url("/config.json"), GOOD, size=(1 << 30) + 1)
    with pytest.raises(SizeLimitError):
        await resolve_metadata_files(card, cache_dir=cache.root)
    assert meta_server.gets == Counter()


async def test_unknown_scheme_is_unsupported(cache: CacheLayout) -> None:
    with pytest.raises(UnsupportedSchemeError):
        await resolve_metadata_files(
            one_file_card("nats://x/config.json", GOOD), cache_dir=cache.root
        )
    assert_nothing_published(cache)


# --------------------------------------------------------------------------- alternates


async def test_failed_fetch_tries_the_next_alternate(
    meta_server: MetaServer, cache: CacheLayout
) -> None:
    meta_server.files["/b/config.json"] = GOOD
    meta_server.files["/a/config.json"] = b"tampered" + GOOD[8:]
    card = one_file_card(meta_server.url("/a/config.json"), GOOD)
    alternates = {hash_bytes(GOOD).hex: [meta_server.url("/b/config.json")]}
    resolved = await resolve_metadata_files(card, cache_dir=cache.root, alternates=alternates)
    assert read(resolved.files[0]) == GOOD


async def test_spread_fetches_each_blob_once_from_the_ranked_replica_and_counts_sources(
    meta_server: MetaServer, cache: CacheLayout, caplog: pytest.LogCaptureFixture
) -> None:
    from discovery_mdc.cache._plan import spread_sources

    dead = "http://127.0.0.1:1/v1/metadata/m/config.json"  # nothing listens: refused
    meta_server.files["/w2/config.json"] = GOOD
    live = meta_server.url("/w2/config.json")
    blob = hash_bytes(GOOD).hex
    # A frontend id that ranks the dead replica first, so the failover is exercised.
    spread = next(
        f"fe-{n}"
        for n in range(100)
        if spread_sources({blob: [live, dead]}, f"fe-{n}")[blob][0] == dead
    )
    stats = CacheStats()
    card = one_file_card(live, GOOD)
    caplog.set_level(logging.DEBUG, logger="discovery_mdc.cache")
    await resolve_metadata_files(
        card, cache_dir=cache.root, alternates={blob: [dead]}, spread=spread, stats=stats
    )
    assert meta_server.gets["/w2/config.json"] == 1
    assert stats.by_source == {
        ("127.0.0.1:1", "failed"): 1,
        (f"127.0.0.1:{meta_server.port}", "ok"): 1,
    }
    # The debug log names the source that served the blob (and where it was in the order).
    served = [r.getMessage() for r in caplog.records
              if r.levelno == logging.DEBUG and "served by" in r.getMessage()]  # fmt: skip
    assert served == [f"config.json ({blob[:12]}): served by {live}, source 2 of 2"]


@contextlib.contextmanager
def black_hole() -> Iterator[int]:
    """A loopback port whose connects hang: a listener (backlog 0) whose accept queue one
    never-accepted connection fills, so the kernel drops every later SYN unanswered."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = int(listener.getsockname()[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10):
            yield port


async def test_a_frontend_abandons_a_black_holed_replica_quickly_and_the_next_one_serves(
    meta_server: MetaServer,
    cache: CacheLayout,
    card: ModelDeploymentCard,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The frontend's resolver passes its connect timeout and its spread: this frontend's
    spread ranks the black-holed replica first for some blobs (the registry's own order lists
    the live one first), and each of those attempts is abandoned after the connect timeout,
    not aiohttp's or the cache's default (10 s)."""
    from discovery_mdc.cache._plan import spread_sources
    from discovery_mdc.card import ModelEnvelope, encode_envelope
    from discovery_mdc.etcd import MemoryStore
    from discovery_mdc.frontend import ModelWatcher, _watcher

    monkeypatch.setattr(_watcher, "FETCH_CONNECT_TIMEOUT", 0.5)
    caplog.set_level(logging.ERROR, logger="discovery_mdc.cache")
    live = meta_server.http_card(card)
    store = MemoryStore()
    with black_hole() as hole_port:
        prefix = f"http://127.0.0.1:{meta_server.port}/"
        hole = live.with_paths(
            lambda _, f: f.path.replace(prefix, f"http://127.0.0.1:{hole_port}/")
        )
        # Instance 1 (live) is listed and admitted first, so it leads the registry's order.
        for instance, c in ((1, live), (2, hole)):
            env = ModelEnvelope(
                namespace="dynamo", component="backend", endpoint="generate",
                instance_id=instance, card=c,
            )  # fmt: skip
            await store.put(env.key, encode_envelope(env))
        sources = {f.checksum.hex: [f.path] for _, f in live.files()}
        for _, f in hole.files():
            sources[f.checksum.hex].append(f.path)
        ordered = spread_sources(sources, "fe-under-test")
        via_hole = {
            h for h, uris in ordered.items() if uris[0].startswith(f"http://127.0.0.1:{hole_port}/")
        }
        assert via_hole  # two replicas, several blobs: the spread puts some first on each
        async with ModelWatcher(
            store, cache_dir=cache.root, frontend_id="fe-under-test", reconcile_interval=0
        ) as watcher:
            # Generous for a 0.5 s timeout (a few tiny local fetches), short of the 10 s default.
            await watcher.wait_for_model(live.display_name, timeout=8)
    rejected = [r.getMessage() for r in caplog.records if r.getMessage().startswith("rejected")]
    # A blob whose fetch starts after the hole timed out skips it at once (it backs off).
    assert 1 <= len(rejected) <= len(via_hole), rejected
    assert all(f"127.0.0.1:{hole_port}" in m and "timed out" in m for m in rejected)
    assert sum(meta_server.gets.values()) == len(sources)  # each blob once, from the live replica


async def test_all_alternates_failing_lists_every_uri(
    meta_server: MetaServer, cache: CacheLayout
) -> None:
    meta_server.files["/a/config.json"] = b"tampered" + GOOD[8:]
    urls = [
        meta_server.url("/a/config.json"),
        meta_server.url("/b/config.json"),
        "file:///nonexistent/x",
    ]
    card = one_file_card(urls[0], GOOD)
    with pytest.raises(AllSourcesFailedError) as info:
        await resolve_metadata_files(
            card, cache_dir=cache.root, alternates={hash_bytes(GOOD).hex: urls[1:]}
        )
    assert [uri for uri, _ in info.value.errors] == urls
    assert all(u in str(info.value) for u in urls)
    assert isinstance(info.value.errors[0][1], ChecksumMismatchError)
    assert_nothing_published(cache)


# --------------------------------------------------------------------------- security


async def test_file_uri_to_etc_passwd_with_fake_checksum_is_rejected(cache: CacheLayout) -> None:
    size = len(read("/etc/passwd"))
    fake = CheckedFile("file:///etc/passwd", Checksum("0" * 64), size)
    card = ModelDeploymentCard.new("evil", model_info=_slot(fake))
    with pytest.raises(ChecksumMismatchError):
        await resolve_metadata_files(card, cache_dir=cache.root)
    assert_nothing_published(cache)
    smaller = ModelDeploymentCard.new(
        "evil", model_info=_slot(CheckedFile(fake.path, fake.checksum, 1))
    )
    with pytest.raises(SizeLimitError):
        await resolve_metadata_files(smaller, cache_dir=cache.root)
    assert_nothing_published(cache)


@pytest.mark.parametrize(
    "name", ["..%2F..%2F..%2Fescape", "%2E%2E", "a%2F..%2F..%2Fescape", "..%5Cescape"]
)
async def test_traversal_file_names_create_nothing_outside_by_slug(
    meta_server: MetaServer, cache: CacheLayout, tmp_path: Path, name: str
) -> None:
    meta_server.files[f"/x/{name}"] = GOOD
    before = tree(tmp_path)
    with pytest.raises(CardError):
        await resolve_metadata_files(
            one_file_card(meta_server.url(f"/x/{name}"), GOOD), cache_dir=cache.root
        )
    after = tree(tmp_path)
    assert after == before
    assert meta_server.gets == Counter()


async def test_fifo_named_by_a_card_does_not_hang(tmp_path: Path, cache: CacheLayout) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(FetchError, match="not a regular file"):
        await resolve_metadata_files(one_file_card(str(fifo), GOOD), cache_dir=cache.root)
    assert_nothing_published(cache)


# --------------------------------------------------------------------------- concurrency, locks


async def test_twenty_concurrent_resolves_make_one_get_per_blob(
    meta_server: MetaServer, card: ModelDeploymentCard, cache: CacheLayout
) -> None:
    http_card = meta_server.http_card(card)
    async with MetadataCache(cache.root) as shared:
        results = await asyncio.gather(*(shared.resolve(http_card) for _ in range(20)))
    assert all(r == results[0] for r in results)
    assert set(meta_server.gets.values()) == {1}
    assert len(meta_server.gets) == len(list(card.files()))
    assert_cached(results[0], http_card, cache)


async def test_two_cards_sharing_a_blob_fetch_it_once(
    meta_server: MetaServer, card: ModelDeploymentCard, cache: CacheLayout
) -> None:
    http_card = meta_server.http_card(card)
    other = http_card.replace(display_name="Other", slug="other")
    async with MetadataCache(cache.root) as shared:
        a, b = await asyncio.gather(shared.resolve(http_card), shared.resolve(other))
    assert a.local_dir != b.local_dir
    assert set(meta_server.gets.values()) == {1}


def _hold_lock(path: Path) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


async def test_lock_timeout_names_the_lock(meta_server: MetaServer, cache: CacheLayout) -> None:
    meta_server.files["/config.json"] = GOOD
    fd = _hold_lock(cache.lock(hash_bytes(GOOD).hex))
    try:
        with pytest.raises(LockTimeoutError, match=str(cache.lock(hash_bytes(GOOD).hex))):
            await resolve_metadata_files(
                one_file_card(meta_server.url("/config.json"), GOOD),
                cache_dir=cache.root,
                lock_timeout=0.2,
            )
    finally:
        os.close(fd)
    assert meta_server.gets == Counter()
    assert_nothing_published(cache)


async def test_waiter_logs_and_proceeds_once_the_lock_is_released(
    meta_server: MetaServer, cache: CacheLayout, caplog: pytest.LogCaptureFixture
) -> None:
    meta_server.files["/config.json"] = GOOD
    fd = _hold_lock(cache.lock(hash_bytes(GOOD).hex))
    caplog.set_level(logging.DEBUG, logger="discovery_mdc.cache")
    task = asyncio.ensure_future(
        resolve_metadata_files(
            one_file_card(meta_server.url("/config.json"), GOOD), cache_dir=cache.root
        )
    )
    await wait_until(lambda: "waiting" in caplog.text)
    assert not task.done()
    os.close(fd)
    resolved = await asyncio.wait_for(task, 30)
    assert read(resolved.files[0]) == GOOD


async def test_cancelled_fetch_leaves_no_temp_file(
    meta_server: MetaServer, cache: CacheLayout
) -> None:
    started = asyncio.Event()

    async def stall(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.content_length = len(GOOD)
        await resp.prepare(request)
        await resp.write(GOOD[:100])
        started.set()
        await meta_server.release.wait()
        return resp

    meta_server.handlers["/config.json"] = stall
    task = asyncio.ensure_future(
        resolve_metadata_files(
            one_file_card(meta_server.url("/config.json"), GOOD), cache_dir=cache.root
        )
    )
    await asyncio.wait_for(started.wait(), 30)
    await wait_until(lambda: bool(listing(cache.tmp)))
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert_nothing_published(cache)


# --------------------------------------------------------------------------- repair, disk


async def test_corrupt_blob_is_detected_and_replaced(
    meta_server: MetaServer, card: ModelDeploymentCard, cache: CacheLayout
) -> None:
    http_card = meta_server.http_card(card)
    stats = CacheStats()
    await resolve_metadata_files(http_card, cache_dir=cache.root, stats=stats)
    _, config = next(card.files())
    blob = cache.blob(config.checksum.hex)
    good = read(blob)
    blob.write_bytes(b"x" * len(good))  # same size, new content
    gets = meta_server.gets[f"/v1/metadata/{card.slug}/config.json"]
    resolved = await resolve_metadata_files(http_card, cache_dir=cache.root, stats=stats)
    assert read(blob) == good
    assert stats.repairs == 1
    assert meta_server.gets[f"/v1/metadata/{card.slug}/config.json"] == gets + 1
    assert_cached(resolved, http_card, cache)


async def test_verification_memo_does_not_hide_a_rewrite(
    meta_server: MetaServer,
    card: ModelDeploymentCard,
    cache: CacheLayout,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A 50 ms racy window instead of 2 s, so the test need not wait long for a memo entry.
    monkeypatch.setattr(_store, "_RACY_NS", 50_000_000)
    hashed: list[Path] = []

    def counting_hash_file(path: Path, **kw: Any) -> Any:
        hashed.append(path)
        return hash_file(path, **kw)

    monkeypatch.setattr("discovery_mdc.cache._store.hash_file", counting_hash_file)
    http_card = meta_server.http_card(card)
    _, config = next(card.files())
    blob = cache.blob(config.checksum.hex)
    async with MetadataCache(cache.root) as shared:
        await shared.resolve(http_card)
        good = read(blob)
        await wait_until(lambda: time.time_ns() - blob.stat().st_ctime_ns > 100_000_000)
        await shared.resolve(http_card)  # hashes each blob, now old enough to be memoized
        hashed.clear()
        await shared.resolve(http_card)
        assert hashed == []  # the warm path is memoized
        st = blob.stat()
        blob.write_bytes(b"x" * len(good))
        # Even with the old mtime restored, the ctime moved past the memo's entry.
        os.utime(blob, ns=(st.st_atime_ns, st.st_mtime_ns))
        await shared.resolve(http_card)
        assert read(blob) == good
        assert shared.stats.repairs == 1
        # Forgetting the memo hashes every blob again.
        await wait_until(lambda: time.time_ns() - blob.stat().st_ctime_ns > 100_000_000)
        await shared.resolve(http_card)
        hashed.clear()
        shared.forget_verified()
        await shared.resolve(http_card)
        assert len(hashed) == len({f.checksum.hex for _, f in card.files()})


async def test_disk_full_is_a_clear_cache_error(
    meta_server: MetaServer, cache: CacheLayout, monkeypatch: pytest.MonkeyPatch
) -> None:
    meta_server.files["/config.json"] = GOOD

    def full(fd: int, data: object) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("discovery_mdc.cache._store.os.write", full)
    with pytest.raises(CacheError, match="disk full") as info:
        await resolve_metadata_files(
            one_file_card(meta_server.url("/config.json"), GOOD), cache_dir=cache.root
        )
    assert str(cache.tmp) in str(info.value)
    assert_nothing_published(cache)


async def test_caller_session_is_used_and_left_open(
    meta_server: MetaServer, card: ModelDeploymentCard, cache: CacheLayout
) -> None:
    async with aiohttp.ClientSession() as session:
        await resolve_metadata_files(
            meta_server.http_card(card), cache_dir=cache.root, session=session
        )
        assert not session.closed


async def test_a_cache_makes_one_session_for_all_its_resolves_and_closes_it(
    meta_server: MetaServer,
    make_model_dir: Callable[..., Path],
    cache: CacheLayout,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    made: list[aiohttp.ClientSession] = []
    real_session = aiohttp.ClientSession

    def session(*args: Any, **kwargs: Any) -> aiohttp.ClientSession:
        made.append(real_session(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(aiohttp, "ClientSession", session)
    cards = [meta_server.http_card(from_dir(make_model_dir(f"m{i}", seed=i))) for i in range(3)]
    async with MetadataCache(cache.root) as shared:
        await shared.resolve(cards[0])
        await asyncio.gather(*(shared.resolve(c) for c in cards[1:]))
        assert len(made) == 1 and not made[0].closed
    assert made[0].closed
    assert shared.stats.fetches == len({f.checksum.hex for c in cards for _, f in c.files()})


async def test_a_warm_resolve_records_the_cards_last_use(
    card: ModelDeploymentCard, cache: CacheLayout
) -> None:
    resolved = await resolve_metadata_files(card, cache_dir=cache.root)
    long_ago = time.time() - 30 * 86400
    for link in resolved.files:
        os.utime(link, (long_ago, long_ago), follow_symlinks=False)
    again = await resolve_metadata_files(card, cache_dir=cache.root)
    assert again.files == resolved.files
    # Each link's own mtime is the card's last use (prune --older-than, --keep decide by it).
    assert all(time.time() - link.lstat().st_mtime < 120 for link in again.files)


# --------------------------------------------------------------------------- legacy cards


def legacy(card: ModelDeploymentCard) -> ModelDeploymentCard:
    return card.map_files(lambda _, f: CheckedFile(f.path, f.checksum))


async def test_legacy_card_with_local_files_is_used_in_place(
    card: ModelDeploymentCard, cache: CacheLayout
) -> None:
    old = legacy(card)
    resolved = await resolve_metadata_files(old, cache_dir=cache.root)
    assert resolved.in_place
    # make_model_dir paths are absolute already.
    assert resolved.local_dir == Path(card.source_path or "")
    assert [f.path for _, f in resolved.card.files()] == [f.path for _, f in card.files()]
    assert not cache.root.exists()


async def test_legacy_card_with_missing_files_falls_back_to_hf(
    card: ModelDeploymentCard,
    cache: CacheLayout,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    make_hf_repo: Callable[..., Path],
) -> None:
    make_hf_repo(tmp_path / "hf-hub", "org/tiny", Path(card.source_path or ""))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    old = legacy(card.with_paths(lambda _, f: f"/elsewhere/{f.basename}")).replace(
        source_path="org/tiny"
    )
    resolved = await resolve_metadata_files(old, cache_dir=cache.root)
    assert not resolved.in_place
    for (_, before), (_, after) in zip(old.files(), resolved.card.files(), strict=True):
        assert hash_bytes(read(after.path)) == before.checksum


async def test_mixed_card_is_legacy_and_logged(
    card: ModelDeploymentCard, cache: CacheLayout, caplog: pytest.LogCaptureFixture
) -> None:
    mixed = card.replace(
        extra_files=tuple(CheckedFile(f.path, f.checksum) for f in card.extra_files)
    )
    resolved = await resolve_metadata_files(mixed, cache_dir=cache.root)
    assert resolved.in_place
    assert "treating it as legacy" in caplog.text


async def test_legacy_card_pointing_at_a_foreign_local_file_is_rejected(
    cache: CacheLayout,
) -> None:
    evil = ModelDeploymentCard.new(
        "evil", model_info=_slot(CheckedFile("/etc/passwd", Checksum("0" * 64)))
    )
    with pytest.raises(ChecksumMismatchError, match="/etc/passwd"):
        await resolve_metadata_files(evil, cache_dir=cache.root)
    assert not cache.root.exists()


async def test_cancel_during_a_local_copy_waits_for_the_copy_and_cleans_up(
    tmp_path: Path, cache: CacheLayout
) -> None:
    data = os.urandom(3 << 20)
    src = tmp_path / "config.json"
    src.write_bytes(data)
    started, proceed = threading.Event(), threading.Event()
    copying_after_done: list[int] = []
    finished = False

    def progress(_: str, received: int, __: int | None) -> None:
        # Runs in the copy thread: hold it on the first chunk until the task is cancelled.
        if finished:
            copying_after_done.append(received)
        started.set()
        proceed.wait(30)

    task = asyncio.ensure_future(
        resolve_metadata_files(
            one_file_card(str(src), data), cache_dir=cache.root, progress=progress
        )
    )
    await wait_until(started.is_set)
    task.cancel()
    proceed.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    finished = True
    assert copying_after_done == []
    assert_nothing_published(cache)


async def test_lock_wait_logs_its_progress_and_gives_up_on_the_injected_clock(
    cache: CacheLayout, caplog: pytest.LogCaptureFixture
) -> None:
    path = cache.lock(hash_bytes(GOOD).hex)
    fd = _hold_lock(path)
    fake = FakeClock(jump_below=math.inf)  # every poll's pause moves virtual time at once
    caplog.set_level(logging.INFO, logger="discovery_mdc.cache")
    try:
        with pytest.raises(LockTimeoutError, match="timed out after 25s"):
            async with _store.blob_lock(path, 25.0, clock=fake.clock, sleep=fake.sleep):
                pass
    finally:
        os.close(fd)
    waits = [r.getMessage() for r in caplog.records if "still waiting" in r.getMessage()]
    assert waits == [f"still waiting for lock {path} after {s}s" for s in (10, 20)]
    assert 25.0 <= fake.now <= 25.0 + 1e-6  # the last pause stops at the deadline
    assert max(fake.sleeps) == pytest.approx(0.1)  # polls back off to 0.1 s
