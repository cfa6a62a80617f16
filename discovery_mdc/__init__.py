"""discovery-mdc: LLM model deployment cards over etcd.

Layers, bottom up (each a subpackage with a curated ``__all__``):

- ``discovery_mdc.card``: the pure core (card, wire codec, slug, mdcsum, keys, ``from_dir``);
- ``discovery_mdc.etcd``: the v3 JSON-gateway client, lease session, etcd launcher;
- ``discovery_mdc.worker``: status server, self-hosting, the ``Worker`` publisher;
- ``discovery_mdc.cache``: the verify-and-cache pipeline and cache management;
- ``discovery_mdc.frontend``: the ``ModelWatcher`` and its HTTP API.

The names below are the friendly top level; everything else lives in the subpackages. They
are imported on first use, so ``import discovery_mdc`` (and the CLI's start) stays cheap.
"""

from __future__ import annotations

import typing

from discovery_mdc._lazy import lazy_attributes as _lazy_attributes

if typing.TYPE_CHECKING:
    from discovery_mdc.cache import (
        MetadataCache,
        ResolvedCard,
        resolve_metadata_files,
    )
    from discovery_mdc.card import (
        CheckedFile,
        Checksum,
        ModelDeploymentCard,
        ModelEnvelope,
        decode_card,
        decode_envelope,
        encode_card,
        encode_envelope,
        from_dir,
        is_new_format,
        mdcsum,
        slugify,
    )
    from discovery_mdc.errors import (
        AllSourcesFailedError,
        CacheError,
        CardDecodeError,
        CardError,
        ChecksumMismatchError,
        ConfigError,
        DiscoveryError,
        EtcdAuthError,
        EtcdCompactedError,
        EtcdConnectionError,
        EtcdError,
        EtcdTlsError,
        FetchError,
        HfOfflineError,
        KeyExistsError,
        LeaseLostError,
        LockTimeoutError,
        ModelDirError,
        RegistryError,
        SizeLimitError,
        SourceUnreachableError,
        UnsupportedSchemeError,
    )
    from discovery_mdc.etcd import (
        EtcdClient,
        LeaseSession,
    )
    from discovery_mdc.frontend import (
        ModelEvent,
        ModelInfo,
        ModelWatcher,
    )
    from discovery_mdc.worker import (
        PublishedModel,
        Worker,
    )

__version__ = "0.1.0"

# name -> the subpackage that defines it
_LAZY: dict[str, str] = {
    "MetadataCache": "discovery_mdc.cache",
    "ResolvedCard": "discovery_mdc.cache",
    "resolve_metadata_files": "discovery_mdc.cache",
    "CheckedFile": "discovery_mdc.card",
    "Checksum": "discovery_mdc.card",
    "ModelDeploymentCard": "discovery_mdc.card",
    "ModelEnvelope": "discovery_mdc.card",
    "decode_card": "discovery_mdc.card",
    "decode_envelope": "discovery_mdc.card",
    "encode_card": "discovery_mdc.card",
    "encode_envelope": "discovery_mdc.card",
    "from_dir": "discovery_mdc.card",
    "is_new_format": "discovery_mdc.card",
    "mdcsum": "discovery_mdc.card",
    "slugify": "discovery_mdc.card",
    "AllSourcesFailedError": "discovery_mdc.errors",
    "CacheError": "discovery_mdc.errors",
    "CardDecodeError": "discovery_mdc.errors",
    "CardError": "discovery_mdc.errors",
    "ChecksumMismatchError": "discovery_mdc.errors",
    "ConfigError": "discovery_mdc.errors",
    "DiscoveryError": "discovery_mdc.errors",
    "EtcdAuthError": "discovery_mdc.errors",
    "EtcdCompactedError": "discovery_mdc.errors",
    "EtcdConnectionError": "discovery_mdc.errors",
    "EtcdError": "discovery_mdc.errors",
    "EtcdTlsError": "discovery_mdc.errors",
    "FetchError": "discovery_mdc.errors",
    "HfOfflineError": "discovery_mdc.errors",
    "KeyExistsError": "discovery_mdc.errors",
    "LeaseLostError": "discovery_mdc.errors",
    "LockTimeoutError": "discovery_mdc.errors",
    "ModelDirError": "discovery_mdc.errors",
    "RegistryError": "discovery_mdc.errors",
    "SizeLimitError": "discovery_mdc.errors",
    "SourceUnreachableError": "discovery_mdc.errors",
    "UnsupportedSchemeError": "discovery_mdc.errors",
    "EtcdClient": "discovery_mdc.etcd",
    "LeaseSession": "discovery_mdc.etcd",
    "ModelEvent": "discovery_mdc.frontend",
    "ModelInfo": "discovery_mdc.frontend",
    "ModelWatcher": "discovery_mdc.frontend",
    "PublishedModel": "discovery_mdc.worker",
    "Worker": "discovery_mdc.worker",
}

__all__ = [
    "AllSourcesFailedError",
    "CacheError",
    "CardDecodeError",
    "CardError",
    "CheckedFile",
    "Checksum",
    "ChecksumMismatchError",
    "ConfigError",
    "DiscoveryError",
    "EtcdAuthError",
    "EtcdClient",
    "EtcdCompactedError",
    "EtcdConnectionError",
    "EtcdError",
    "EtcdTlsError",
    "FetchError",
    "HfOfflineError",
    "KeyExistsError",
    "LeaseLostError",
    "LeaseSession",
    "LockTimeoutError",
    "MetadataCache",
    "ModelDeploymentCard",
    "ModelDirError",
    "ModelEnvelope",
    "ModelEvent",
    "ModelInfo",
    "ModelWatcher",
    "PublishedModel",
    "RegistryError",
    "ResolvedCard",
    "SizeLimitError",
    "SourceUnreachableError",
    "UnsupportedSchemeError",
    "Worker",
    "__version__",
    "decode_card",
    "decode_envelope",
    "encode_card",
    "encode_envelope",
    "from_dir",
    "is_new_format",
    "mdcsum",
    "resolve_metadata_files",
    "slugify",
]


__getattr__, __dir__ = _lazy_attributes(globals(), _LAZY)
