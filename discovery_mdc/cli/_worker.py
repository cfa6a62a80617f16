"""``discovery-mdc worker``: publish a model until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import logging
from typing import Any

from discovery_mdc import _env
from discovery_mdc._hf import HfEnv
from discovery_mdc.card import MODEL_TYPE_FLAGS, parse_model_type, unservable_model_id
from discovery_mdc.cli._common import (
    EXIT_OK,
    Subcommands,
    UsageError,
    add_env_option,
    etcd_client,
    examples,
    model_path,
    stop_on_signals,
    until_stopped,
)
from discovery_mdc.errors import CardError
from discovery_mdc.worker import Worker, parse_instance_transport

__all__ = ["register", "resolve_endpoint_id"]

log = logging.getLogger("discovery_mdc.cli")


def resolve_endpoint_id(
    *,
    namespace: str | None = None,
    component: str | None = None,
    endpoint: _env.DynEndpoint | None = None,
    env_namespace: str | None = None,
    env_component: str | None = None,
    env_endpoint: _env.DynEndpoint | None = None,
    namespace_suffix: str | None = None,
) -> tuple[str, str, str]:
    """``(namespace, component, endpoint)`` from the flags and the variables.

    For each part the order is: its own flag (``--namespace``), the full-form ``--endpoint
    dyn://ns.component.endpoint``, the full-form ``DYN_ENDPOINT``, its own variable
    (``DYN_NAMESPACE``), the default (``dynamo``, ``backend``, ``generate``). Two flags that
    disagree are an error (``ValueError`` naming both). ``namespace_suffix``
    (``DYN_NAMESPACE_WORKER_SUFFIX``) is appended as ``{namespace}-{suffix}`` unless a
    full-form endpoint gave the namespace, as Dynamo's ``get_worker_namespace`` does.
    """
    parts: list[str] = []
    for what, flag, env_value, default in (
        ("namespace", namespace, env_namespace, "dynamo"),
        ("component", component, env_component, "backend"),
    ):
        from_flag = getattr(endpoint, what) if endpoint is not None else None
        from_env = getattr(env_endpoint, what) if env_endpoint is not None else None
        if flag is not None and from_flag is not None and flag != from_flag:
            raise ValueError(
                f"--{what} {flag!r} contradicts the {what} {from_flag!r} of --endpoint; "
                "give one of them"
            )
        # What a full-form endpoint names is used as given; the rest gets the suffix.
        exact = from_flag if from_flag is not None else from_env if flag is None else None
        if exact is not None:
            value = exact
        else:
            value = next((v for v in (flag, env_value) if v is not None), default)
            if what == "namespace" and namespace_suffix:
                value = f"{value}-{namespace_suffix}"
        parts.append(_env.parse_key_segment(value, what))
    chosen = endpoint or env_endpoint
    parts.append(chosen.endpoint if chosen is not None else "generate")
    return parts[0], parts[1], parts[2]


def _endpoint_id(args: argparse.Namespace, from_env: set[str]) -> tuple[str, str, str]:
    def flag(dest: str) -> Any:
        return None if dest in from_env else getattr(args, dest)

    def env(dest: str) -> Any:
        return getattr(args, dest) if dest in from_env else None

    suffix = _env.NAMESPACE_WORKER_SUFFIX.get()  # ConfigError (exit 2) for a bad value
    try:
        return resolve_endpoint_id(
            namespace=flag("namespace"), component=flag("component"),
            endpoint=flag("endpoint"), env_namespace=env("namespace"),
            env_component=env("component"), env_endpoint=env("endpoint"),
            namespace_suffix=suffix,
        )  # fmt: skip
    except ValueError as exc:
        raise UsageError(str(exc)) from None


async def _run_worker(args: argparse.Namespace, endpoint_id: tuple[str, str, str]) -> int:
    stop = stop_on_signals()
    namespace, component, endpoint = endpoint_id
    async with (
        etcd_client(args) as client,
        Worker(
            client,
            lease_ttl=args.lease_ttl,
            system_port=args.system_port,
            system_host=args.system_host,
            self_host_metadata=args.self_host,
            startup_timeout=args.startup_timeout,
            shutdown_timeout=args.shutdown_timeout,
            hf=HfEnv.from_env(),
        ) as worker,
    ):
        # A signal must stop the worker even while it is still hashing or waiting for etcd.
        registered, _ = await until_stopped(
            worker.register_model(
                args.model_path,
                model_name=args.model_name,
                namespace=namespace,
                component=component,
                endpoint=endpoint,
                custom_template=args.custom_template,
                model_type=args.model_type,
                lora_name=args.lora_name,
                instance_transport=args.instance_transport,
            ),
            stop,
        )
        if not registered:
            log.info("worker stopped before its model was registered")
            return EXIT_OK
        await stop.wait()
        log.info(
            "worker stopping: revoking lease %x (graceful shutdown within %gs)",
            worker.session.lease_id,
            args.shutdown_timeout,
            extra={"lease": f"{worker.session.lease_id:x}"},
        )
    return EXIT_OK


def _worker(args: argparse.Namespace) -> int:
    # Every flag and variable is checked before this point; a bad model path is bad input
    # (exit 2) too: the card is built before etcd is contacted.
    endpoint_id = _endpoint_id(args, args.from_env)
    return asyncio.run(_run_worker(args, endpoint_id))


def _model_type(text: str) -> tuple[str, ...]:
    try:
        return parse_model_type(text)
    except CardError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _model_id(text: str) -> str:
    # The frontends' admission rule: a name they would reject is refused here, at start.
    why = unservable_model_id(text)
    if why is not None:
        raise argparse.ArgumentTypeError(
            f"{text!r}: {why}, so no frontend could serve it at /v1/models/{{id}}"
        )
    return text


def _transport(text: str) -> str:
    try:
        parse_instance_transport(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def register(sub: Subcommands) -> None:
    w = sub.add_parser(
        "worker",
        help="publish a model's deployment card until stopped",
        description="Build the card for a model directory (or a cached HF repo id), serve its "
        "metadata files on the status server (self-hosting, the default when a status port is "
        "set), and publish it in etcd under a lease kept alive until SIGTERM/SIGINT, when the "
        "lease is revoked and the worker exits 0. While etcd is unreachable at start it "
        "waits, up to --etcd-startup-timeout.",
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
                "discovery-mdc worker --model-path ./m --endpoint dyn://prod.backend.generate "
                "--instance-transport tcp://10.0.0.5:9000/gen",
                "in namespace prod (Dynamo's endpoint form); a Dynamo frontend routes to it",
            ),
        ),
    )
    add_env_option(w, "etcd")
    _add_model_options(w)
    for dest in (
        "lease_ttl",
        "system_port",
        "system_host",
        "self_host",
        "startup_timeout",
        "shutdown_timeout",
    ):
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


def _add_model_options(w: argparse.ArgumentParser) -> None:
    """What to publish, and as what: the model, its name, endpoint, type and template."""
    w.add_argument(
        "--model-path",
        required=True,
        type=model_path,
        help="a local HF-style model directory, or an HF repo id in the local HF cache",
    )
    w.add_argument(
        "--model-name",
        default=None,
        type=_model_id,
        help="served name (default: the directory's base name, or the repo id)",
    )
    for dest in ("namespace", "component", "endpoint"):
        add_env_option(w, dest)
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
    w.add_argument(
        "--lora-name",
        default=None,
        type=_model_id,
        help="publish the card as this LoRA adapter",
    )
