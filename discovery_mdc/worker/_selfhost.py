"""The card a worker publishes: its files self-hosted on the status server, or ``hf://`` paths.

Self-hosting rewrites the path of every populated file of the card to
``http://<advertise-host>:<port>/v1/metadata/<slug>/<filename>`` and lists the registrations
that serve it (:class:`PreparedCard`); this rewrite is pure, and the
:class:`~discovery_mdc.worker.Worker` registers them with the status server's registry just
before it publishes the card. Files are never copied; the registry maps the URL to the
file's canonical path. The URL's file name is the one *as given* (``CheckedFile.basename``),
because an HF cache snapshot links ``tokenizer.json`` to ``blobs/<sha>`` and the file must
keep its real name.

Decisions the spec leaves open:

* Two files of one card with the same base name but different content (say, a custom chat
  template called ``tokenizer_config.json``) cannot share one URL: registering them is a
  :class:`RegistryError`, and nothing of that card is registered. The same file under two
  slots is fine.
* A file name that is not URL-safe is percent-encoded in its URL, as the reference does
  (``my template.jinja`` -> ``my%20template.jinja``); a frontend decodes it and stores the
  file under its real name. Names that cannot be served at all (a leading ``.``, a ``\\`` or
  control character, not UTF-8; see :func:`url_segment`) are dropped from the card with a
  warning for extra files (they are optional) and are a :class:`RegistryError` for a typed
  slot. So is an empty slug or LoRA slug (a display name with no ``[a-z0-9]`` characters).
* Slots that are already URLs are left as they are.
* As in the reference (NVIDIA Dynamo), ``extra_files`` are published only with
  self-hosting; :func:`prepare_card` drops them otherwise, so
  :func:`build_worker_card` hashes them only when the card will be self-hosted.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from typing import Any

from discovery_mdc._hf import HfEnv
from discovery_mdc.card import CheckedFile, LoraInfo, ModelDeploymentCard, from_dir, slugify
from discovery_mdc.errors import RegistryError
from discovery_mdc.worker._registry import (
    BASE_SUFFIX,
    MetadataRegistry,
    ModelRef,
    Registration,
    is_safe_name,
    url_segment,
)
from discovery_mdc.worker._server import METADATA_PREFIX, StatusServer
from discovery_mdc.worker._source import resolve_model_source

__all__ = [
    "PreparedCard",
    "build_worker_card",
    "model_ref",
    "move_to_self_host",
    "prepare_card",
    "running_base_url",
]

log = logging.getLogger("discovery_mdc.worker")


def model_ref(
    card: ModelDeploymentCard, *, namespace: str, component: str, endpoint: str
) -> ModelRef:
    """The registry owner of ``card`` published on an endpoint (for ``unregister_model``)."""
    suffix = card.lora_slug
    return ModelRef(
        namespace, component, endpoint, card.slug, BASE_SUFFIX if suffix is None else suffix
    )


@dataclass(frozen=True, slots=True)
class PreparedCard:
    """A card ready to publish, and the files the status server must serve for it.

    ``registrations`` is empty unless the card is self-hosted. Nothing is registered yet:
    :meth:`register` does it (the :class:`~discovery_mdc.worker.Worker` just before it
    publishes the card), and ``registry.unregister_model(owner)`` undoes it.
    """

    card: ModelDeploymentCard
    owner: ModelRef
    registrations: tuple[Registration, ...] = ()

    def register(self, registry: MetadataRegistry) -> None:
        """Serve the card's files from ``registry``: all or none (:class:`RegistryError`)."""
        if self.registrations:
            registry.register_many(self.registrations, owner=self.owner)


def move_to_self_host(
    card: ModelDeploymentCard,
    base_url: str,
    *,
    namespace: str,
    component: str,
    endpoint: str,
) -> PreparedCard:
    """``card`` with every populated local file rewritten to its self-hosted URL, and the
    registrations that serve them. Pure: nothing is registered (see :meth:`PreparedCard.register`).

    Each file gets two registrations, ``<slug>/<filename>`` (the advertised route) and
    ``<namespace>/<component>/<endpoint>/<slug>/<suffix>/<filename>``. ``base_url`` is
    ``http://host:port``. Raises :class:`RegistryError` for a slug, LoRA suffix or typed
    slot's file name that cannot be served; extra files whose name cannot be are dropped.
    """
    owner = model_ref(card, namespace=namespace, component=component, endpoint=endpoint)
    for what, value in (("slug", owner.slug), ("LoRA suffix", owner.suffix)):
        if not is_safe_name(value):
            raise RegistryError(
                f"cannot self-host {card.display_name!r}: its {what} {value!r} is not a usable "
                "URL path segment; choose a display name with ASCII letters or digits"
            )
    card = _servable_extras(card)
    prefix = base_url.rstrip("/") + METADATA_PREFIX
    entries: list[Registration] = []

    def rewrite(slot: str, file: CheckedFile) -> CheckedFile:
        if file.is_url:
            return file
        name = url_segment(file.basename)
        if name is None:
            raise RegistryError(
                f"cannot self-host {slot} of {card.display_name!r}: file name "
                f"{file.basename!r} cannot be served in a URL (a leading '.', '\\', a control "
                "character, or not UTF-8)"
            )
        for key in (f"{owner.slug}/{name}", f"{owner.prefix}/{name}"):
            entries.append(Registration(key, file.path, file.checksum, file.size))
        return file.with_path(f"{prefix}{owner.slug}/{name}")

    rewritten = card.map_files(rewrite)
    log.info(
        "self-hosting %d metadata file(s) of %s at %s%s/",
        len(entries) // 2,
        card.display_name,
        prefix,
        owner.slug,
    )
    return PreparedCard(rewritten, owner, tuple(entries))


