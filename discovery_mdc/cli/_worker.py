"""``discovery-mdc worker``: publish a model until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging

from discovery_mdc.card import MODEL_TYPE_FLAGS, parse_model_type
from discovery_mdc.cli._common import (
    EXIT_OK,
    add_env_option,
    etcd_client,
    examples,
    stop_on_signals,
)
from discovery_mdc.errors import CardError
from discovery_mdc.worker import Worker, parse_instance_transport

__all__ = ["register"]

log = logging.getLogger("discovery_mdc.cli")


async def _run_worker(args: argparse.Namespace) -> int:
    stop = stop_on_signals()
    async with (
        etcd_client(args) as client,
        Worker(
            client,
            lease_ttl=args.lease_ttl,
            system_port=args.system_port,
            system_host=args.system_host,
            self_host_metadata=args.self_host,
        ) as worker,
    ):
        registering = asyncio.create_task(
            worker.register_model(
                args.model_path,
                model_name=args.model_name,
                namespace=args.namespace,
                component=args.component,
                endpoint=args.endpoint,
                custom_template=args.custom_template,
                model_type=args.model_type,
                lora_name=args.lora_name,
                instance_transport=args.instance_transport,
            )
        )
        # A signal must stop the worker even while it is still hashing or reaching etcd.
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait({registering, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if not registering.done():
            registering.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await registering
            log.info("worker stopped before its model was registered")
            return EXIT_OK
        stopping.cancel()
        registering.result()  # raises if registration failed
        await stop.wait()
        log.info("worker stopping: revoking lease %x", worker.session.lease_id)
    return EXIT_OK


def _worker(args: argparse.Namespace) -> int:
    # A bad model path is bad input (exit 2): the card is built before etcd is contacted.
    return asyncio.run(_run_worker(args))


def _model_type(text: str) -> tuple[str, ...]:
    try:
        return parse_model_type(text)
    except CardError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _transport(text: str) -> str:
    try:
        parse_instance_transport(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    w = sub.add_parser(
        "worker",
        help="publish a model's deployment card until stopped",
        description="Build the card for a model directory (or a cached HF repo id), serve its "
        "metadata files on the status server (self-hosting, the default when a status port is "
        "set), and publish it in etcd under a lease kept alive until SIGTERM/SIGINT, when the "
        "lease is revoked and the worker exits 0.",
        epilog=examples(
            (
                "discovery-mdc worker --model-path /models/Qwen3-0.6B --system-port 8081",
                "publish a model dir, serving its metadata on port 8081",
            ),
            (
                "discovery-mdc worker --model-path Qwen/Qwen3-0.6B --no-self-host",
                "a repo from the local HF cache; frontends resolve hf:// paths",
            ),
            (
                "discovery-mdc worker --model-path ./m --instance-transport tcp://10.0.0.5:9000/gen",
                "also route a Dynamo frontend to this worker",
            ),
        ),
    )
    add_env_option(w, "etcd")
    w.add_argument(
        "--model-path",
        required=True,
        help="a local HF-style model directory, or an HF repo id in the local HF cache",
    )
    w.add_argument(
        "--model-name",
        default=None,
        help="served name (default: the directory's base name, or the repo id)",
    )
    w.add_argument("--namespace", default="dynamo", help="namespace (default %(default)s)")
    w.add_argument("--component", default="backend", help="component (default %(default)s)")
    w.add_argument("--endpoint", default="generate", help="endpoint (default %(default)s)")
    w.add_argument(
        "--model-type",
        type=_model_type,
        default=("Chat", "Completions"),
        help=f"flags joined by '|' from {', '.join(MODEL_TYPE_FLAGS)} (default 'Chat|Completions')",
    )
    w.add_argument(
        "--custom-template",
        default=None,
        help="a chat template file to publish instead of the model's own",
    )
    w.add_argument("--lora-name", default=None, help="publish the card as this LoRA adapter")
    for dest in ("lease_ttl", "system_port", "system_host", "self_host"):
        add_env_option(w, dest)
    w.add_argument(
        "--instance-transport",
        type=_transport,
        default=None,
        help="also publish a Dynamo endpoint record v1/instances/... with this "
        "transport, e.g. tcp://127.0.0.1:9000/generate, so a Dynamo frontend "
        "routes to this worker",
    )
    w.set_defaults(func=_worker)
