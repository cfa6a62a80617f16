"""The cache plan (pure: no I/O): cache layout, what to fetch for a card, where to link it.

Everything a card contributes to a file-system path is validated here: the slug becomes one
directory name, the mdcsum another (we compute it, so it is always 64 hex), the checksum hex
names the blob (validated on decode) and the file name becomes the link name. Nothing derived
from a card can therefore name a path outside ``by-slug/``.
"""

from __future__ import annotations

import functools
import os
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final
from urllib.parse import unquote, urlsplit

import blake3

from discovery_mdc._clock import Clock
from discovery_mdc._env import default_cache_root
from discovery_mdc.card import (
    MAX_FILE_SIZE,
    CheckedFile,
    Checksum,
    ModelDeploymentCard,
    is_url,
    mdcsum,
    uri_basename,
)
from discovery_mdc.errors import CardError, SizeLimitError

__all__ = [
    "EMPTY_SLUG_DIR",
    "MAX_BLOB_SIZE",
    "CacheLayout",
    "CardPlan",
    "FilePlan",
    "SourceHealth",
    "default_cache_root",
    "hf_fallback_uri",
    "http_source",
    "link_name",
    "local_path_of",
    "plan_card",
    "rank_sources",
    "resolve_cache_root",
    "size_cap",
    "slug_dir_name",
    "source_label",
    "source_uri",
    "spread_sources",
    "validate_link_name",
]

#: The absolute ceiling on one metadata file, whatever the card declares (a worker never
#: publishes a larger one).
MAX_BLOB_SIZE: Final = MAX_FILE_SIZE
#: The directory used for a card whose slug is empty (``日本語`` slugifies to ``""``).
#: ``slugify`` strips leading ``_``, so no derived slug is ever exactly ``_``.
EMPTY_SLUG_DIR: Final = "_"
#: Prefix of temporary names inside the cache; card file names may not use it.
TEMP_PREFIX: Final = ".tmp-"
_SLUG_DIR: Final = re.compile(r"[a-z0-9_-]+")
_NAME_MAX: Final = 255


