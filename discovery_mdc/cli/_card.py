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
from discovery_mdc.cli._common import EXIT_OK, model_path
from discovery_mdc.errors import CardDecodeError

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
    if path.is_dir():
        card = from_dir(path, display_name=args.name)
    else:
        card = load_card_file(path)
        if args.name is not None:
            card = card.replace(display_name=args.name)
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
    )
    card_sub = card.add_subparsers(dest="card_command", required=True, metavar="COMMAND")
    inspect = card_sub.add_parser(
        "inspect",
        help="print a card as wire JSON",
        description="Print the model deployment card for a model directory, or re-encode a "
        "card/envelope JSON file, as one line of wire JSON.",
    )
    inspect.add_argument(
        "path", metavar="PATH", type=model_path, help="a model directory or a card/envelope JSON"
    )
    inspect.add_argument(
        "--name", default=None, help="display name (default: the directory's base name)"
    )
    inspect.add_argument(
        "--mdcsum", action="store_true", help="print only the 64-hex mdcsum of the card"
    )
    inspect.set_defaults(func=_inspect)

    from discovery_mdc.cli._cache import add_fetch_parser

    add_fetch_parser(card_sub)
