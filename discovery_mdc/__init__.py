"""discovery-mdc: LLM model deployment cards over etcd.

Layers, bottom up (each a subpackage with a curated ``__all__``):

- ``discovery_mdc.card``: the pure core (card, wire codec, slug, mdcsum, keys, ``from_dir``);
- ``discovery_mdc.etcd``: the v3 JSON-gateway client, lease session, etcd launcher;
- ``discovery_mdc.worker``: status server, self-hosting, the ``Worker`` publisher;
- ``discovery_mdc.cache``: the verify-and-cache pipeline and cache management;
- ``discovery_mdc.frontend``: the ``ModelWatcher`` and its HTTP API.

The names below are the friendly top level; everything else lives in the subpackages. They
are imported on first use, so ``import discovery_mdc`` (and the CLI's start) stays cheap; the
error classes of :mod:`discovery_mdc.errors` (every one of them, a module that imports
nothing) are there at once.
"""

from __future__ import annotations

import typing

from discovery_mdc import errors as _errors
from discovery_mdc._lazy import lazy_attributes as _lazy_attributes
from discovery_mdc.errors import *  # noqa: F403 - the error classes, eagerly (errors imports nothing)

if typing.TYPE_CHECKING:
    from discovery_mdc._hf import HfEnv
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
    "HfEnv": "discovery_mdc._hf",
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
    "EtcdClient": "discovery_mdc.etcd",
    "LeaseSession": "discovery_mdc.etcd",
    "ModelEvent": "discovery_mdc.frontend",
    "ModelInfo": "discovery_mdc.frontend",
    "ModelWatcher": "discovery_mdc.frontend",
    "PublishedModel": "discovery_mdc.worker",
    "Worker": "discovery_mdc.worker",
}

__all__ = [
    "CheckedFile",
    "Checksum",
    "EtcdClient",
    "HfEnv",
    "LeaseSession",
    "MetadataCache",
    "ModelDeploymentCard",
    "ModelEnvelope",
    "ModelEvent",
    "ModelInfo",
    "ModelWatcher",
    "PublishedModel",
    "ResolvedCard",
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
__all__ += _errors.__all__


__getattr__, __dir__ = _lazy_attributes(globals(), _LAZY)
