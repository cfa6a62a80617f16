"""The one Hugging Face resolver both halves use: the HF environment and the local HF cache.

Every variable is read as huggingface_hub (``constants.py``, ``utils/_auth.py``) reads it, so a
worker, a frontend and ``hf download`` agree on where a repo lives and which token to send:

* ``HF_HOME``: ``$XDG_CACHE_HOME/huggingface`` (``XDG_CACHE_HOME`` defaults to ``~/.cache``),
  with ``~`` and ``$VARS`` expanded.
* ``HF_HUB_CACHE``, else the legacy ``HUGGINGFACE_HUB_CACHE``, else ``$HF_HOME/hub``
  (expanded the same way).
* The token: ``HF_TOKEN`` (else the legacy ``HUGGING_FACE_HUB_TOKEN``), else the file ``hf auth
  login`` writes, ``HF_TOKEN_PATH`` (default ``$HF_HOME/token``); stripped, empty means none.
  ``HF_HUB_DISABLE_IMPLICIT_TOKEN`` turns both off, as it does for huggingface_hub calls made
  without an explicit token.
* ``HF_ENDPOINT`` (default ``https://huggingface.co``, trailing ``/`` stripped).
* ``HF_HUB_OFFLINE`` (else ``TRANSFORMERS_OFFLINE``): ``1``, ``ON``, ``YES`` or ``TRUE`` in any
  case.

The cache layout is huggingface_hub's: ``models--<org>--<name>/refs/<revision>`` holds a commit
hash and ``snapshots/<commit>/<file>`` the files (links into ``blobs/``). Nothing here touches
the network; downloading is ``hf download <repo>``.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final
from urllib.parse import quote

from discovery_mdc._env import TRUTHY_WORDS
from discovery_mdc.errors import FetchError, ModelDirError

__all__ = ["DEFAULT_ENDPOINT", "HfEnv", "download_hint", "hf_or_environment"]

DEFAULT_ENDPOINT: Final = "https://huggingface.co"
# huggingface_hub's ENV_VARS_TRUE_VALUES: the same words, but matched upper-cased and not
# stripped (" 1" is false), as huggingface_hub matches them.
_TRUE_VALUES: Final = frozenset(word.upper() for word in TRUTHY_WORDS)
_COMMIT: Final = re.compile(r"[0-9a-f]{40}")
_VAR: Final = re.compile(r"\$(\w+|\{[^}]*\})", re.ASCII)
_REF_FILE_MAX: Final = 256


def download_hint(repo: str) -> str:
    """The command that puts ``repo`` into the local HF cache."""
    return f"hf download {repo}"


def hf_or_environment(hf: HfEnv | None) -> HfEnv:
    """``hf``, else huggingface_hub's variables read now.

    The one default that reads the environment outside a ``from_env``: every HF client honours
    ``HF_HOME``, ``HF_TOKEN`` and ``HF_HUB_OFFLINE``, and a library that ignored them would
    miss the local HF cache, send no token and go online where the user said offline.
    """
    return HfEnv.from_env() if hf is None else hf


def _is_true(value: str | None) -> bool:
    return value is not None and value.upper() in _TRUE_VALUES


def _expanduser(path: str, env: Mapping[str, str]) -> str:
    if not path.startswith("~"):
        return path
    head, sep, tail = path.partition("/")
    if head != "~":
        return os.path.expanduser(path)  # ~user: the password database, as posixpath does
    home = env.get("HOME")
    if home is None:
        return os.path.expanduser(path)
    return (home.rstrip("/") or "/") + (sep + tail if sep else "")


def _expandvars(path: str, env: Mapping[str, str]) -> str:
    """``os.path.expandvars`` against ``env``: unknown variables are left as they are."""

    def sub(match: re.Match[str]) -> str:
        name = match.group(1).strip("{}")
        return env.get(name, match.group(0))

    return _VAR.sub(sub, path) if "$" in path else path


def _expand(path: str, env: Mapping[str, str]) -> str:
    return _expandvars(_expanduser(path, env), env)


def _clean_token(token: str | None) -> str | None:
    if token is None:
        return None
    return token.replace("\r", "").replace("\n", "").strip() or None


def _read_small(path: Path) -> str | None:
    """A small regular file's text, read without following a FIFO; None when absent."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        return os.read(fd, _REF_FILE_MAX).decode("ascii", "replace").strip()
    except OSError:
        return None
    finally:
        os.close(fd)


