"""discovery-mdc: LLM model deployment cards over etcd.

Layers, bottom up (each a subpackage with a curated ``__all__``):

- ``discovery_mdc.card``: the pure core (card, wire codec, slug, mdcsum, keys, ``from_dir``);
- ``discovery_mdc.etcd``: the v3 JSON-gateway client, lease session, etcd launcher;
- ``discovery_mdc.worker``: status server, self-hosting, the ``Worker`` publisher;
- ``discovery_mdc.cache``: the verify-and-cache pipeline and cache management;
- ``discovery_mdc.frontend``: the ``ModelWatcher`` and its HTTP API.

The names below are the friendly top level; everything else lives in the subpackages.
"""

from discovery_mdc.cache import ResolvedCard, resolve_metadata_files
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
    DiscoveryError,
    EtcdAuthError,
    EtcdCompactedError,
    EtcdConnectionError,
    EtcdError,
    FetchError,
    HfOfflineError,
    KeyExistsError,
    LeaseLostError,
    LockTimeoutError,
    ModelDirError,
    RegistryError,
    SizeLimitError,
    UnsupportedSchemeError,
)
from discovery_mdc.etcd import EtcdClient, LeaseSession
from discovery_mdc.frontend import ModelEvent, ModelInfo, ModelWatcher
from discovery_mdc.worker import PublishedModel, Worker

__version__ = "0.1.0"

__all__ = [
    "AllSourcesFailedError",
    "CacheError",
    "CardDecodeError",
    "CardError",
    "CheckedFile",
    "Checksum",
    "ChecksumMismatchError",
    "DiscoveryError",
    "EtcdAuthError",
    "EtcdClient",
    "EtcdCompactedError",
    "EtcdConnectionError",
    "EtcdError",
    "FetchError",
    "HfOfflineError",
    "KeyExistsError",
    "LeaseLostError",
    "LeaseSession",
    "LockTimeoutError",
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
