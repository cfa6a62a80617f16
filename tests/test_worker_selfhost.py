"""The self-host rewrite (pure: the card plus its registrations) and the card the worker
publishes (self-hosted, local paths, or ``hf://`` paths)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import pytest

from discovery_mdc import _env
from discovery_mdc.card import LoraInfo, ModelDeploymentCard, from_dir, mdcsum
from discovery_mdc.errors import RegistryError
from discovery_mdc.worker._registry import MetadataRegistry
from discovery_mdc.worker._selfhost import (
    PreparedCard,
    build_worker_card,
    model_ref,
    move_to_self_host,
    prepare_card,
    running_base_url,
)
from discovery_mdc.worker._server import StatusServer

ENDPOINT = {"namespace": "dynamo", "component": "backend", "endpoint": "generate"}
BASE = "http://10.0.0.1:8081"


def card_of(model_dir: Path, **kwargs: object) -> ModelDeploymentCard:
    return from_dir(model_dir, include_extra_files=True, **kwargs)  # type: ignore[arg-type]


def host(
    card: ModelDeploymentCard, registry: MetadataRegistry, base_url: str = BASE, **endpoint: str
) -> ModelDeploymentCard:
    """Self-host ``card`` as the Worker does: the pure rewrite, then its registrations."""
    prepared = move_to_self_host(card, base_url, **{**ENDPOINT, **endpoint})
    prepared.register(registry)
    return prepared.card


def test_every_slot_and_extra_is_rewritten_and_registered_under_both_routes(
    make_model_dir: Callable[..., Path],
) -> None:
    model_dir = make_model_dir("Tiny.Model")
    (model_dir / "chat_template.jinja").write_text("{{ messages }}")
    card = card_of(model_dir)
    registry = MetadataRegistry()
    hosted = host(card, registry, BASE + "/")

    before = dict(card.files())
    after = dict(hosted.files())
    assert before.keys() == after.keys()
    assert "chat_template_file" in after and "extra_files[0]" in after
    for name, f in after.items():
        original = before[name]
        assert f.path == f"{BASE}/v1/metadata/tiny_model/{original.basename}"
        assert (f.checksum, f.size) == (original.checksum, original.size)
        for key in (
            f"tiny_model/{original.basename}",
            f"dynamo/backend/generate/tiny_model/_base/{original.basename}",
        ):
            registered = registry.lookup(key)
            assert registered is not None
            assert registered.path == Path(original.path).resolve()
            assert registered.checksum == original.checksum
    assert len(registry) == 2 * len(after)
    # Paths are never hashed, so self-hosting does not change the worker-set identity.
    assert mdcsum(hosted) == mdcsum(card)
    assert (model_dir / "model.safetensors").exists()
    keys = registry.keys()
    assert not any(k.endswith("model.safetensors") for k in keys)


def test_lora_cards_use_the_lora_slug_as_suffix(make_model_dir: Callable[..., Path]) -> None:
    card = card_of(make_model_dir("tiny")).replace(lora=LoraInfo("My Adapter"))
    registry = MetadataRegistry()
    host(card, registry)
    assert "dynamo/backend/generate/tiny/my_adapter/config.json" in registry
    ref = model_ref(card, **ENDPOINT)
    assert ref.suffix == "my_adapter"
    registered = len(registry)
    assert registry.unregister_model(ref) == registered
    assert len(registry) == 0


def test_custom_template_is_served_under_its_own_name(
    make_model_dir: Callable[..., Path], tmp_path: Path
) -> None:
    template = tmp_path / "my-template.jinja"
    template.write_text("{{ custom }}")
    card = card_of(make_model_dir("tiny"), custom_template=template)
    registry = MetadataRegistry()
    hosted = host(card, registry)
    assert hosted.chat_template_file is not None and hosted.chat_template_file.is_custom
    assert hosted.chat_template_file.file.path == f"{BASE}/v1/metadata/tiny/my-template.jinja"
    registered = registry.lookup("tiny/my-template.jinja")
    assert registered is not None and registered.path == template.resolve()


def test_custom_template_colliding_with_another_slot_is_an_error_and_registers_nothing(
    make_model_dir: Callable[..., Path], tmp_path: Path
) -> None:
    template = tmp_path / "elsewhere" / "tokenizer_config.json"
    template.parent.mkdir()
    template.write_text('{"chat_template": "x"}')
    card = card_of(make_model_dir("tiny"), custom_template=template)
    registry = MetadataRegistry()
    with pytest.raises(RegistryError, match=r"tokenizer_config\.json"):
        host(card, registry)
    assert len(registry) == 0


def test_same_model_on_a_second_endpoint_shares_the_short_route(
    make_model_dir: Callable[..., Path],
) -> None:
    card = card_of(make_model_dir("tiny"))
    registry = MetadataRegistry()
    first = host(card, registry)
    second = host(card, registry, endpoint="other")
    assert first == second
    n = len(list(card.files()))
    assert len(registry) == 3 * n
    assert registry.unregister_model(model_ref(card, **ENDPOINT)) == n
    assert "tiny/config.json" in registry


def test_a_different_model_with_the_same_slug_is_refused(
    make_model_dir: Callable[..., Path],
) -> None:
    registry = MetadataRegistry()
    host(card_of(make_model_dir("a")), registry)
    clash = card_of(make_model_dir("b", seed=1)).replace(slug="a")
    with pytest.raises(RegistryError, match="already registered"):
        host(clash, registry, endpoint="e2")


def test_empty_slug_cannot_be_self_hosted(make_model_dir: Callable[..., Path]) -> None:
    card = from_dir(make_model_dir("tiny"), display_name="日本語")
    assert card.slug == ""
    with pytest.raises(RegistryError, match="slug"):
        move_to_self_host(card, BASE, **ENDPOINT)


def test_extra_names_are_percent_encoded_and_unservable_ones_dropped(
    make_model_dir: Callable[..., Path], caplog: pytest.LogCaptureFixture
) -> None:
    model_dir = make_model_dir("tiny")
    (model_dir / "notes for you.txt").write_text("hi")
    (model_dir / "tab\there.txt").write_text("no")  # a control character: no URL form
    card = card_of(model_dir)
    registry = MetadataRegistry()
    hosted = host(card, registry)
    assert [f.basename for f in card.extra_files] == [
        "notes for you.txt",
        "special_tokens_map.json",
        "tab\there.txt",
    ]
    assert [f.path for f in hosted.extra_files] == [
        f"{BASE}/v1/metadata/tiny/notes%20for%20you.txt",
        f"{BASE}/v1/metadata/tiny/special_tokens_map.json",
    ]
    assert "tiny/notes%20for%20you.txt" in registry
    assert "tab\\there.txt" in caplog.text and "dropping it" in caplog.text


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        (None, True),
        ("1", True),
        ("on", True),
        ("yes", True),
        ("0", False),
        ("false", False),
        ("FALSE", False),
        ("No", False),
        (" off ", False),
        ("", False),
    ],
)
def test_dyn_self_host_metadata_is_off_only_for_dynamos_falsy_values(
    env: str | None, expected: bool
) -> None:
    environ = {} if env is None else {"DYN_SELF_HOST_METADATA": env}
    assert _env.SELF_HOST_METADATA.get(environ) is expected


async def test_prepare_card_self_hosts_when_enabled_and_server_running(
    status_server: StatusServer,
    make_model_dir: Callable[..., Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DYN_SELF_HOST_METADATA", "off")  # read by from_env and the CLI only
    card = card_of(make_model_dir("tiny"))
    published = prepare_card(
        card, base_url=status_server.base_url, self_host=True, hf_repo=None, **ENDPOINT
    ).card
    assert all(
        f.path.startswith(f"http://127.0.0.1:{status_server.port}/v1/metadata/tiny/")
        for _, f in published.files()
    )
    assert published.extra_files


async def test_opt_out_keeps_local_paths_and_drops_extras(
    status_server: StatusServer, make_model_dir: Callable[..., Path]
) -> None:
    card = card_of(make_model_dir("tiny"))
    prepared = prepare_card(
        card, base_url=status_server.base_url, self_host=False, hf_repo=None, **ENDPOINT
    )
    assert prepared.card == card.replace(extra_files=())
    assert prepared.registrations == ()


def test_no_server_keeps_local_paths_and_logs_exactly_one_info_line(
    make_model_dir: Callable[..., Path], caplog: pytest.LogCaptureFixture
) -> None:
    card = from_dir(make_model_dir("tiny"))
    caplog.set_level(logging.DEBUG, logger="discovery_mdc")
    published = prepare_card(card, base_url=None, self_host=True, hf_repo=None, **ENDPOINT)
    assert published.card == card
    records = [r for r in caplog.records if r.name.startswith("discovery_mdc.worker")]
    assert [(r.levelno, "no status server" in r.getMessage()) for r in records] == [
        (logging.INFO, True)
    ]


def test_no_server_and_disabled_logs_nothing(
    make_model_dir: Callable[..., Path], caplog: pytest.LogCaptureFixture
) -> None:
    card = from_dir(make_model_dir("tiny"))
    caplog.set_level(logging.DEBUG, logger="discovery_mdc")
    assert prepare_card(card, base_url=None, self_host=False, hf_repo=None, **ENDPOINT).card == card
    assert not [r for r in caplog.records if r.name.startswith("discovery_mdc.worker")]


async def test_stopped_server_counts_as_no_server(make_model_dir: Callable[..., Path]) -> None:
    srv = StatusServer("127.0.0.1", 0, registry=MetadataRegistry())
    card = from_dir(make_model_dir("tiny"))
    assert running_base_url(srv) is None
    base_url = running_base_url(srv)
    assert (
        prepare_card(card, base_url=base_url, self_host=True, hf_repo=None, **ENDPOINT).card == card
    )


def test_hf_repo_without_self_hosting_points_slots_at_hf(
    make_model_dir: Callable[..., Path], tmp_path: Path
) -> None:
    template = tmp_path / "custom.jinja"
    template.write_text("{{ x }}")
    card = card_of(make_model_dir("snap"), custom_template=template)
    published = prepare_card(
        card, base_url=None, self_host=False, hf_repo="Org/Model-1.5", **ENDPOINT
    ).card
    paths = {name: f.path for name, f in published.files()}
    assert paths == {
        "model_info": "hf://Org/Model-1.5/config.json",
        "tokenizer": "hf://Org/Model-1.5/tokenizer.json",
        "prompt_formatter": "hf://Org/Model-1.5/tokenizer_config.json",
        "chat_template_file": str(template),  # not part of the repo
        "gen_config": "hf://Org/Model-1.5/generation_config.json",
    }


async def test_hf_repo_with_self_hosting_publishes_urls(
    status_server: StatusServer, make_model_dir: Callable[..., Path]
) -> None:
    card = card_of(make_model_dir("snap"))
    published = prepare_card(
        card, base_url=status_server.base_url, self_host=True, hf_repo="Org/Model", **ENDPOINT
    ).card
    assert all(f.path.startswith("http://127.0.0.1:") for _, f in published.files())


async def test_build_worker_card_hashes_extras_only_when_self_hosting(
    status_server: StatusServer, make_model_dir: Callable[..., Path]
) -> None:
    model_dir = make_model_dir("tiny")
    hosted = build_worker_card(
        str(model_dir), base_url=status_server.base_url, self_host=True, **ENDPOINT
    ).card
    assert hosted.display_name == "tiny" and hosted.source_path == str(model_dir)
    assert [f.basename for f in hosted.extra_files] == ["special_tokens_map.json"]
    local = build_worker_card(
        str(model_dir), base_url=status_server.base_url, self_host=False, **ENDPOINT
    ).card
    assert local.extra_files == ()
    assert local.model_info is not None
    assert local.model_info.file.path == str(model_dir / "config.json")


# --------------------------------------------------------------------------- pure rewrite


def test_move_to_self_host_returns_the_registrations_and_touches_nothing(
    make_model_dir: Callable[..., Path],
) -> None:
    model_dir = make_model_dir("tiny")
    card = card_of(model_dir)
    prepared = move_to_self_host(card, BASE, **ENDPOINT)
    assert prepared.owner == model_ref(card, **ENDPOINT)
    # Two registrations per file, one per route, naming the file as the card had it.
    expected = []
    for _, f in card.files():
        for key in (f"tiny/{f.basename}", f"dynamo/backend/generate/tiny/_base/{f.basename}"):
            expected.append((key, f.path, f.checksum, f.size))
    assert [(r.key, r.path, r.checksum, r.size) for r in prepared.registrations] == expected
    assert move_to_self_host(card, BASE, **ENDPOINT) == prepared  # same card, same answer
    # No file is opened or stat'ed: the rewrite works on a card whose files are gone, and
    # only registering them notices.
    for _, f in card.files():
        Path(f.path).unlink()
    gone = move_to_self_host(card, BASE, **ENDPOINT)
    assert gone == prepared
    registry = MetadataRegistry()
    with pytest.raises(RegistryError, match="not readable"):
        gone.register(registry)
    assert len(registry) == 0


def test_prepared_card_registers_all_or_nothing_and_its_owner_releases_it(
    make_model_dir: Callable[..., Path], tmp_path: Path
) -> None:
    registry = MetadataRegistry()
    prepared = move_to_self_host(card_of(make_model_dir("tiny")), BASE, **ENDPOINT)
    prepared.register(registry)
    assert registry.keys() == sorted(r.key for r in prepared.registrations)
    prepared.register(registry)  # the same files again: nothing changes
    assert len(registry) == len(prepared.registrations)
    assert registry.unregister_model(prepared.owner) == len(prepared.registrations)
    # A card that clashes with what is served registers none of its files.
    template = tmp_path / "elsewhere" / "tokenizer_config.json"
    template.parent.mkdir()
    template.write_text('{"chat_template": "x"}')
    clash = move_to_self_host(
        card_of(make_model_dir("other"), custom_template=template), BASE, **ENDPOINT
    )
    with pytest.raises(RegistryError, match=r"tokenizer_config\.json"):
        clash.register(registry)
    assert len(registry) == 0


def test_prepare_card_without_a_server_has_no_registrations(
    make_model_dir: Callable[..., Path],
) -> None:
    card = card_of(make_model_dir("tiny"))
    assert card.extra_files
    local = prepare_card(card, base_url=None, self_host=True, hf_repo=None, **ENDPOINT)
    assert local == PreparedCard(card.replace(extra_files=()), model_ref(card, **ENDPOINT))
    hf = prepare_card(card, base_url=BASE, self_host=False, hf_repo="Org/M", **ENDPOINT)
    assert hf.registrations == () and hf.card.extra_files == ()
    assert {f.path for _, f in hf.card.files()} == {
        f"hf://Org/M/{slot.file.basename}" for _, slot in card.slots()
    }
    hosted = prepare_card(card, base_url=BASE, self_host=True, hf_repo="Org/M", **ENDPOINT)
    assert hosted == move_to_self_host(card, BASE, **ENDPOINT)


async def test_build_worker_card_leaves_the_running_server_untouched(
    status_server: StatusServer, make_model_dir: Callable[..., Path]
) -> None:
    model_dir = make_model_dir("tiny")
    prepared = build_worker_card(
        str(model_dir), base_url=status_server.base_url, self_host=True, **ENDPOINT
    )
    assert len(status_server.registry) == 0
    assert prepared.card.extra_files and prepared.registrations
    assert all(f.path.startswith(status_server.base_url) for _, f in prepared.card.files())
    prepared.register(status_server.registry)
    assert len(status_server.registry) == len(prepared.registrations)
