"""The verify-and-cache pipeline and cache management.

:class:`MetadataCache` is one cache root and what resolving cards into it shares (one HTTP
session, the fetch limits, the counters, the verification memo, one fetch per blob at a time);
:func:`resolve_metadata_files` resolves one card with a cache of its own.

Layers: ``_plan`` is pure (layout, what to fetch, where to link, name validation);
``_fetch`` streams one URI per scheme under a byte cap; ``_store`` owns staging, publishing,
verification, locks, links and the last-use mark; ``_resolve`` holds :class:`MetadataCache`
and runs the pipeline for a card; ``_manage`` scans and verifies a cache and plans, then
executes, removals (prune, rm, fix).

Cache layout under the root (``cache_dir``, else ``$HOME/.cache/dynamo/mdc``; the CLI's
``--cache-dir`` defaults to ``DYN_MDC_CACHE_DIR``)::

    blobs/<blake3-hex>                        verified bytes
    by-slug/<slug>/<mdcsum>/<filename>        relative symlink to ../../../blobs/<hex>
    by-slug/<slug>/.tmp-card.<mdcsum>.<pid>.<uuid>/   a card being staged (renamed into place
                                              once complete, so <mdcsum>/ is never partial)
    .locks/<blake3-hex>.lock                  per-blob flock
    tmp/<hex>.<pid>.<uuid>.part               staging files

An empty slug uses the directory ``_`` (:data:`EMPTY_SLUG_DIR`). A card's last use is the
newest mtime of its links (not of the directory, which removing a link would move).
"""

from discovery_mdc.cache._fetch import FetchConfig, HfOfflineError, HfRef, parse_hf_uri
from discovery_mdc.cache._manage import (
    CachedBlob,
    CachedCard,
    CachedFile,
    CacheScan,
    CorruptBlob,
    IncompleteCard,
    PruneItem,
    PrunePlan,
    PruneResult,
    TempFile,
    VerifyReport,
    execute_plan,
    plan_fix,
    plan_prune,
    plan_removal,
    scan_cache,
    select_cards,
    verify_cache,
)
from discovery_mdc.cache._plan import (
    EMPTY_SLUG_DIR,
    MAX_BLOB_SIZE,
    CacheLayout,
    CardPlan,
    FilePlan,
    SourceHealth,
    default_cache_root,
    http_source,
    plan_card,
    resolve_cache_root,
)
from discovery_mdc.cache._resolve import (
    AllSourcesFailedError,
    CacheStats,
    MetadataCache,
    ProgressCallback,
    ResolvedCard,
    resolve_metadata_files,
)
from discovery_mdc.cache._store import refresh_last_used

__all__ = [
    "EMPTY_SLUG_DIR",
    "MAX_BLOB_SIZE",
    "AllSourcesFailedError",
    "CacheLayout",
    "CacheScan",
    "CacheStats",
    "CachedBlob",
    "CachedCard",
    "CachedFile",
    "CardPlan",
    "CorruptBlob",
    "FetchConfig",
    "FilePlan",
    "HfOfflineError",
    "HfRef",
    "IncompleteCard",
    "MetadataCache",
    "ProgressCallback",
    "PruneItem",
    "PrunePlan",
    "PruneResult",
    "ResolvedCard",
    "SourceHealth",
    "TempFile",
    "VerifyReport",
    "default_cache_root",
    "execute_plan",
    "http_source",
    "parse_hf_uri",
    "plan_card",
    "plan_fix",
    "plan_prune",
    "plan_removal",
    "refresh_last_used",
    "resolve_cache_root",
    "resolve_metadata_files",
    "scan_cache",
    "select_cards",
    "verify_cache",
]
