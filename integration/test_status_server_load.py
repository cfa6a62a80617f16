"""Load: many concurrent downloads of a large self-hosted file all arrive whole."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import aiohttp
import blake3

from discovery_mdc._sample import write_sample_model
from discovery_mdc.card import from_dir
from discovery_mdc.worker._registry import MetadataRegistry
from discovery_mdc.worker._selfhost import move_to_self_host
from discovery_mdc.worker._server import StatusServer

CONCURRENCY = 200
SIZE = 10 * 1024 * 1024


async def _download(session: aiohttp.ClientSession, url: str) -> tuple[int, int, str]:
    hasher = blake3.blake3()
    received = 0
    async with session.get(url) as resp:
        async for chunk in resp.content.iter_chunked(1 << 16):
            hasher.update(chunk)
            received += len(chunk)
        return resp.status, received, hasher.hexdigest()


async def test_200_concurrent_downloads_of_a_10mb_file_are_all_whole(tmp_path: Path) -> None:
    model_dir = write_sample_model(tmp_path / "big-model")
    (model_dir / "tokenizer.json").unlink()  # a JSON tokenizer must parse; this one is opaque
    (model_dir / "tiktoken.model").write_bytes(os.urandom(SIZE))
    card = from_dir(model_dir)
    async with StatusServer("127.0.0.1", 0, registry=MetadataRegistry()) as server:
        prepared = move_to_self_host(
            card, server.base_url, namespace="dynamo", component="backend", endpoint="generate"
        )
        prepared.register(server.registry)
        hosted = prepared.card
        assert hosted.tokenizer is not None
        tokenizer = hosted.tokenizer.file
        assert tokenizer.size == SIZE
        connector = aiohttp.TCPConnector(limit=0, force_close=True)
        timeout = aiohttp.ClientTimeout(total=240)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            results = await asyncio.gather(
                *(_download(session, tokenizer.path) for _ in range(CONCURRENCY))
            )
    expected = (200, SIZE, tokenizer.checksum.hex)
    bad = [r for r in results if r != expected]
    assert not bad, f"{len(bad)} of {CONCURRENCY} downloads differ, e.g. {bad[0]}"
