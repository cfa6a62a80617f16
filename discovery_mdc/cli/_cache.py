"""``discovery-mdc cache ls|verify|prune|rm`` and ``discovery-mdc card fetch``.

Every destructive command prints its plan first and executes it only with ``-y`` or after a
``y`` on a terminal; without either it deletes nothing and exits 1 (so a cron job notices).
``--json`` output is one JSON document on stdout; its field names are documented in
docs/operations.md and kept stable.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import re
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from discovery_mdc._hf import HfEnv
from discovery_mdc.cache import (
    CachedCard,
    CacheLayout,
    PruneItem,
    PrunePlan,
    PruneResult,
    ResolvedCard,
    execute_plan,
    plan_fix,
    plan_prune,
    plan_removal,
    resolve_cache_root,
    resolve_metadata_files,
    scan_cache,
    select_cards,
    verify_cache,
)
from discovery_mdc.cli._common import (
    EXIT_FAILED,
    EXIT_OK,
    Subcommands,
    UsageError,
    add_env_option,
    examples,
    load_card_file,
    seconds,
)
from discovery_mdc.cli._logging import final_line

__all__ = ["add_fetch_parser", "register"]

_AGE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


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


def _iso(ts: float) -> str:
    """UTC ISO 8601 with a ``Z``, to the second."""
    when = datetime.datetime.fromtimestamp(ts, datetime.UTC)
    return when.isoformat(timespec="seconds").replace("+00:00", "Z")


def _emit(doc: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(doc, indent=2) + "\n")


def _add_json(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--json",
        action="store_true",
        help=f"print {what} as one JSON document (fields in docs/operations.md)",
    )


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


def _fetched_json(resolved: ResolvedCard) -> dict[str, Any]:
    card = resolved.card
    return {
        "model": card.display_name,
        "slug": card.slug,
        "mdcsum": resolved.mdcsum,
        "local_dir": None if resolved.local_dir is None else str(resolved.local_dir),
        "in_place": resolved.in_place,
        "files": [
            {
                "slot": slot,
                "name": Path(f.path).name,
                "path": f.path,
                "blake3": f.checksum.hex,
                "size": f.size,
            }
            for slot, f in card.files()
        ],
    }


def _fetch(args: argparse.Namespace) -> int:
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
                hf=HfEnv.from_env(),
            )
        )
    finally:
        if bar is not None:
            bar.close()
    if args.json:
        _emit(_fetched_json(resolved))
    elif resolved.local_dir is not None:
        print(resolved.local_dir)
    else:
        for path in resolved.files:
            print(path)
    return EXIT_OK


def add_fetch_parser(card_sub: Subcommands) -> None:
    """Add ``card fetch`` to the ``card`` subcommand."""
    fetch = card_sub.add_parser(
        "fetch",
        help="verify and cache a card's metadata files",
        description="Run the verify-and-cache pipeline for a card or envelope JSON file and "
        "print the local directory holding its metadata files. Exit 1 when a file cannot be "
        "fetched or verified, 2 for a bad card.",
        epilog=examples(
            ("discovery-mdc card fetch card.json", "cache it; print by-slug/<slug>/<mdcsum>"),
            (
                "etcdctl get --print-value-only v1/mdc/dynamo/backend/generate/694d... > env.json"
                " && discovery-mdc card fetch env.json --json",
                "fetch what a worker published; print the files as JSON",
            ),
        ),
    )
    fetch.add_argument("path", metavar="CARD.json", help="a card or envelope JSON file")
    add_env_option(fetch, "cache_dir")
    for flag, default, what in (
        ("--lock-timeout", 600.0, "give up waiting for another process's fetch after S seconds"),
        ("--connect-timeout", 10.0, "HTTP connect timeout"),
        ("--timeout", 300.0, "total time allowed for one file from one URI"),
    ):
        fetch.add_argument(
            flag,
            type=seconds(above=True),
            default=default,
            metavar="S",
            help=f"{what} (default %(default)s)",
        )
    _add_json(fetch, "the cached card (local dir, mdcsum, files)")
    fetch.set_defaults(func=_fetch)


# --------------------------------------------------------------------------- cache ls


def _card_json(card: CachedCard) -> dict[str, Any]:
    return {
        "id": card.id,
        "model": card.slug,
        "mdcsum": card.mdcsum,
        "path": str(card.path),
        "size": card.size,
        "last_used": _iso(card.last_used),
        "last_used_unix": card.last_used,
        "broken": bool(card.broken),
        "files": [
            {"name": f.filename, "size": f.size, "blake3": f.hex, "broken": f.broken}
            for f in card.files
        ],
    }


def _ls(args: argparse.Namespace) -> int:
    scan = scan_cache(_layout(args))
    for warning in scan.warnings:
        sys.stderr.write(f"warning: {warning}\n")
    cards = sorted(scan.cards, key=lambda c: (c.slug, -c.last_used, c.mdcsum))
    if args.json:
        _emit(
            {
                "cache_dir": str(scan.layout.root),
                "cards": [_card_json(c) for c in cards],
                "incomplete": [
                    {
                        "path": str(i.path),
                        "model": i.slug,
                        "mdcsum": i.mdcsum,
                        "owner_pid": i.owner_pid,
                        "owner_alive": i.owner_alive,
                    }
                    for i in scan.incomplete
                ],
                "blobs": len(scan.blobs),
                "size_on_disk": scan.size_on_disk,
                "warnings": list(scan.warnings),
            }
        )
        return EXIT_OK
    if args.quiet:
        for card in cards:
            print(card.id)
        return EXIT_OK
    if not cards:
        print(f"{scan.layout.root}: no cached cards")
        if not scan.incomplete:
            return EXIT_OK
    else:
        rows = [("ID", "FILES", "SIZE", "LAST USED")] + [
            (
                c.id,
                f"{len(c.files)}" + (f" ({len(c.broken)} broken)" if c.broken else ""),
                _human(c.size),
                _when(c.last_used),
            )
            for c in cards
        ]
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        print(_row(rows[0], widths))
        for card, row in zip(cards, rows[1:], strict=True):
            print(_row(row, widths))
            for f in card.files:
                size = "BROKEN" if f.broken else _human(f.size or 0)
                print(f"    {f.filename:<32} {size:>10}  {f.hex or '?'}")
    for inc in scan.incomplete:
        owner = "running" if inc.owner_alive else "gone"
        print(f"incomplete: {inc.path} (pid {inc.owner_pid}, {owner}); not a usable card")
    print(
        f"{len(cards)} cards, {len(scan.blobs)} blobs, {_human(scan.size_on_disk)} on disk "
        f"under {scan.layout.root}"
    )
    return EXIT_OK


def _row(cells: tuple[str, ...], widths: list[int]) -> str:
    head = "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=False))
    return f"{head}  {cells[-1]}"


# --------------------------------------------------------------------------- plans


def _item_json(item: PruneItem) -> dict[str, Any]:
    return {
        "kind": item.kind,
        "path": str(item.path),
        "size": item.size,
        "reason": item.reason,
        "model": item.slug,
        "mdcsum": item.mdcsum,
        "blake3": item.hex,
    }


def _plan_json(plan: PrunePlan, result: PruneResult | None) -> dict[str, Any]:
    return {
        "items": [_item_json(i) for i in plan.items],
        "bytes_to_free": plan.expected_freed_bytes,
        "result": None
        if result is None
        else {
            "removed": [_item_json(i) for i in result.removed],
            "skipped": [{**_item_json(i), "why": why} for i, why in result.skipped],
            "failed": [{**_item_json(i), "why": why} for i, why in result.failed],
            "freed_bytes": result.freed_bytes,
        },
    }


def _print_plan(plan: PrunePlan) -> None:
    if plan.empty:
        print(f"{plan.layout.root}: nothing to delete")
        return
    for item in plan.items:
        size = f"  {_human(item.size)}" if item.size else ""
        print(f"{item.kind:<10} {item.path}{size}  ({item.reason})")
    print(f"{len(plan.items)} items, {_human(plan.expected_freed_bytes)} to free")


def _print_result(result: PruneResult) -> None:
    for item, why in result.skipped:
        print(f"skipped {item.kind} {item.path}: {why}")
    for item, why in result.failed:
        print(f"FAILED {item.kind} {item.path}: {why}")
    print(f"removed {len(result.removed)} items, freed {_human(result.freed_bytes)}")


def _confirm() -> bool:
    # The prompt goes to stderr, so stdout stays the plan (or the JSON document).
    sys.stderr.write("Delete these? [y/N] ")
    sys.stderr.flush()
    answer = sys.stdin.readline()
    return answer.strip().lower() in ("y", "yes")


def _execute_confirmed(args: argparse.Namespace, plan: PrunePlan) -> PruneResult | None:
    """Print the plan (unless --json); execute it with -y or a terminal's yes. None when it
    was not executed: empty, --dry-run, or no yes (then the final line says so)."""
    if not args.json:
        _print_plan(plan)
    if plan.empty or args.dry_run:
        return None
    if not args.yes:
        refused = None
        if not sys.stdin.isatty():
            refused = "stdin is not a terminal; pass -y to delete (or --dry-run)"
        elif not _confirm():
            refused = "not confirmed"
        if refused is not None:
            final_line(f"nothing deleted: {refused}", EXIT_FAILED, prefix="")
            return None
    result = execute_plan(plan)
    if not args.json:
        _print_result(result)
    return result


def _carry_out(args: argparse.Namespace, plan: PrunePlan, extra: dict[str, Any]) -> int:
    """Print the plan; execute it with -y or a terminal's yes. Exit 1 when nothing was
    deleted for want of a yes, or when an item could not be deleted."""
    result = _execute_confirmed(args, plan)
    if args.json:
        doc = {"cache_dir": str(plan.layout.root), "dry_run": args.dry_run, **extra}
        _emit({**doc, **_plan_json(plan, result)})
    if result is None:
        return EXIT_OK if plan.empty or args.dry_run else EXIT_FAILED
    return EXIT_FAILED if result.failed else EXIT_OK


def _add_confirm_options(parser: argparse.ArgumentParser, when: str = "") -> None:
    parser.add_argument(
        "--dry-run", action="store_true", help=f"print the plan, delete nothing{when}"
    )
    parser.add_argument(
        "-y",
        "--yes",
        action="store_true",
        help="delete without asking (without -y: ask on a terminal, else delete nothing and "
        f"exit 1){when}",
    )


def _add_plan_options(parser: argparse.ArgumentParser) -> None:
    _add_confirm_options(parser)
    _add_json(parser, "the plan and what was deleted")


# --------------------------------------------------------------------------- cache verify


def _verify(args: argparse.Namespace) -> int:
    if (args.yes or args.dry_run) and not args.fix:
        raise UsageError(f"{'-y' if args.yes else '--dry-run'} only applies to --fix")
    layout = _layout(args)
    scan = scan_cache(layout)
    report = verify_cache(layout, scan)
    doc: dict[str, Any] = {
        "cache_dir": str(layout.root),
        "checked": report.checked,
        "ok": report.ok,
        "corrupt": [
            {"blake3": c.hex, "path": str(c.path), "actual": c.actual} for c in report.corrupt
        ],
        "broken_links": [str(p) for p in report.broken_links],
        "fix": None,
    }
    if not args.json:
        for bad in report.corrupt:
            print(f"CORRUPT {bad.path}: content hashes to {bad.actual}")
        for link in report.broken_links:
            print(f"broken link {link}")
        print(f"checked {report.checked} blobs: {len(report.corrupt)} corrupt")
    code = EXIT_OK if report.ok else EXIT_FAILED
    if args.fix and not report.ok:
        plan = plan_fix(scan, report)
        result = _execute_confirmed(args, plan)
        doc["fix"] = {"dry_run": args.dry_run, **_plan_json(plan, result)}
        if result is not None:
            removed = {i.hex for i in result.removed}
            left = {i.hex for i in plan.blobs if i.corrupt} - removed
            code = EXIT_FAILED if left or result.failed else EXIT_OK
    if args.json:
        _emit(doc)
    return code


# --------------------------------------------------------------------------- cache prune


def _age(text: str) -> float:
    """``30d``, ``12h``, ``90m``, ``3600s`` or ``2w`` in seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an age: a number and a unit (s, m, h, d, w), e.g. 30d"
        )
    return float(m[1]) * _AGE_UNITS[m[2]]


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is below 1 (to remove a model: cache rm)")
    return value


