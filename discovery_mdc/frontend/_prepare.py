"""The default prepare hook: every JSON metadata file must be well-formed UTF-8 JSON."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import msgspec

from discovery_mdc.card import ModelDeploymentCard
from discovery_mdc.errors import CardError

__all__ = ["check_json_files"]


# A file is read whole to be checked; metadata JSON is far smaller than this, and a bigger
# (verified, but hostile or odd) file is left to the host's loader.
MAX_PARSED_JSON = 64 << 20

log = logging.getLogger("discovery_mdc.frontend")


def _check(card: ModelDeploymentCard) -> None:
    for slot, f in card.files():
        if not f.basename.endswith(".json"):
            continue
        path = Path(f.path)
        size = path.stat().st_size
        if size > MAX_PARSED_JSON:
            log.warning(
                "not parsing %s file %s: %d bytes is above %d", slot, path, size, MAX_PARSED_JSON
            )
            continue
        data = path.read_bytes()
        try:
            data.decode("utf-8")
            # Validates the syntax without building the objects (a 1.8 MB tokenizer.json would
            # become ~20 MB of Python objects, and hold the GIL ~8x longer, through json.loads).
            msgspec.json.decode(data, type=msgspec.Raw)
        except (UnicodeDecodeError, msgspec.DecodeError) as exc:
            raise CardError(f"{slot} file {f.path} does not parse as JSON: {exc}") from None


async def check_json_files(card: ModelDeploymentCard, local_dir: Path | None) -> None:
    """Check each ``*.json`` slot of the resolved card parses (in a thread: tokenizers are big)."""
    await asyncio.to_thread(_check, card)