@dataclass(frozen=True, slots=True)
class HfEnv:
    """The Hugging Face settings of one environment (``os.environ`` by default)."""

    home: Path
    hub_cache: Path
    token_path: Path
    endpoint: str
    offline: bool
    env_token: str | None
    implicit_token: bool

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> HfEnv:
        e = os.environ if env is None else env
        default_home = os.path.join(_expanduser("~", e), ".cache")
        home = _expand(e.get("HF_HOME", os.path.join(e.get("XDG_CACHE_HOME", default_home),
                                                      "huggingface")), e)  # fmt: skip
        legacy = e.get("HUGGINGFACE_HUB_CACHE", os.path.join(home, "hub"))
        return cls(
            home=Path(home),
            hub_cache=Path(_expand(e.get("HF_HUB_CACHE", legacy), e)),
            token_path=Path(_expand(e.get("HF_TOKEN_PATH", os.path.join(home, "token")), e)),
            endpoint=e.get("HF_ENDPOINT", DEFAULT_ENDPOINT).rstrip("/"),
            offline=_is_true(e.get("HF_HUB_OFFLINE") or e.get("TRANSFORMERS_OFFLINE")),
            env_token=_clean_token(e.get("HF_TOKEN") or e.get("HUGGING_FACE_HUB_TOKEN")),
            implicit_token=not _is_true(e.get("HF_HUB_DISABLE_IMPLICIT_TOKEN")),
        )

    # ------------------------------------------------------------------ auth

    def token(self) -> str | None:
        """The token to send: the environment's, else the token file's; None if neither.

        Raises :class:`FetchError` naming the file when it exists but cannot be read.
        """
        if not self.implicit_token:
            return None
        if self.env_token is not None:
            return self.env_token
        try:
            return _clean_token(self.token_path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise FetchError(f"cannot read the HF token file {self.token_path}: {reason}") from None

    def resolve_url(self, repo: str, revision: str, filename: str) -> str:
        """``<endpoint>/<repo>/resolve/<revision>/<filename>`` (revision and name quoted)."""
        if not self.endpoint:
            raise FetchError(f"cannot fetch {filename} of {repo}: HF_ENDPOINT is set but empty")
        rev, name = quote(revision, safe=""), quote(filename, safe="")
        return f"{self.endpoint}/{repo}/resolve/{rev}/{name}"

    # ------------------------------------------------------------------ local cache

    def repo_dir(self, repo: str) -> Path:
        """``<hub cache>/models--<org>--<name>``."""
        return self.hub_cache / ("models--" + repo.replace("/", "--"))

    def snapshot(self, repo: str, revision: str = "main") -> Path | None:
        """``snapshots/<commit>`` of ``revision`` (a commit hash or a name under ``refs/``),
        or None when the cache does not have it."""
        repo_dir = self.repo_dir(repo)
        commit = revision
        if not _COMMIT.fullmatch(commit):
            resolved = _read_small(repo_dir / "refs" / revision)
            if resolved is None or not _COMMIT.fullmatch(resolved):
                return None
            commit = resolved
        snapshot = repo_dir / "snapshots" / commit
        return snapshot if snapshot.is_dir() else None

    def local_file(self, repo: str, revision: str, filename: str) -> Path | None:
        """The file in the local HF cache, or None."""
        snapshot = self.snapshot(repo, revision)
        if snapshot is None:
            return None
        candidate = snapshot / filename
        return candidate if candidate.is_file() else None

    def model_snapshot(self, repo: str) -> Path:
        """The snapshot a worker serves for ``repo``: ``refs/main``, else the only snapshot.

        Raises :class:`ModelDirError` (with the ``hf download`` command) when the repo is not
        in the cache or its entry is ambiguous or broken.
        """
        repo_dir = self.repo_dir(repo)
        if not repo_dir.is_dir():
            raise ModelDirError(
                f"model {repo!r} is not a local directory and is not in the HF cache at "
                f"{self.hub_cache}; download it first ({download_hint(repo)}) or pass a "
                "directory"
            )
        snapshots = repo_dir / "snapshots"
        ref = repo_dir / "refs" / "main"
        if ref.is_file():
            revision = _read_small(ref) or ""
            snapshot = snapshots / revision
            if revision and "/" not in revision and snapshot.is_dir():
                return snapshot
            raise ModelDirError(
                f"HF cache entry for {repo!r} at {repo_dir} is broken: refs/main names revision "
                f"{revision!r} but {snapshot} does not exist; run {download_hint(repo)} again"
            )
        # Downloaded by commit hash only: no refs/main. One snapshot is unambiguous.
        candidates = (
            sorted(p for p in snapshots.iterdir() if p.is_dir()) if snapshots.is_dir() else []
        )
        if len(candidates) == 1:
            return candidates[0]
        raise ModelDirError(
            f"HF cache entry for {repo!r} at {repo_dir} has no refs/main and "
            f"{len(candidates)} snapshots; cannot tell which revision to serve"
        )