def _prune(args: argparse.Namespace) -> int:
    plan = plan_prune(scan_cache(_layout(args)), older_than=args.older_than, keep=args.keep)
    extra = {"older_than_seconds": args.older_than, "keep": args.keep}
    return _carry_out(args, plan, extra)


# --------------------------------------------------------------------------- cache rm


def _rm(args: argparse.Namespace) -> int:
    scan = scan_cache(_layout(args))
    chosen: dict[Path, CachedCard] = {}
    missing = []
    for spec in args.models:
        found = select_cards(scan, spec)  # ConfigError (exit 2): a short or ambiguous prefix
        if not found:
            missing.append(spec)
        chosen.update((c.path, c) for c in found)
    if missing:
        raise UsageError(
            f"nothing in {scan.layout.root} matches {', '.join(map(repr, missing))} "
            "(see `discovery-mdc cache ls -q`); nothing deleted"
        )
    return _carry_out(args, plan_removal(scan, chosen.values()), {"models": args.models})


# --------------------------------------------------------------------------- parser


def register(sub: Subcommands) -> None:
    cache = sub.add_parser(
        "cache",
        help="list, verify, prune and remove from the metadata cache",
        description="Manage the frontend's metadata cache (blobs/, by-slug/) under --cache-dir, "
        "else DYN_MDC_CACHE_DIR, else $HOME/.cache/dynamo/mdc. Cleanup is up to you, as with "
        "the HF cache. Every command is safe while frontends use the same cache.",
        epilog=examples(
            ("discovery-mdc cache ls", "what is cached, with sizes and last use"),
            ("discovery-mdc cache prune --older-than 30d -y", "evict what nobody used for 30 days"),
            ("discovery-mdc cache verify --fix -y", "re-hash every blob; remove corrupt ones"),
        ),
    )
    cache_sub = cache.add_subparsers(dest="cache_command", required=True, metavar="COMMAND")
    for add in (_add_ls, _add_verify, _add_prune, _add_rm):
        add_env_option(add(cache_sub), "cache_dir")


