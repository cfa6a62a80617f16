"""Where a worker's model comes from: a local directory, or an HF repo id in the local HF cache.

Nothing is downloaded here; an HF repo must already be in the cache (``huggingface-cli
download <repo>``). The cache root follows huggingface_hub: ``HF_HUB_CACHE``, else the legacy
``HUGGINGFACE_HUB_CACHE``, else ``$HF_HOME/hub``, else ``$XDG_CACHE_HOME/huggingface/hub``,
else ``~/.cache/huggingface/hub``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from discovery_mdc.errors import ModelDirError

__all__ = ["ModelSource", "hf_hub_cache_dir", "is_hf_repo_id", "resolve_model_source"]

# huggingface_hub's validate_repo_id: an optional namespace, a name of [\w.-] (1-96 chars),
# neither starting nor ending with '-' or '.', and no '--' or '..' anywhere.
_REPO_ID: Final = re.compile(r"(?:\b[\w.-]+\b/)?\b[\w.-]{1,96}\b", re.ASCII)


@dataclass(frozen=True, slots=True)
class ModelSource:
    """A resolved model: the directory to read, and how to name and describe it."""

    local_dir: Path
    hf_repo: str | None
    display_name_default: str
    source_path: str


def is_hf_repo_id(text: str) -> bool:
    """True when ``text`` is shaped like ``name`` or ``namespace/name``."""
    return _REPO_ID.fullmatch(text) is not None and "--" not in text and ".." not in text


def hf_hub_cache_dir(env: Mapping[str, str] | None = None) -> Path:
    """The local HF hub cache root, as huggingface_hub computes it."""
    environ = os.environ if env is None else env
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if environ.get(name):
            return Path(environ[name]).expanduser()
    if environ.get("HF_HOME"):
        return Path(environ["HF_HOME"]).expanduser() / "hub"
    if environ.get("XDG_CACHE_HOME"):
        return Path(environ["XDG_CACHE_HOME"]).expanduser() / "huggingface" / "hub"
    return Path("~/.cache/huggingface/hub").expanduser()


def _snapshot(repo_dir: Path, repo: str) -> Path:
    snapshots = repo_dir / "snapshots"
    ref = repo_dir / "refs" / "main"
    if ref.is_file():
        revision = ref.read_text().strip()
        snapshot = snapshots / revision
        if revision and "/" not in revision and snapshot.is_dir():
            return snapshot
        raise ModelDirError(
            f"HF cache entry for {repo!r} at {repo_dir} is broken: refs/main names revision "
            f"{revision!r} but {snapshot} does not exist"
        )
    # Downloaded by commit hash only: no refs/main. One snapshot is unambiguous.
    candidates = sorted(p for p in snapshots.iterdir() if p.is_dir()) if snapshots.is_dir() else []
    if len(candidates) == 1:
        return candidates[0]
    raise ModelDirError(
        f"HF cache entry for {repo!r} at {repo_dir} has no refs/main and "
        f"{len(candidates)} snapshots; cannot tell which revision to serve"
    )


def resolve_model_source(model: str, *, env: Mapping[str, str] | None = None) -> ModelSource:
    """Resolve ``model`` (a local directory, else an HF repo id) to a directory to read.

    A local directory wins even when it also looks like a repo id. A repo id is looked up in
    the local HF cache only; raises :class:`ModelDirError` when it is not there.
    """
    if not model.strip():
        raise ModelDirError("no model given: pass a model directory or an HF repo id")
    given = Path(model).expanduser()
    if given.is_dir():
        return ModelSource(
            local_dir=given,
            hf_repo=None,
            display_name_default=given.resolve().name,
            source_path=model,
        )
    if not is_hf_repo_id(model):
        raise ModelDirError(
            f"model {model!r} is not a directory and not an HF repo id (namespace/name)"
        )
    cache = hf_hub_cache_dir(env)
    repo_dir = cache / ("models--" + model.replace("/", "--"))
    if not repo_dir.is_dir():
        raise ModelDirError(
            f"model {model!r} is not a local directory and is not in the HF cache at {cache}; "
            f"download it first (huggingface-cli download {model}) or pass a directory"
        )
    return ModelSource(
        local_dir=_snapshot(repo_dir, model),
        hf_repo=model,
        display_name_default=model,
        source_path=model,
    )
