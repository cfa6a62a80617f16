"""Fixtures that both ``tests/`` and ``integration/`` use (model dirs, HF cache repos, a cache
dir, a scripted metadata server, a status server, the root logger restored); the helpers they
build on are the test kit's (``testkit/``)."""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from discovery_mdc._sample import write_sample_model
from discovery_mdc.cache import CacheLayout
from discovery_mdc.card import hash_bytes
from discovery_mdc.worker import MetadataRegistry, StatusServer
from testkit import MetaServer

#: The commit every generated HF cache entry is stored under.
HF_COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def make_model_dir(tmp_path: Path) -> Callable[..., Path]:
    """Factory: ``make_model_dir(name="m", **write_sample_model_kwargs)`` -> a model dir."""

    def make(name: str = "sample-model", **kwargs: Any) -> Path:
        return write_sample_model(tmp_path / "models" / name, **kwargs)

    return make


@pytest.fixture
def make_hf_repo() -> Callable[..., Path]:
    """Factory: ``make_hf_repo(hub, repo, model_dir, revision="main", ref=True)`` lays out
    ``model_dir`` as huggingface_hub caches a repo (``refs/<revision>`` naming a commit,
    ``snapshots/<commit>/`` entries linking into ``blobs/``) and returns the snapshot dir."""

    def make(
        hub: Path, repo: str, model_dir: Path, revision: str = "main", *, ref: bool = True
    ) -> Path:
        repo_dir = hub / ("models--" + repo.replace("/", "--"))
        snapshot = repo_dir / "snapshots" / HF_COMMIT
        snapshot.mkdir(parents=True)
        (repo_dir / "blobs").mkdir(exist_ok=True)
        for f in sorted(model_dir.iterdir()):
            data = f.read_bytes()
            blob = repo_dir / "blobs" / hash_bytes(data).hex
            blob.write_bytes(data)
            (snapshot / f.name).symlink_to(os.path.relpath(blob, snapshot))
        if ref:
            (repo_dir / "refs").mkdir(exist_ok=True)
            (repo_dir / "refs" / revision).write_text(HF_COMMIT)
        return snapshot

    return make


@pytest.fixture
def cache(tmp_path: Path) -> CacheLayout:
    """An empty cache layout under ``tmp_path``."""
    return CacheLayout(tmp_path / "cache")


@pytest.fixture
async def meta_server() -> AsyncIterator[MetaServer]:
    """A :class:`testkit.MetaServer` on 127.0.0.1 for the test."""
    async with MetaServer() as server:
        yield server


@pytest.fixture
async def status_server() -> AsyncIterator[StatusServer]:
    """A running :class:`StatusServer` on 127.0.0.1 (random port) with an empty registry."""
    async with StatusServer("127.0.0.1", 0, registry=MetadataRegistry()) as server:
        yield server


@pytest.fixture
def restore_root_logger() -> Iterator[None]:
    """Put back the root logger's handlers and level, and the package loggers' levels, that a
    test (the CLI's ``main``) changes."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    levels = {n: logging.getLogger(n).level for n in ("discovery_mdc.cache", "discovery_mdc")}
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, lvl in levels.items():
        logging.getLogger(name).setLevel(lvl)
