"""The default prepare hook: every JSON metadata file must parse."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from discovery_mdc.card import ModelDeploymentCard
from discovery_mdc.errors import CardError

__all__ = ["check_json_files"]


def _check(card: ModelDeploymentCard) -> None:
    for slot, f in card.files():
        if not f.basename.endswith(".json"):
            continue
        try:
            json.loads(Path(f.path).read_bytes())
        except ValueError as exc:
            raise CardError(f"{slot} file {f.path} does not parse as JSON: {exc}") from None


async def check_json_files(card: ModelDeploymentCard, local_dir: Path | None) -> None:
    """Parse each ``*.json`` slot of the resolved card (in a thread: tokenizers are big)."""
    await asyncio.to_thread(_check, card)
