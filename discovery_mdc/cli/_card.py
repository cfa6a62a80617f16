"""``discovery-mdc card inspect`` (and ``card fetch``, from :mod:`._cache`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from discovery_mdc._hf import HfEnv
from discovery_mdc.card import encode_card, from_dir, mdcsum, slugify
from discovery_mdc.cli._cache import add_fetch_parser
from discovery_mdc.cli._common import EXIT_OK, Subcommands, examples, load_card_file, model_path
from discovery_mdc.worker import resolve_model_source

__all__ = ["register"]


def _inspect(args: argparse.Namespace) -> int:
    path = Path(args.path)
    if path.is_file():
        card = load_card_file(path)
        if args.name is not None:
            # The slug follows the name, as when a worker builds the card under that name.
            card = card.replace(display_name=args.name, slug=slugify(args.name))
    else:
        # A model dir or an HF repo id in the local HF cache, as `worker --model-path` takes.
        source = resolve_model_source(args.path, hf=HfEnv.from_env())
        card = from_dir(
            source.local_dir,
            display_name=args.name if args.name is not None else source.display_name_default,
            source_path=source.source_path,
        )
    if args.mdcsum:
        print(mdcsum(card))
    else:
        sys.stdout.write(encode_card(card).decode() + "\n")
    return EXIT_OK


def register(sub: Subcommands) -> None:
    card = sub.add_parser(
        "card",
        help="build, inspect and fetch model deployment cards",
        description="Build or re-encode a model deployment card (inspect), or verify and "
        "cache its metadata files (fetch). No etcd is needed.",
        epilog=examples(
            ("discovery-mdc card inspect /models/Qwen3-0.6B", "the card a worker would build"),
            ("discovery-mdc card fetch card.json", "verify and cache its files"),
        ),
    )
    card_sub = card.add_subparsers(dest="card_command", required=True, metavar="COMMAND")
    inspect = card_sub.add_parser(
        "inspect",
        help="print a card as wire JSON",
        description="Print the model deployment card for a model directory or an HF repo id "
        "in the local HF cache (as `worker --model-path` takes them), or re-encode a "
        "card/envelope JSON file, as one line of wire JSON.",
        epilog=examples(
            ("discovery-mdc card inspect /models/Qwen3-0.6B | jq .", "a model dir's card"),
            ("discovery-mdc card inspect Qwen/Qwen3-0.6B --mdcsum", "from the HF cache; mdcsum"),
            ("discovery-mdc card inspect env.json --name other", "re-encode, renamed"),
        ),
    )
    inspect.add_argument(
        "path",
        metavar="PATH",
        type=model_path,
        help="a model directory, an HF repo id in the local HF cache, or a card/envelope JSON",
    )
    inspect.add_argument(
        "--name",
        default=None,
        help="display name (default: the directory's base name, or the repo id)",
    )
    inspect.add_argument(
        "--mdcsum", action="store_true", help="print only the 64-hex mdcsum of the card"
    )
    inspect.set_defaults(func=_inspect)
    add_fetch_parser(card_sub)