def _servable_extras(card: ModelDeploymentCard) -> ModelDeploymentCard:
    """``card`` without the extra files whose name has no URL form (with a warning each)."""
    kept = []
    for extra in card.extra_files:
        if extra.is_url or url_segment(extra.basename) is not None:
            kept.append(extra)
        else:
            log.warning(
                "not self-hosting extra file %r of %s: its name cannot be served in a URL; "
                "dropping it from the card",
                extra.path,
                card.display_name,
            )
    return card if len(kept) == len(card.extra_files) else card.replace(extra_files=tuple(kept))


def _hf_paths(card: ModelDeploymentCard, repo: str) -> ModelDeploymentCard:
    custom = card.chat_template_file is not None and card.chat_template_file.is_custom

    def path(slot: str, file: CheckedFile) -> str:
        if file.is_url:
            return file.path
        if custom and slot == "chat_template_file":
            # A custom template is not part of the repo; hf:// would name a file that does
            # not exist there. Only self-hosting can make it reachable.
            log.warning(
                "custom chat template %s of %s keeps its local path; frontends on other "
                "hosts cannot fetch it unless metadata is self-hosted",
                file.path,
                card.display_name,
            )
            return file.path
        return f"hf://{repo}/{file.basename}"

    return card.with_paths(path)


def prepare_card(
    card: ModelDeploymentCard,
    *,
    base_url: str | None,
    self_host: bool,
    hf_repo: str | None,
    namespace: str,
    component: str,
    endpoint: str,
) -> PreparedCard:
    """The card to publish and its registrations (pure): self-host, or ``hf://`` paths.

    Self-hosts (:func:`move_to_self_host`) when ``self_host`` and a status server runs at
    ``base_url``; wanted without a server, it logs one info line and keeps local paths.
    Without self-hosting ``extra_files`` are dropped (as the reference does), and for an HF
    repo id every slot still holding a local path becomes ``hf://<repo>/<filename>``.
    """
    if self_host and base_url is not None:
        prepared = move_to_self_host(
            card, base_url, namespace=namespace, component=component, endpoint=endpoint
        )
    else:
        if self_host:
            log.info(
                "metadata self-hosting for %s skipped: no status server is running "
                "(set DYN_SYSTEM_PORT to start one); publishing local paths",
                card.display_name,
            )
        if card.extra_files:
            card = card.replace(extra_files=())
        owner = model_ref(card, namespace=namespace, component=component, endpoint=endpoint)
        prepared = PreparedCard(card, owner)
    if hf_repo is not None:
        prepared = replace(prepared, card=_hf_paths(prepared.card, hf_repo))
    return prepared


def _model_card(
    model: str,
    *,
    with_extras: bool,
    display_name: str | None = None,
    custom_template: str | os.PathLike[str] | None = None,
    lora_name: str | None = None,
    hf: HfEnv | None = None,
    **card_fields: Any,
) -> tuple[ModelDeploymentCard, str | None]:
    """The card of ``model`` (a dir or a cached HF repo id) as built, and its HF repo id."""
    source = resolve_model_source(model, hf=hf)
    card = from_dir(
        source.local_dir,
        display_name=display_name if display_name is not None else source.display_name_default,
        source_path=source.source_path,
        custom_template=custom_template,
        include_extra_files=with_extras,
        **card_fields,
    )
    if lora_name is not None:
        # As Dynamo (1.6.1) writes it: a LoRA card is named and slugged after the adapter,
        # whatever the base model is served as; the base stays in source_path. A card named
        # after the base is ignored by a Dynamo frontend and has another mdcsum.
        card = card.replace(
            display_name=lora_name, slug=slugify(lora_name), lora=LoraInfo(lora_name)
        )
    return card, source.hf_repo


def build_worker_card(
    model: str,
    *,
    base_url: str | None,
    self_host: bool,
    namespace: str,
    component: str,
    endpoint: str,
    **options: Any,
) -> PreparedCard:
    """Resolve ``model`` (a dir or a cached HF repo id), build its card and prepare it
    (:func:`prepare_card`). Registers nothing.

    ``options``: ``display_name``, ``custom_template``, ``lora_name``, ``hf`` (the HF cache
    settings for a repo id, see :func:`resolve_model_source`) and the
    :func:`~discovery_mdc.card.from_dir` fields (``model_type``, ``cancel``...). Extra files
    are hashed only when the card will be self-hosted. This hashes files and blocks; from
    async code run it in a thread.
    """
    card, hf_repo = _model_card(model, with_extras=self_host and base_url is not None, **options)
    return prepare_card(
        card,
        base_url=base_url,
        self_host=self_host,
        hf_repo=hf_repo,
        namespace=namespace,
        component=component,
        endpoint=endpoint,
    )


def running_base_url(server: StatusServer | None) -> str | None:
    """``server.base_url`` if it is running, else None (no self-hosting)."""
    return server.base_url if server is not None and server.is_running else None

