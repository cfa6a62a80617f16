"""The verify-and-cache pipeline and cache management.

Layers: ``_plan`` is pure (layout, what to fetch, where to link, name validation);
``_fetch`` streams one URI per scheme under a byte cap; ``_store`` owns staging, publishing,
verification, locks and links; ``_resolve`` runs the pipeline for a card; ``_manage`` scans,
verifies and prunes a cache.

Cache layout under the root (``cache_dir``, else ``DYN_MDC_CACHE_DIR``, else
``$HOME/.cache/dynamo/mdc``)::

    blobs/<blake3-hex>                        verified bytes
    by-slug/<slug>/<mdcsum>/<filename>        relative symlink to ../../../blobs/<hex>
    .locks/<blake3-hex>.lock                  per-blob flock
    tmp/<hex>.<pid>.<uuid>.part               staging files

An empty slug uses the directory ``_`` (:data:`EMPTY_SLUG_DIR`).
"""

from discovery_mdc.cache._fetch import FetchConfig, HfOfflineError, HfRef, parse_hf_uri
from discovery_mdc.cache._manage import (
    CachedBlob,
    CachedCard,
    CachedFile,
    CacheScan,
    CorruptBlob,
    PruneItem,
    PrunePlan,
    PruneResult,
    TempFile,
    VerifyReport,
    execute_prune,
    plan_prune,
    scan_cache,
    verify_cache,
)
from discovery_mdc.cache._plan import (
    EMPTY_SLUG_DIR,
    MAX_BLOB_SIZE,
    CacheLayout,
    CardPlan,
    FilePlan,
    default_cache_root,
    plan_card,
    resolve_cache_root,
)
from discovery_mdc.cache._resolve import (
    AllSourcesFailedError,
    CacheStats,
    ProgressCallback,
    ResolvedCard,
    cache_stats,
    resolve_metadata_files,
)

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
    "ProgressCallback",
    "PruneItem",
    "PrunePlan",
    "PruneResult",
    "ResolvedCard",
    "TempFile",
    "VerifyReport",
    "cache_stats",
    "default_cache_root",
    "execute_prune",
    "parse_hf_uri",
    "plan_card",
    "plan_prune",
    "resolve_cache_root",
    "resolve_metadata_files",
    "scan_cache",
    "verify_cache",
]
