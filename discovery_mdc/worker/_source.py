"""Where a worker's model comes from: a local directory, or an HF repo id in the local HF cache.

Nothing is downloaded here; an HF repo must already be in the cache (``hf download <repo>``).
Where that cache is, and which snapshot is served, comes from the one HF resolver,
:class:`discovery_mdc._hf.HfEnv`: the caller's, else huggingface_hub's variables.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from discovery_mdc._hf import HfEnv, hf_or_environment
from discovery_mdc.errors import ModelDirError

__all__ = ["ModelSource", "is_hf_repo_id", "resolve_model_source"]

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


def resolve_model_source(model: str, *, hf: HfEnv | None = None) -> ModelSource:
    """Resolve ``model`` (a local directory, else an HF repo id) to a directory to read.

    A local directory wins even when it also looks like a repo id. A repo id is looked up in
    the local HF cache only (``hf``'s; None: huggingface_hub's variables, read now); raises
    :class:`ModelDirError` when it is not there.
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
    return ModelSource(
        local_dir=hf_or_environment(hf).model_snapshot(model),
        hf_repo=model,
        display_name_default=model,
        source_path=model,
    )