def resolve_cache_root(cache_dir: str | os.PathLike[str] | None) -> Path:
    """The absolute cache root: ``cache_dir`` if given, else :func:`default_cache_root`."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_root()
    return Path(os.path.abspath(root))


@dataclass(frozen=True, slots=True)
class CacheLayout:
    """Where everything lives under one cache root."""

    root: Path

    @property
    def blobs(self) -> Path:
        return self.root / "blobs"

    @property
    def by_slug(self) -> Path:
        return self.root / "by-slug"

    @property
    def locks(self) -> Path:
        return self.root / ".locks"

    @property
    def tmp(self) -> Path:
        return self.root / "tmp"

    def blob(self, hexdigest: str) -> Path:
        return self.blobs / hexdigest

    def lock(self, hexdigest: str) -> Path:
        return self.locks / f"{hexdigest}.lock"

    def link_dir(self, slug: str, card_sum: str) -> Path:
        return self.by_slug / slug_dir_name(slug) / card_sum


def slug_dir_name(slug: str) -> str:
    """The directory name for a slug; :data:`EMPTY_SLUG_DIR` for the empty slug."""
    if slug == "":
        return EMPTY_SLUG_DIR
    if not _SLUG_DIR.fullmatch(slug):
        raise CardError(f"invalid slug {slug!r}: only [a-z0-9_-] is allowed")
    return slug


def validate_link_name(name: str) -> str:
    """Return ``name`` if it is a plain file name safe to create inside the cache."""
    if (
        name in ("", ".", "..")
        or "/" in name
        or "\\" in name
        or "\x00" in name
        or name.startswith(TEMP_PREFIX)
        or len(name.encode("utf-8", "surrogateescape")) > _NAME_MAX
    ):
        raise CardError(f"unsafe metadata file name {name!r}: must be a plain base name")
    return name


def link_name(path: str) -> str:
    """The validated link name for a slot path. URL names are percent-decoded first, so an
    encoded ``%2F`` or ``..`` is caught as well."""
    base = uri_basename(path)
    if is_url(path):
        base = unquote(base)
    return validate_link_name(base)


def local_path_of(path: str) -> str | None:
    """The local file system path a slot names (a bare path or ``file://``), else ``None``."""
    if not is_url(path):
        return path
    parts = urlsplit(path)
    if parts.scheme.lower() == "file" and parts.netloc in ("", "localhost"):
        return unquote(parts.path)
    return None


def source_uri(path: str) -> str:
    """A slot path as a URI: URLs unchanged, a local path as ``file://<absolute path>``."""
    if is_url(path):
        return path
    return Path(os.path.abspath(path)).as_uri()


def _http_origin(uri: str) -> str | None:
    """``scheme://host:port`` of an http(s) URI (the replica serving it), else None."""
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        return None
    port = parts.port or (443 if scheme == "https" else 80)
    return f"{scheme}://{parts.hostname.lower()}:{port}"


@functools.lru_cache(maxsize=8192)
def http_source(uri: str) -> str | None:
    """``host:port`` of an http(s) URI (the replica serving it), else None."""
    origin = _http_origin(uri)
    return None if origin is None else origin.split("://", 1)[1]


def source_label(uri: str) -> str:
    """What a per-source metric calls ``uri``'s source: ``host:port`` for http(s), else the
    scheme (``file``, ``hf``)."""
    return http_source(uri) or urlsplit(uri).scheme.lower() or "file"


def _replace_http(uris: Sequence[str], ranked: Sequence[str]) -> list[str]:
    """``uris`` with its http(s) entries replaced, in order, by ``ranked``."""
    out = list(uris)
    slots = [i for i, u in enumerate(uris) if _http_origin(u) is not None]
    for i, uri in zip(slots, ranked, strict=True):
        out[i] = uri
    return out


def _weight(*parts: str) -> int:
    return int.from_bytes(blake3.blake3("\0".join(parts).encode()).digest(8))


def rank_sources(uris: Sequence[str], blob_hex: str, spread: str) -> list[str]:
    """``uris`` with the self-hosted (http/https) ones reordered by rendezvous hashing.

    Each http(s) source is weighted by blake3 of (``spread``, ``blob_hex``, its
    ``scheme://host:port``), highest first; other sources (``file://``, ``hf://``) keep their
    positions. :func:`spread_sources` uses this order for failover, after a blob's first choice.
    """
    http = [u for u in uris if _http_origin(u) is not None]
    if len(http) < 2:
        return list(uris)
    http.sort(key=lambda u: _weight(spread, blob_hex, str(_http_origin(u))), reverse=True)
    return _replace_http(uris, http)


def spread_sources(sources: Mapping[str, Sequence[str]], spread: str) -> dict[str, list[str]]:
    """Each blob's URIs (``sources``: blob hex -> URIs) in the order one frontend (``spread``)
    tries them, its first choices spread as evenly as possible over the replicas.

    The replicas (http/https ``scheme://host:port``) are ranked by blake3 of (``spread``,
    replica): this frontend's own preference. The blobs, in digest order, each take as first
    choice the replica of theirs that was picked least so far, ties going to the preferred one.
    With every blob on the same R replicas that is round-robin, so N blobs put ``N // R`` or
    ``N // R + 1`` first choices on each replica, and a fleet of frontends, each with its own
    preference, still spreads evenly. Each blob's other replicas follow in
    :func:`rank_sources` order (so a dead replica's blobs fail over to different survivors).
    Other sources (``file://``, ``hf://``) keep their positions; a blob with fewer than two
    replicas keeps its order.
    """
    picked: dict[str, int] = {}

    def load(uri: str) -> tuple[int, int]:
        origin = str(_http_origin(uri))
        return picked.get(origin, 0), -_weight(spread, origin)

    out: dict[str, list[str]] = {}
    for blob_hex in sorted(sources):
        ranked = rank_sources(sources[blob_hex], blob_hex, spread)
        http = [u for u in ranked if _http_origin(u) is not None]
        if len(http) < 2:
            out[blob_hex] = ranked
            continue
        first = min(http, key=load)
        origin = str(_http_origin(first))
        picked[origin] = picked.get(origin, 0) + 1
        out[blob_hex] = _replace_http(ranked, [first, *(u for u in http if u != first)])
    return out


@dataclass(slots=True)
class _Penalty:
    failures: int
    until: float
    probing: bool = False


class SourceHealth:
    """Which metadata sources (``host:port``) failed at the transport level lately, and when
    each may be tried again. Pure bookkeeping; time comes from ``clock``.

    A source that refused, did not connect, did not answer in time or stalled is *backing
    off* for ``initial`` seconds, doubling with each consecutive failure up to ``cap``.
    Requests that fail together (the files of one card, sent at once) count as one failure.
    When the time is up, one request may probe it (:meth:`claim`); others keep off until that
    one ends. Any answer, even a 404 or wrong bytes (the host is alive), clears it.
    """

    def __init__(
        self, *, initial: float = 2.0, cap: float = 60.0, clock: Clock = time.monotonic
    ) -> None:
        self._initial = initial
        self._cap = cap
        self._clock = clock
        self._penalties: dict[str, _Penalty] = {}

    def backing_off(self, source: str) -> str | None:
        """Why ``source`` must not be tried now (for messages), or None if it may."""
        p = self._penalties.get(source)
        if p is None:
            return None
        left = p.until - self._clock()
        failed = f"failed {p.failures} time(s) in a row"
        if left > 0:
            return f"{source} is backing off: {failed}, next try in {left:.1f}s"
        if p.probing:
            return f"{source} is backing off: {failed}, another request is trying it now"
        return None

    def claim(self, source: str) -> bool:
        """True if a request to ``source`` may go now; it then must :meth:`record` how it
        went (a request to a source whose time is up becomes its probe)."""
        if self.backing_off(source) is not None:
            return False
        p = self._penalties.get(source)
        if p is not None:
            p.probing = True
        return True

    def record(self, source: str, ok: bool | None) -> None:
        """How a claimed request went: ``True`` the source answered, ``False`` it failed at
        the transport level, ``None`` no verdict (cancelled, or failed before any request)."""
        p = self._penalties.get(source)
        if ok:
            self._penalties.pop(source, None)
            return
        if ok is None:
            if p is not None:
                p.probing = False
            return
        now = self._clock()
        if p is None:
            self._penalties[source] = _Penalty(1, now + self._initial)
        elif p.probing or p.until <= now:
            p.failures += 1
            p.until = now + min(self._cap, self._initial * 2 ** (p.failures - 1))
            p.probing = False

    def sources(self) -> dict[str, int]:
        """Every source backing off, with its consecutive failures."""
        return {s: p.failures for s, p in self._penalties.items()}

    def __bool__(self) -> bool:
        """True while some source is backing off."""
        return bool(self._penalties)


def hf_fallback_uri(card: ModelDeploymentCard, file: CheckedFile) -> str:
    """``hf://<source_path>/<filename>``, the legacy fallback for a file."""
    if not card.source_path:
        raise CardError(
            f"legacy card {card.display_name!r} has missing metadata files and no source_path "
            "to fall back to"
        )
    return f"hf://{card.source_path.strip('/')}/{link_name(file.path)}"


def size_cap(declared: int | None, where: str) -> int:
    """The byte cap for a file: its declared size, never above :data:`MAX_BLOB_SIZE`."""
    if declared is None:
        return MAX_BLOB_SIZE
    if declared > MAX_BLOB_SIZE:
        raise SizeLimitError(
            f"{where} declares {declared} bytes, above the {MAX_BLOB_SIZE}-byte ceiling"
        )
    return declared


@dataclass(frozen=True, slots=True)
class FilePlan:
    """One metadata file: which blob, how big at most, where from, where to link it."""

    slot: str
    filename: str
    checksum: Checksum
    size: int | None
    cap: int
    uris: tuple[str, ...]
    blob_path: Path
    link_path: Path

    @property
    def hex(self) -> str:
        return self.checksum.hex


@dataclass(frozen=True, slots=True)
class CardPlan:
    """Everything to fetch and link for one card."""

    layout: CacheLayout
    mdcsum: str
    link_dir: Path
    files: tuple[FilePlan, ...]


def plan_card(
    card: ModelDeploymentCard,
    layout: CacheLayout,
    *,
    alternates: Mapping[str, Sequence[str]] | None = None,
    hf_fallback: bool = False,
    spread: str | None = None,
) -> CardPlan:
    """Plan the cache work for ``card``.

    Each file's URIs are its own (or, with ``hf_fallback``, the legacy ``hf://`` one) followed
    by ``alternates[hex]``, without duplicates (files sharing a blob share all their URIs);
    with ``spread`` (a frontend's id) the http(s) ones are then ordered by
    :func:`spread_sources`. Raises :class:`CardError` for an unsafe slug or
    file name, or two different files under one name, and :class:`SizeLimitError` for a
    declared size above the ceiling.
    """
    card_sum = mdcsum(card)
    link_dir = layout.link_dir(card.slug, card_sum)
    by_name: dict[str, str] = {}
    # Blob hex -> every URI that names it (two slots may share a blob): one order per blob.
    sources: dict[str, dict[str, None]] = {}
    for _, f in card.files():
        name = link_name(f.path)
        if by_name.setdefault(name, f.checksum.hex) != f.checksum.hex:
            raise CardError(f"card {card.display_name!r} has two different files named {name!r}")
        first = hf_fallback_uri(card, f) if hf_fallback else source_uri(f.path)
        extra = [source_uri(u) for u in alternates.get(f.checksum.hex, ())] if alternates else []
        sources.setdefault(f.checksum.hex, {}).update(dict.fromkeys([first, *extra]))
    ordered: Mapping[str, Sequence[str]] = (
        {h: list(u) for h, u in sources.items()}
        if spread is None
        else spread_sources({h: list(u) for h, u in sources.items()}, spread)
    )
    files = tuple(
        FilePlan(
            slot=slot,
            filename=link_name(f.path),
            checksum=f.checksum,
            size=f.size,
            cap=size_cap(f.size, f"{slot} ({f.path})"),
            uris=tuple(ordered[f.checksum.hex]),
            blob_path=layout.blob(f.checksum.hex),
            link_path=link_dir / link_name(f.path),
        )
        for slot, f in card.files()
    )
    return CardPlan(layout=layout, mdcsum=card_sum, link_dir=link_dir, files=files)