def _add_ls(cache_sub: Subcommands) -> argparse.ArgumentParser:
    ls = cache_sub.add_parser(
        "ls",
        help="list cached cards and files",
        description="List cached cards (ID = <model slug>/<mdcsum>), their files, sizes and "
        "last use (the last time a frontend resolved or served the card), then cards still "
        "being staged.",
        epilog=examples(
            ("discovery-mdc cache ls", "a table like `hf cache ls`, files under each card"),
            ("discovery-mdc cache ls -q", "only the IDs, one per line (for cache rm)"),
            ("discovery-mdc cache ls --json | jq '.cards[].id'", "the same from JSON"),
        ),
    )
    shape = ls.add_mutually_exclusive_group()
    shape.add_argument(
        "-q", "--quiet", action="store_true", help="print only card IDs (<slug>/<mdcsum>)"
    )
    shape.add_argument(
        "--json", action="store_true", help="print the cache as one JSON document (fields in "
        "docs/operations.md)"
    )  # fmt: skip
    ls.set_defaults(func=_ls)
    return ls


def _add_verify(cache_sub: Subcommands) -> argparse.ArgumentParser:
    verify = cache_sub.add_parser(
        "verify",
        help="re-hash every blob (and remove corrupt ones with --fix)",
        description="Re-hash every blob and report corrupt ones; exit 1 if any is corrupt. "
        "--fix plans the removal of each corrupt blob (re-hashed under its lock first), the "
        "cards linking it and the blobs only those cards link, prints the plan and deletes "
        "it as prune does: with -y, or after a y on a terminal; when stdin is not a terminal "
        "it deletes nothing and exits 1. A frontend that needs such a card again fetches and "
        "verifies it anew. With --fix the exit code is 0 once nothing corrupt is left.",
        epilog=examples(
            ("discovery-mdc cache verify", "report only"),
            (
                "discovery-mdc cache verify --fix -y",
                "remove corrupt blobs and the cards using them, no question",
            ),
            ("discovery-mdc cache verify --json | jq '.corrupt'", "for monitoring"),
        ),
    )
    verify.add_argument(
        "--fix",
        action="store_true",
        help="remove corrupt blobs, the cards that link them and the blobs only those cards "
        "link (asks first, as prune does)",
    )
    _add_confirm_options(verify, " (with --fix)")
    _add_json(verify, "the report (and what --fix removed)")
    verify.set_defaults(func=_verify)
    return verify


