"""``discovery-mdc card inspect``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import msgspec

from discovery_mdc.card import (
    ModelDeploymentCard,
    decode_card,
    decode_envelope,
    encode_card,
    from_dir,
    mdcsum,
)
from discovery_mdc.cli._common import EXIT_OK, examples, model_path
from discovery_mdc.errors import CardDecodeError
from discovery_mdc.worker import resolve_model_source

__all__ = ["load_card_file", "register"]


def load_card_file(path: Path) -> ModelDeploymentCard:
    """A card from a JSON file holding either a card or a ``{"type": "Model"}`` envelope."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CardDecodeError(f"cannot read {path}: {exc.strerror}") from None
    try:
        obj = msgspec.json.decode(data, type=dict[str, msgspec.Raw])
    except msgspec.DecodeError as exc:
        raise CardDecodeError(f"{path} is not a JSON object: {exc}") from None
    if "card_json" in obj:
        return decode_envelope(data).card
    return decode_card(data)


def _inspect(args: argparse.Namespace) -> int:
    path = Path(args.path)
    if path.is_file():
        card = load_card_file(path)
        if args.name is not None:
            card = card.replace(display_name=args.name)
    else:
        # A model dir or an HF repo id in the local HF cache, as `worker --model-path` takes.
        source = resolve_model_source(args.path)
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


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
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

    from discovery_mdc.cli._cache import add_fetch_parser

    add_fetch_parser(card_sub)
