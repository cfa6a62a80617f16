"""Model sources: local dirs and HF repo ids in a (generated) local HF cache."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import aiohttp
import blake3
import pytest

from discovery_mdc._hf import HfEnv
from discovery_mdc._sample import write_sample_model
from discovery_mdc.card import from_dir
from discovery_mdc.errors import ModelDirError
from discovery_mdc.worker._registry import MetadataRegistry
from discovery_mdc.worker._selfhost import build_worker_card, prepare_card
from discovery_mdc.worker._server import StatusServer
from discovery_mdc.worker._source import (
    is_hf_repo_id,
    resolve_model_source,
)

ENDPOINT = {"namespace": "dynamo", "component": "backend", "endpoint": "generate"}
REVISION = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def make_hf_cache(make_hf_repo: Callable[..., Path], tmp_path: Path) -> Callable[..., Path]:
    """``make_hf_cache(hub, repo, ref=True)``: a sample model cached as HF caches ``repo``."""

    def make(hub: Path, repo: str, *, ref: bool = True) -> Path:
        model = write_sample_model(tmp_path / "staging" / repo.replace("/", "_"))
        snapshot: Path = make_hf_repo(hub, repo, model, ref=ref)
        return snapshot

    return make


@pytest.fixture
def hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


def test_local_dir_resolves_to_itself(make_model_dir: Callable[..., Path]) -> None:
    model_dir = make_model_dir("My-Model")
    source = resolve_model_source(str(model_dir) + "/")
    assert source.local_dir == model_dir
    assert source.hf_repo is None
    assert source.display_name_default == "My-Model"
    assert source.source_path == str(model_dir) + "/"


def test_local_dir_wins_over_a_repo_id_of_the_same_name(
    make_model_dir: Callable[..., Path],
    hf_cache: Path,
    monkeypatch: pytest.MonkeyPatch,
    make_hf_cache: Callable[..., Path],
) -> None:
    model_dir = make_model_dir("Org/Name")
    make_hf_cache(hf_cache, "Org/Name")
    monkeypatch.chdir(model_dir.parent.parent)
    source = resolve_model_source("Org/Name")
    assert source.hf_repo is None and source.local_dir == Path("Org/Name")


def test_hf_repo_id_resolves_through_refs_main(
    hf_cache: Path, make_hf_cache: Callable[..., Path]
) -> None:
    snapshot = make_hf_cache(hf_cache, "Qwen/Qwen3-0.6B")
    source = resolve_model_source("Qwen/Qwen3-0.6B")
    assert source.local_dir == snapshot
    assert source.hf_repo == "Qwen/Qwen3-0.6B"
    assert source.display_name_default == "Qwen/Qwen3-0.6B"
    assert source.source_path == "Qwen/Qwen3-0.6B"


def test_given_hf_settings_win_over_the_environment(
    tmp_path: Path, hf_cache: Path, make_hf_cache: Callable[..., Path]
) -> None:
    make_hf_cache(hf_cache, "Org/Both")
    given = tmp_path / "given-hub"
    given.mkdir()
    snapshot = make_hf_cache(given, "Org/Both")
    hf = HfEnv.from_env({"HF_HUB_CACHE": str(given)})
    assert resolve_model_source("Org/Both", hf=hf).local_dir == snapshot


def test_hf_repo_without_refs_main_uses_its_only_snapshot(
    hf_cache: Path, make_hf_cache: Callable[..., Path]
) -> None:
    snapshot = make_hf_cache(hf_cache, "gpt2", ref=False)
    assert resolve_model_source("gpt2").local_dir == snapshot


def test_missing_repo_is_a_clear_error_without_network(hf_cache: Path) -> None:
    with pytest.raises(ModelDirError, match=r"not in the HF cache.*\(hf download Org/Absent\)"):
        resolve_model_source("Org/Absent")


def test_refs_main_naming_a_missing_snapshot_is_an_error(
    hf_cache: Path, make_hf_cache: Callable[..., Path]
) -> None:
    make_hf_cache(hf_cache, "Org/Broken")
    (hf_cache / "models--Org--Broken" / "refs" / "main").write_text("f" * 40)
    with pytest.raises(ModelDirError, match="broken"):
        resolve_model_source("Org/Broken")


@pytest.mark.parametrize("bad", ["./nope", "/abs/nope", "a/b/c", "Org/..", "Org--x/y", ""])
def test_neither_dir_nor_repo_id_is_an_error(bad: str, hf_cache: Path) -> None:
    with pytest.raises(ModelDirError):
        resolve_model_source(bad)


def test_repo_id_shape() -> None:
    assert all(is_hf_repo_id(r) for r in ("gpt2", "Qwen/Qwen3-0.6B", "a_b/c.d-e"))
    assert not any(is_hf_repo_id(r) for r in ("a/b/c", "-a/b", "a/b.", "a--b/c", "a/../b", ""))


async def test_hf_snapshot_symlinks_keep_real_names_in_urls_and_are_served(
    hf_cache: Path,
    make_hf_cache: Callable[..., Path],
) -> None:
    make_hf_cache(hf_cache, "Org/Snap")
    source = resolve_model_source("Org/Snap")
    card = from_dir(
        source.local_dir,
        display_name=source.display_name_default,
        source_path=source.source_path,
        include_extra_files=True,
    )
    async with StatusServer("127.0.0.1", 0, registry=MetadataRegistry()) as server:
        prepared = prepare_card(
            card, base_url=server.base_url, self_host=True, hf_repo=source.hf_repo, **ENDPOINT
        )
        prepared.register(server.registry)
        published = prepared.card
        names = sorted(f.path.rsplit("/", 1)[1] for _, f in published.files())
        assert names == [
            "config.json",
            "generation_config.json",
            "special_tokens_map.json",
            "tokenizer.json",
            "tokenizer_config.json",
        ]
        tokenizer = server.registry.lookup("org_snap/tokenizer.json")
        assert tokenizer is not None and tokenizer.path.parent.name == "blobs"
        async with aiohttp.ClientSession() as session:
            for _, f in published.files():
                assert f.path.startswith(f"http://127.0.0.1:{server.port}/v1/metadata/org_snap/")
                async with session.get(f.path) as resp:
                    assert resp.status == 200
                    body = await resp.read()
                assert (len(body), blake3.blake3(body).hexdigest()) == (f.size, f.checksum.hex)


def test_hf_repo_not_self_hosted_gets_hf_urls(
    hf_cache: Path, make_hf_cache: Callable[..., Path]
) -> None:
    make_hf_cache(hf_cache, "Org/Snap")
    card = build_worker_card("Org/Snap", base_url=None, self_host=False, **ENDPOINT).card
    assert card.display_name == "Org/Snap" and card.slug == "org_snap"
    assert card.source_path == "Org/Snap"
    assert card.extra_files == ()
    assert {f.path for _, f in card.files()} == {
        "hf://Org/Snap/config.json",
        "hf://Org/Snap/tokenizer.json",
        "hf://Org/Snap/tokenizer_config.json",
        "hf://Org/Snap/generation_config.json",
    }
