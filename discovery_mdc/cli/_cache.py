"""``discovery-mdc cache ls|verify|prune`` and ``discovery-mdc card fetch``."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import TextIO

from discovery_mdc.cache import (
    CacheLayout,
    PrunePlan,
    execute_prune,
    plan_prune,
    resolve_cache_root,
    resolve_metadata_files,
    scan_cache,
    verify_cache,
)
from discovery_mdc.cli._common import EXIT_FAILED, EXIT_OK, add_env_option, seconds

__all__ = ["add_fetch_parser", "register"]


def _layout(args: argparse.Namespace) -> CacheLayout:
    return CacheLayout(resolve_cache_root(args.cache_dir))


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


# --------------------------------------------------------------------------- card fetch


class _ProgressBar:
    """A one-line progress display on a TTY stderr."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._last = 0.0
        self._shown = False

    def __call__(self, filename: str, received: int, total: int | None) -> None:
        now = time.monotonic()
        done = total is not None and received >= total
        if not done and now - self._last < 0.1:
            return
        self._last = now
        pct = f" {100 * received // total:3d}%" if total else ""
        self._stream.write(f"\r\x1b[2K{filename}: {_human(received)}{pct}")
        self._stream.flush()
        self._shown = True

    def close(self) -> None:
        if self._shown:
            self._stream.write("\r\x1b[2K")
            self._stream.flush()


def _fetch(args: argparse.Namespace) -> int:
    from discovery_mdc.cli._card import load_card_file

    card = load_card_file(Path(args.path))
    bar = _ProgressBar(sys.stderr) if sys.stderr.isatty() else None
    try:
        resolved = asyncio.run(
            resolve_metadata_files(
                card,
                cache_dir=args.cache_dir,
                lock_timeout=args.lock_timeout,
                connect_timeout=args.connect_timeout,
                total_timeout=args.timeout,
                progress=bar,
            )
        )
    finally:
        if bar is not None:
            bar.close()
    if resolved.local_dir is not None:
        print(resolved.local_dir)
    else:
        for path in resolved.files:
            print(path)
    return EXIT_OK


def add_fetch_parser(card_sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``card fetch`` to the ``card`` subcommand."""
    fetch = card_sub.add_parser(
        "fetch",
        help="verify and cache a card's metadata files",
        description="Run the verify-and-cache pipeline for a card or envelope JSON file and "
        "print the local directory holding its metadata files. Exit 1 when a file cannot be "
        "fetched or verified, 2 for a bad card.",
    )
    fetch.add_argument("path", metavar="CARD.json", help="a card or envelope JSON file")
    add_env_option(fetch, "cache_dir")
    fetch.add_argument(
        "--lock-timeout",
        type=seconds(above=True),
        default=600.0,
        metavar="S",
        help="give up waiting for another process's fetch after S seconds (default %(default)s)",
    )
    fetch.add_argument(
        "--connect-timeout",
        type=seconds(above=True),
        default=10.0,
        metavar="S",
        help="HTTP connect timeout (default %(default)s)",
    )
    fetch.add_argument(
        "--timeout",
        type=seconds(above=True),
        default=300.0,
        metavar="S",
        help="total time allowed for one file from one URI (default %(default)s)",
    )
    fetch.set_defaults(func=_fetch)


# --------------------------------------------------------------------------- cache ls


def _ls(args: argparse.Namespace) -> int:
    scan = scan_cache(_layout(args))
    for warning in scan.warnings:
        sys.stderr.write(f"warning: {warning}\n")
    if not scan.cards:
        print(f"{scan.layout.root}: no cached cards")
        return EXIT_OK
    for card in sorted(scan.cards, key=lambda c: (c.slug, c.mdcsum)):
        print(
            f"{card.slug}  {card.mdcsum}  {len(card.files)} files  {_human(card.size)}  "
            f"last used {_when(card.last_used)}"
        )
        for f in card.files:
            size = "BROKEN" if f.broken else _human(f.size or 0)
            print(f"    {f.filename:<32} {size:>10}  {f.hex or '?'}")
    print(f"{len(scan.blobs)} blobs, {_human(scan.size_on_disk)} on disk under {scan.layout.root}")
    return EXIT_OK


# --------------------------------------------------------------------------- cache verify


def _verify(args: argparse.Namespace) -> int:
    report = verify_cache(_layout(args))
    for bad in report.corrupt:
        print(f"CORRUPT {bad.path}: content hashes to {bad.actual}")
    for link in report.broken_links:
        print(f"broken link {link}")
    print(f"checked {report.checked} blobs: {len(report.corrupt)} corrupt")
    return EXIT_OK if report.ok else EXIT_FAILED


# --------------------------------------------------------------------------- cache prune


def _print_plan(plan: PrunePlan) -> None:
    if plan.empty:
        print(f"{plan.layout.root}: nothing to prune")
        return
    for item in plan.items:
        size = f"  {_human(item.size)}" if item.size else ""
        print(f"{item.kind:<5} {item.path}{size}  ({item.reason})")
    print(f"{len(plan.items)} items, {_human(plan.expected_freed_bytes)} to free")


def _confirm() -> bool:
    try:
        answer = input("Delete these? [y/N] ")
    except EOFError:
        return False
    return answer.strip().lower() in ("y", "yes")


def _prune(args: argparse.Namespace) -> int:
    plan = plan_prune(scan_cache(_layout(args)))
    _print_plan(plan)
    if plan.empty or args.dry_run:
        return EXIT_OK
    if not args.yes:
        if not sys.stdin.isatty():
            print("not deleting: stdin is not a terminal; pass -y to delete")
            return EXIT_OK
        if not _confirm():
            return EXIT_OK
    result = execute_prune(plan)
    for item, reason in result.skipped:
        print(f"skipped {item.kind} {item.path}: {reason}")
    print(f"removed {len(result.removed)} items, freed {_human(result.freed_bytes)}")
    return EXIT_OK


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    cache = sub.add_parser(
        "cache",
        help="list, verify and prune the metadata cache",
        description="Manage the frontend's metadata cache (blobs/, by-slug/) under --cache-dir, "
        "else DYN_MDC_CACHE_DIR, else $HOME/.cache/dynamo/mdc. Cleanup is up to you, as with "
        "the HF cache.",
    )
    cache_sub = cache.add_subparsers(dest="cache_command", required=True, metavar="COMMAND")

    ls = cache_sub.add_parser(
        "ls",
        help="list cached cards and files",
        description="List cached cards (slug, mdcsum), their files, sizes and last use.",
    )
    ls.set_defaults(func=_ls)

    verify = cache_sub.add_parser(
        "verify",
        help="re-hash every blob",
        description="Re-hash every blob and report corrupt ones; exit 1 if any is corrupt.",
    )
    verify.set_defaults(func=_verify)

    prune = cache_sub.add_parser(
        "prune",
        help="delete broken links, unreferenced blobs and leftover temp files",
        description="Print the prune plan, then delete: broken links first, then leftover "
        "temp files, then blobs no link refers to, then empty directories. Without -y it "
        "asks on a terminal; when stdin is not a terminal it only prints the plan.",
    )
    prune.add_argument("--dry-run", action="store_true", help="print the plan, delete nothing")
    prune.add_argument("-y", "--yes", action="store_true", help="delete without asking")
    prune.set_defaults(func=_prune)

    for parser in (ls, verify, prune):
        add_env_option(parser, "cache_dir")
