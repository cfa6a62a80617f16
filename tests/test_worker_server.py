"""The status server: self-hosted metadata over raw HTTP, health, metrics, configuration."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path

import aiohttp
import blake3
import pytest
from prometheus_client.parser import text_string_to_metric_families

from discovery_mdc.card import ModelDeploymentCard, from_dir
from discovery_mdc.errors import ConfigError
from discovery_mdc.worker._registry import MetadataRegistry
from discovery_mdc.worker._selfhost import move_to_self_host
from discovery_mdc.worker._server import StatusServer, _ConnectionGuard

ENDPOINT = {"namespace": "dynamo", "component": "backend", "endpoint": "generate"}


async def raw_request(
    port: int, target: str, method: str = "GET", extra_headers: str = ""
) -> tuple[int, dict[str, str], bytes]:
    """Send a request line exactly as given (no client-side normalisation)."""
    async with asyncio.timeout(30):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(
                f"{method} {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
                f"{extra_headers}\r\n".encode("utf-8", "surrogateescape")
            )
            await writer.drain()
            data = await reader.read()
        finally:
            writer.close()
            await writer.wait_closed()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, body


def self_hosted(
    status_server: StatusServer, model_dir: Path, **from_dir_kwargs: object
) -> ModelDeploymentCard:
    card = from_dir(model_dir, include_extra_files=True, **from_dir_kwargs)  # type: ignore[arg-type]
    prepared = move_to_self_host(card, status_server.base_url, **ENDPOINT)
    prepared.register(status_server.registry)
    return prepared.card


def url_path(url: str) -> str:
    return "/" + url.split("/", 3)[3]


async def test_self_hosted_card_urls_serve_the_slot_bytes_with_blake3_etag(
    status_server: StatusServer, make_model_dir: Callable[..., Path]
) -> None:
    card = self_hosted(status_server, make_model_dir("tiny"))
    files = list(card.files())
    assert {name for name, _ in files} >= {"model_info", "tokenizer", "extra_files[0]"}
    async with aiohttp.ClientSession() as session:
        for _, f in files:
            assert f.path.startswith(f"http://127.0.0.1:{status_server.port}/v1/metadata/tiny/")
            async with session.get(f.path) as resp:
                body = await resp.read()
                assert resp.status == 200
                assert resp.headers["Content-Length"] == str(f.size)
                assert resp.headers["ETag"] == f'"{f.checksum.hex}"'
            assert len(body) == f.size
            assert blake3.blake3(body).hexdigest() == f.checksum.hex
            async with session.head(f.path) as resp:
                assert resp.status == 200
                assert resp.headers["Content-Length"] == str(f.size)
                assert resp.headers["ETag"] == f'"{f.checksum.hex}"'
                assert await resp.read() == b""


async def test_long_route_serves_the_same_file(
    status_server: StatusServer, make_model_dir: Callable[..., Path]
) -> None:
    card = self_hosted(status_server, make_model_dir("tiny"))
    assert card.model_info is not None
    status, _, body = await raw_request(
        status_server.port, "/v1/metadata/dynamo/backend/generate/tiny/_base/config.json"
    )
    assert status == 200
    assert blake3.blake3(body).hexdigest() == card.model_info.file.checksum.hex
    status, _, _ = await raw_request(
        status_server.port, "/v1/metadata/dynamo/backend/generate/tiny/lora1/config.json"
    )
    assert status == 404


async def test_raw_head_has_content_length_and_no_body(
    status_server: StatusServer, make_model_dir: Callable[..., Path]
) -> None:
    card = self_hosted(status_server, make_model_dir("tiny"))
    assert card.tokenizer is not None
    status, headers, body = await raw_request(
        status_server.port, url_path(card.tokenizer.file.path), method="HEAD"
    )
    assert status == 200
    assert headers["content-length"] == str(card.tokenizer.file.size)
    assert body == b""


async def test_if_none_match_with_the_blake3_gives_304(
    status_server: StatusServer, make_model_dir: Callable[..., Path]
) -> None:
    card = self_hosted(status_server, make_model_dir("tiny"))
    assert card.model_info is not None
    f = card.model_info.file
    status, headers, body = await raw_request(
        status_server.port, url_path(f.path), extra_headers=f'If-None-Match: "{f.checksum.hex}"\r\n'
    )
    assert (status, body) == (304, b"")
    assert headers["etag"] == f'"{f.checksum.hex}"'


@pytest.mark.parametrize(
    "target",
    [
        "/v1/metadata/../../etc/passwd",
        "/v1/metadata/tiny/../tiny/config.json",
        "/v1/metadata/tiny/./config.json",
        "/v1/metadata/%2e%2e/%2e%2e/etc/passwd",
        "/v1/metadata/tiny/%2e%2e/tiny/config.json",
        "/v1/metadata/tiny%2Fconfig.json",
        "/v1/metadata/tiny%2fconfig.json",
        "/v1/metadata/tiny/config%2Ejson",
        "/v1/metadata//etc/passwd",
        "//etc/passwd",
        "/v1/metadata/tiny//config.json",
        "/v1/metadata/tiny/config.json/",
        "/v1/metadata/tiny/config.json%00",
        "/v1/metadata/TINY/config.json",
        "/v1/metadata/tiny/unregistered.json",
        "/v1/metadata/tiny/model.safetensors",
        "/v1/metadata/tiny",
        "/v1/metadata/",
        "/v1/metadata/tiny/" + "a" * 4000,
        "/v1/x/../metadata/tiny/config.json",
        "/v1/metadata/dynamo/backend/generate/tiny/_base/../_base/config.json",
    ],
)
async def test_raw_paths_that_are_not_registered_keys_get_404(
    status_server: StatusServer, make_model_dir: Callable[..., Path], target: str
) -> None:
    self_hosted(status_server, make_model_dir("tiny"))
    status, _, body = await raw_request(status_server.port, target)
    assert status == 404, target
    assert b"Traceback" not in body


async def test_absolute_on_disk_path_and_another_models_files_get_404(
    status_server: StatusServer, make_model_dir: Callable[..., Path]
) -> None:
    tiny_dir = make_model_dir("tiny")
    self_hosted(status_server, tiny_dir)
    self_hosted(status_server, make_model_dir("other", generation_config=False))
    status, _, _ = await raw_request(status_server.port, "/v1/metadata/other/config.json")
    assert status == 200
    for target in (
        "/v1/metadata/other/generation_config.json",  # only tiny has it
        "/v1/metadata/other/../tiny/generation_config.json",
        f"/v1/metadata{tiny_dir.resolve()}/config.json",
        f"/v1/metadata/tiny/{tiny_dir.resolve()}/config.json",
        f"{tiny_dir.resolve()}/config.json",
    ):
        status, _, _ = await raw_request(status_server.port, target)
        assert status == 404, target


async def test_empty_registry_answers_404_and_other_methods_405(
    status_server: StatusServer,
) -> None:
    assert (await raw_request(status_server.port, "/v1/metadata/a/b"))[0] == 404
    assert (await raw_request(status_server.port, "/v1/metadata/a/b", method="POST"))[0] == 405
    assert (await raw_request(status_server.port, "/nope"))[0] == 404


async def test_file_deleted_after_registration_gives_500_and_a_log_line_naming_it(
    status_server: StatusServer,
    make_model_dir: Callable[..., Path],
    caplog: pytest.LogCaptureFixture,
) -> None:
    model_dir = make_model_dir("tiny")
    card = self_hosted(status_server, model_dir)
    assert card.gen_config is not None
    (model_dir / "generation_config.json").unlink()
    caplog.set_level(logging.ERROR, logger="discovery_mdc.worker")
    for method in ("GET", "HEAD"):
        status, _, body = await raw_request(
            status_server.port, url_path(card.gen_config.file.path), method=method
        )
        assert status == 500
        assert b"Traceback" not in body and b"generation_config" not in body
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors
    assert all("generation_config.json" in m for m in errors)


async def test_file_that_changed_size_gives_500(
    status_server: StatusServer, make_model_dir: Callable[..., Path]
) -> None:
    model_dir = make_model_dir("tiny")
    card = self_hosted(status_server, model_dir)
    assert card.model_info is not None
    (model_dir / "config.json").write_text("{}")
    status, _, _ = await raw_request(status_server.port, url_path(card.model_info.file.path))
    assert status == 500


async def test_a_registered_file_swapped_for_a_symlink_of_the_same_size_is_not_followed(
    status_server: StatusServer, make_model_dir: Callable[..., Path], tmp_path: Path
) -> None:
    model_dir = make_model_dir("tiny")
    card = self_hosted(status_server, model_dir)
    assert card.model_info is not None
    config = model_dir / "config.json"
    secret = tmp_path / "secret"
    secret.write_bytes(b"S" * config.stat().st_size)
    config.unlink()
    config.symlink_to(secret)
    status, _, body = await raw_request(status_server.port, url_path(card.model_info.file.path))
    assert status == 500 and b"SSS" not in body


def _samples(text: str, name: str) -> dict[str, float]:
    for family in text_string_to_metric_families(text):
        if family.name == name:
            return {
                s.labels["status"]: s.value for s in family.samples if s.name.endswith("_total")
            }
    return {}


async def test_metrics_count_metadata_requests_and_bytes_by_status(
    status_server: StatusServer, make_model_dir: Callable[..., Path]
) -> None:
    model_dir = make_model_dir("tiny")
    card = self_hosted(status_server, model_dir)
    assert card.model_info is not None and card.gen_config is not None
    config = card.model_info.file
    for _ in range(2):
        assert (await raw_request(status_server.port, url_path(config.path)))[0] == 200
    assert (await raw_request(status_server.port, "/v1/metadata/tiny/nope.json"))[0] == 404
    assert (await raw_request(status_server.port, "/v1/metadata/tiny/a", method="POST"))[0] == 405
    (model_dir / "generation_config.json").unlink()
    assert (await raw_request(status_server.port, url_path(card.gen_config.file.path)))[0] == 500
    assert (await raw_request(status_server.port, "/health"))[0] == 200  # not a metadata request

    status, headers, body = await raw_request(status_server.port, "/metrics")
    assert status == 200
    assert headers["content-type"].startswith("text/plain")
    text = body.decode()
    assert _samples(text, "discovery_mdc_metadata_requests") == {
        "200": 2.0,
        "404": 1.0,
        "405": 1.0,
        "500": 1.0,
    }
    assert _samples(text, "discovery_mdc_metadata_sent_bytes") == {"200": 2.0 * config.size}  # type: ignore[operator]


async def test_metrics_count_files_and_carry_the_standard_series(
    status_server: StatusServer, make_model_dir: Callable[..., Path]
) -> None:
    card = self_hosted(status_server, make_model_dir("tiny"))
    files = len(list(card.files()))
    assert len(status_server.registry) == 2 * files  # a key per route
    status, headers, body = await raw_request(status_server.port, "/metrics")
    assert status == 200
    # The same content type as the frontend's /metrics.
    assert headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    text = body.decode()
    assert f"discovery_mdc_metadata_registered_files {float(files)}" in text
    assert "\nprocess_cpu_seconds_total " in text and "\nprocess_resident_memory_bytes " in text
    assert 'discovery_mdc_build_info{version="' in text
    assert "_created" not in text


async def test_two_servers_in_one_process_keep_separate_metrics() -> None:
    async with (
        StatusServer("127.0.0.1", 0, registry=MetadataRegistry()) as a,
        StatusServer("127.0.0.1", 0, registry=MetadataRegistry()) as b,
    ):
        await raw_request(a.port, "/v1/metadata/x/y")
        _, _, body = await raw_request(b.port, "/metrics")
        assert _samples(body.decode(), "discovery_mdc_metadata_requests") == {}


async def test_health_follows_the_health_callback_and_live_does_not() -> None:
    state = {"ready": True}
    async with StatusServer(
        "127.0.0.1", 0, registry=MetadataRegistry(), health=lambda: state["ready"]
    ) as srv:
        status, headers, body = await raw_request(srv.port, "/health")
        assert (status, body) == (200, b'{"status": "ready"}')
        assert headers["content-type"].startswith("application/json")
        state["ready"] = False
        status, _, body = await raw_request(srv.port, "/health")
        assert (status, body) == (503, b'{"status": "notready"}')
        # Liveness is the process, not etcd: a lost lease must not get the worker restarted.
        status, headers, body = await raw_request(srv.port, "/live")
        assert (status, body) == (200, b'{"status": "live"}')
        assert headers["content-type"].startswith("application/json")


async def test_a_raising_health_callback_reports_not_ready() -> None:
    def broken() -> bool:
        raise RuntimeError("boom")

    async with StatusServer("127.0.0.1", 0, registry=MetadataRegistry(), health=broken) as srv:
        status, _, body = await raw_request(srv.port, "/health")
        assert status == 503
        assert b"boom" not in body


async def test_start_returns_the_bound_port_and_close_is_idempotent() -> None:
    srv = StatusServer("127.0.0.1", 0, registry=MetadataRegistry())
    assert not srv.is_running
    with pytest.raises(RuntimeError):
        _ = srv.port
    port = await srv.start()
    try:
        assert port == srv.port != 0
        assert srv.base_url == f"http://127.0.0.1:{port}"
        assert (await raw_request(port, "/live"))[0] == 200
    finally:
        await srv.close()
        await srv.close()
    assert not srv.is_running
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port)


@pytest.mark.parametrize(
    ("port_flag", "host_flag", "env", "expected"),
    [
        (None, None, {}, None),
        (None, None, {"DYN_SYSTEM_PORT": ""}, None),
        (None, "127.0.0.1", {}, None),
        (None, None, {"DYN_SYSTEM_PORT": "0"}, ("0.0.0.0", 0)),
        (None, None, {"DYN_SYSTEM_PORT": "8081", "DYN_SYSTEM_HOST": "::"}, ("::", 8081)),
        (9000, None, {"DYN_SYSTEM_PORT": "8081"}, ("0.0.0.0", 9000)),
        (0, "10.0.0.1", {"DYN_SYSTEM_HOST": "::"}, ("10.0.0.1", 0)),
        (None, None, {"DYN_SYSTEM_PORT": "7", "DYN_SYSTEM_HOST": ""}, ("0.0.0.0", 7)),
    ],
)
def test_from_env_arguments_beat_variables_beat_defaults(
    port_flag: int | None,
    host_flag: str | None,
    env: dict[str, str],
    expected: tuple[str, int] | None,
) -> None:
    registry = MetadataRegistry()
    srv = StatusServer.from_env(registry=registry, port=port_flag, host=host_flag, env=env)
    assert (None if srv is None else (srv.host, srv._requested_port)) == expected


@pytest.mark.parametrize("bad", ["http", "-1", "65536", "1.5"])
def test_from_env_rejects_bad_ports_naming_the_variable(bad: str) -> None:
    with pytest.raises(ConfigError, match=r"^DYN_SYSTEM_PORT="):
        StatusServer.from_env(registry=MetadataRegistry(), env={"DYN_SYSTEM_PORT": bad})


@pytest.mark.parametrize("bad", [-1, 65536])
def test_a_port_out_of_range_is_refused_as_the_variable_is(bad: int) -> None:
    with pytest.raises(ValueError, match=f"^port {bad} is out of range 0-65535$"):
        StatusServer("127.0.0.1", bad, registry=MetadataRegistry())


async def test_from_env_starts_only_when_a_port_is_configured() -> None:
    registry = MetadataRegistry()
    assert StatusServer.from_env(registry=registry, env={}) is None
    srv = StatusServer.from_env(
        registry=registry, env={"DYN_SYSTEM_PORT": "0", "DYN_SYSTEM_HOST": "127.0.0.1"}
    )
    assert srv is not None and srv.host == "127.0.0.1" and srv.registry is registry
    async with srv:
        assert (await raw_request(srv.port, "/v1/metadata/a/b"))[0] == 404


# ---------------------------------------------------------------- slowloris guard


def closed_metric(srv: StatusServer, reason: str) -> float:
    value = srv.metrics.get_sample_value(
        "discovery_mdc_status_connections_closed_total", {"reason": reason}
    )
    return value or 0.0


async def stalled_connection(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # no blank line: never complete
    await writer.drain()
    return reader, writer


async def test_a_connection_that_never_completes_its_request_head_is_closed() -> None:
    async with StatusServer("127.0.0.1", 0, registry=MetadataRegistry(), header_timeout=0.3) as srv:
        reader, writer = await stalled_connection(srv.port)
        async with asyncio.timeout(10):
            assert await reader.read() == b""  # closed by the server, no response
        writer.close()
        assert closed_metric(srv, "header_timeout") == 1


async def test_an_idle_keep_alive_connection_is_closed_after_the_timeout_too() -> None:
    async with StatusServer("127.0.0.1", 0, registry=MetadataRegistry(), header_timeout=0.3) as srv:
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
        writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        async with asyncio.timeout(10):
            assert (await reader.readline()).startswith(b"HTTP/1.1 200")
            while await reader.read(65536):
                pass  # the rest of the response, then EOF once the server closes
        writer.close()
        assert closed_metric(srv, "header_timeout") == 1


async def test_at_the_cap_the_longest_waiting_connection_makes_room_for_a_new_one() -> None:
    async with StatusServer("127.0.0.1", 0, registry=MetadataRegistry(), max_connections=3) as srv:
        stalled = [await stalled_connection(srv.port) for _ in range(3)]
        status, _, body = await raw_request(srv.port, "/health")
        assert status == 200 and b"ready" in body
        async with asyncio.timeout(10):
            assert await stalled[0][0].read() == b""  # the oldest one was closed
        assert closed_metric(srv, "evicted") == 1
        for _, writer in stalled:
            writer.close()


class FakeHandler:
    def __init__(self) -> None:
        self.closed = False

    def force_close(self) -> None:
        self.closed = True


async def test_at_the_cap_with_every_connection_busy_the_new_one_is_refused() -> None:
    reasons: list[str] = []
    guard = _ConnectionGuard(2, 30.0, reasons.append)
    a, b, c = FakeHandler(), FakeHandler(), FakeHandler()
    for h in (a, b):
        guard.opened(h)  # type: ignore[arg-type]
        guard.busy(h)  # type: ignore[arg-type]
    guard.opened(c)  # type: ignore[arg-type]
    assert (a.closed, b.closed, c.closed) == (False, False, True) and reasons == ["refused"]
    guard.done(a)  # type: ignore[arg-type]  # a waits for its next request head again
    guard.opened(c)  # type: ignore[arg-type]
    assert a.closed and reasons == ["refused", "evicted"] and len(guard) == 2
    for h in (b, c):
        guard.closed(h)  # type: ignore[arg-type]
    assert len(guard) == 0
