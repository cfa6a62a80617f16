"""Cache directories as a test sees them: make a card look unused, and take a snapshot of a
tree to prove nothing changed."""

from __future__ import annotations

import os
import time
from pathlib import Path

__all__ = ["backdate", "snapshot"]


def backdate(card_dir: Path, seconds_ago: float) -> float:
    """Make a cached card look last used ``seconds_ago`` (its links' own mtimes, and the
    dir's); the time it now shows."""
    when = time.time() - seconds_ago
    for link in card_dir.iterdir():
        os.utime(link, (when, when), follow_symlinks=False)
    os.utime(card_dir, (when, when))
    return when


def snapshot(root: Path) -> dict[str, str]:
    """Every path under ``root`` with its link target or content."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_symlink():
            out[str(p)] = "-> " + os.readlink(p)
        elif p.is_file():
            out[str(p)] = p.read_bytes().hex()
        else:
            out[str(p)] = "dir"
    return out
