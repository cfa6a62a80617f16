"""The default prepare hook: every JSON file a frontend needs must parse.

Only the typed slots (config, tokenizer, tokenizer_config, chat template, generation_config)
are checked; ``extra_files`` are opaque to a frontend, so a stray extra ``results.json`` that
is not JSON never keeps a model from being listed. A worker refuses to publish a card whose
typed ``*.json`` slots do not parse (:func:`discovery_mdc.card.from_dir`), by the same rule.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import msgspec

from discovery_mdc.card import MAX_PARSED_JSON, ModelDeploymentCard, json_slot_files, load_json

__all__ = ["check_json_files"]

log = logging.getLogger("discovery_mdc.frontend")


def _plain_json(data: bytes) -> bool:
    """True if ``data`` is standard UTF-8 JSON, checked without building the objects:
    ``json.loads`` of a 1.8 MB tokenizer.json builds ~20 MB of them and holds the GIL ~8x
    longer (and 50 models' worth was most of a fleet frontend's peak memory, bench P3)."""
    try:
        data.decode("utf-8")
        msgspec.json.decode(data, type=msgspec.Raw)
    except (UnicodeDecodeError, msgspec.DecodeError, RecursionError):
        return False
    return True


def _check(card: ModelDeploymentCard) -> None:
    for slot, f in json_slot_files(card):
        path = Path(f.path)
        size = path.stat().st_size
        if size > MAX_PARSED_JSON:
            log.warning(
                "not parsing %s file %s: %d bytes is above %d", slot, path, size, MAX_PARSED_JSON
            )
            continue
        data = path.read_bytes()
        if not _plain_json(data):
            # The rule workers publish by decides the rest (NaN, a BOM, UTF-16, errors).
            load_json(data, f"{slot} file {f.path}")


async def check_json_files(card: ModelDeploymentCard, local_dir: Path | None) -> None:
    """Parse each ``*.json`` typed slot of the resolved card (in a thread: tokenizers are big)."""
    await asyncio.to_thread(_check, card)