def _add_prune(cache_sub: Subcommands) -> argparse.ArgumentParser:
    prune = cache_sub.add_parser(
        "prune",
        help="delete what nobody needs: broken or unused cards, orphaned blobs, temp files",
        description="Print the prune plan, then delete it: cards with broken links, "
        "incomplete cards and temp files whose writer is gone (or older than 24 h), with "
        "--older-than cards not used for that long, with --keep all but the N most recently "
        "used cards of each model, then blobs no link refers to, then empty directories. "
        "Cards a running frontend serves count as used. Without -y it asks on a terminal; "
        "when stdin is not a terminal it deletes nothing and exits 1.",
        epilog=examples(
            ("discovery-mdc cache prune --dry-run", "print the plan only"),
            (
                "discovery-mdc cache prune --older-than 30d -y",
                "also evict cards unused for 30 days",
            ),
            (
                "discovery-mdc cache prune --keep 2 -y --json",
                "keep 2 mdcsums per model; report JSON",
            ),
        ),
    )
    prune.add_argument(
        "--older-than",
        type=_age,
        default=None,
        metavar="AGE",
        help="also delete cards last used longer ago than AGE (e.g. 30d, 12h, 90m, 2w)",
    )
    prune.add_argument(
        "--keep",
        type=_positive,
        default=None,
        metavar="N",
        help="also delete all but the N most recently used cards (mdcsums) of each model",
    )
    _add_plan_options(prune)
    prune.set_defaults(func=_prune)
    return prune


def _add_rm(cache_sub: Subcommands) -> argparse.ArgumentParser:
    rm = cache_sub.add_parser(
        "rm",
        help="remove cached models or single mdcsums",
        description="Remove every cached card of MODEL (a model name or its slug), or one "
        "card MODEL/MDCSUM (the mdcsum or a unique prefix of it), and the blobs no other card "
        "links. Prints the plan first; without -y it asks on a terminal, and when stdin is not "
        "a terminal it deletes nothing and exits 1. A running frontend that still serves a "
        "removed card fetches it again.",
        epilog=examples(
            ("discovery-mdc cache rm Qwen/Qwen3-0.6B --dry-run", "what removing it would delete"),
            ("discovery-mdc cache rm qwen_qwen3-0_6b/3f2a9c -y", "one mdcsum, no question"),
            ("discovery-mdc cache ls -q | grep old | xargs discovery-mdc cache rm -y", "in bulk"),
        ),
    )
    rm.add_argument(
        "models", nargs="+", metavar="MODEL[/MDCSUM]", help="what to remove (see cache ls)"
    )
    _add_plan_options(rm)
    rm.set_defaults(func=_rm)
    return rm
