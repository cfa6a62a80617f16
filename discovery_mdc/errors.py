"""The discovery-mdc exception tree.

Every error the package raises on purpose derives from :class:`DiscoveryError` and also from
the standard-library type a caller would naturally catch::

    DiscoveryError (Exception)
    ├── ConfigError (ValueError)               a setting (flag or variable) that cannot be used
    ├── CardError (ValueError)                 bad card / envelope / checksum / slug
    │   └── CardDecodeError                    wire bytes that do not decode
    ├── ModelDirError (FileNotFoundError)      model dir missing or lacks config.json
    ├── ChecksumMismatchError (ValueError)     fetched bytes differ from the card
    ├── SizeLimitError (ValueError)            declared or received size over the cap
    ├── FetchError (OSError)                   a metadata URI could not be fetched
    │   ├── UnsupportedSchemeError (ValueError)
    │   ├── HfOfflineError (ConnectionError)   HF_HUB_OFFLINE and not in the HF cache
    │   ├── SourceUnreachableError (ConnectionError)  a source did not connect or answer
    │   └── AllSourcesFailedError              every alternate URI of a blob failed
    ├── CacheError (OSError)                   the local cache cannot be written or locked
    │   └── LockTimeoutError (TimeoutError)
    ├── EtcdError                              etcd answered with an error
    │   ├── EtcdConnectionError (ConnectionError)  no endpoint reachable
    │   ├── EtcdAuthError (PermissionError)        bad credentials / permission denied
    │   ├── EtcdTlsError (ConnectionError)         TLS handshake refused (certificates)
    │   ├── EtcdCompactedError                     watch start revision was compacted
    │   ├── KeyExistsError                         create-if-absent found the key
    │   └── LeaseLostError                         the lease expired or was revoked
    └── RegistryError (ValueError)             status-server registry conflicts
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "AllSourcesFailedError",
    "CacheError",
    "CardDecodeError",
    "CardError",
    "ChecksumMismatchError",
    "ConfigError",
    "DiscoveryError",
    "EtcdAuthError",
    "EtcdCompactedError",
    "EtcdConnectionError",
    "EtcdError",
    "EtcdTlsError",
    "FetchError",
    "HfOfflineError",
    "KeyExistsError",
    "LeaseLostError",
    "LockTimeoutError",
    "ModelDirError",
    "RegistryError",
    "SizeLimitError",
    "SourceUnreachableError",
    "UnsupportedSchemeError",
]


class DiscoveryError(Exception):
    """Root of every error discovery-mdc raises on purpose."""


class ConfigError(DiscoveryError, ValueError):
    """A setting (a flag or an environment variable) has a value that cannot be used; the
    message names the setting and the value."""


class CardError(DiscoveryError, ValueError):
    """A card, envelope, checksum or slug is invalid."""


class CardDecodeError(CardError):
    """Bytes from the wire do not decode into a card or envelope."""


class ModelDirError(DiscoveryError, FileNotFoundError):
    """A model directory is missing or lacks a required file."""


class ChecksumMismatchError(DiscoveryError, ValueError):
    """Fetched bytes do not match the checksum or size the card declares."""

    def __init__(self, uri: str, expected: str, actual: str) -> None:
        super().__init__(f"checksum mismatch for {uri}: expected {expected}, got {actual}")
        self.uri = uri
        self.expected = expected
        self.actual = actual


class SizeLimitError(DiscoveryError, ValueError):
    """A declared or received size exceeds the allowed cap."""


class FetchError(DiscoveryError, OSError):
    """A metadata URI could not be fetched."""


class UnsupportedSchemeError(FetchError, ValueError):
    """A URI uses a scheme the fetcher will not follow."""


class HfOfflineError(FetchError, ConnectionError):
    """``HF_HUB_OFFLINE`` is set and the file is not in the local HF cache."""


class SourceUnreachableError(FetchError, ConnectionError):
    """A metadata source (``host:port``) refused, did not connect, did not answer in time,
    stalled or dropped the connection, or is backing off after doing so: the host, not the
    file, is the problem."""


class AllSourcesFailedError(FetchError):
    """Every URI for a blob failed; ``errors`` holds ``(uri, exception)`` for each."""

    def __init__(self, hexdigest: str, errors: Sequence[tuple[str, Exception]]) -> None:
        detail = "; ".join(f"{uri}: {exc}" for uri, exc in errors)
        super().__init__(f"all {len(errors)} sources failed for blob {hexdigest}: {detail}")
        self.hex = hexdigest
        self.errors = tuple(errors)


class CacheError(DiscoveryError, OSError):
    """The local cache could not be written, read or locked."""


class LockTimeoutError(CacheError, TimeoutError):
    """A per-blob lock was not acquired before its timeout."""


class EtcdError(DiscoveryError):
    """etcd answered with an error."""


class EtcdConnectionError(EtcdError, ConnectionError):
    """No etcd endpoint could be reached."""


class EtcdAuthError(EtcdError, PermissionError):
    """etcd rejected the credentials or the operation."""


class EtcdTlsError(EtcdError, ConnectionError):
    """The TLS handshake with etcd failed on certificates (not trusted, refused, missing):
    retrying will not help until the configuration changes."""


class EtcdCompactedError(EtcdError):
    """A watch asked for history that etcd has compacted away."""

    def __init__(self, compact_revision: int, message: str | None = None) -> None:
        super().__init__(
            message or f"watch start revision was compacted (compact_revision={compact_revision})"
        )
        self.compact_revision = compact_revision


class KeyExistsError(EtcdError):
    """A create-if-absent found the key already present; it was not overwritten."""

    def __init__(self, key: str) -> None:
        super().__init__(f"etcd key {key!r} already exists; refusing to overwrite it")
        self.key = key


class LeaseLostError(EtcdError):
    """The lease expired or was revoked."""


class RegistryError(DiscoveryError, ValueError):
    """A status-server registration conflicts with an existing one."""
