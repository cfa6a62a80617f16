"""Fuzz the status server with raw request paths, and with registered paths bent (encoded,
doubled, padded, ...): only registered files, never a 5xx.

The server runs on its own event loop in a thread so hypothesis can drive it with plain
blocking sockets, writing each request line byte for byte.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import blake3
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from discovery_mdc._sample import write_sample_model
from discovery_mdc.card import from_dir
from discovery_mdc.worker._registry import MetadataRegistry
from discovery_mdc.worker._selfhost import move_to_self_host
from discovery_mdc.worker._server import StatusServer


@dataclass(frozen=True)
class Served:
    port: int
    model_dir: Path
    # raw URL path -> blake3 hex of the registered file
    paths: dict[str, str]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("fuzz")
    model_dir = write_sample_model(root / "fz", vocab_size=50)
    (root / "secret.txt").write_text("must never be served")
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="status-server", daemon=True)
    thread.start()
    server = StatusServer("127.0.0.1", 0, registry=MetadataRegistry())

    async def setup() -> Served:
        await server.start()
        prepared = move_to_self_host(
            from_dir(model_dir, include_extra_files=True),
            server.base_url,
            namespace="ns",
            component="comp",
            endpoint="ep",
        )
        prepared.register(server.registry)
        card = prepared.card
        paths = {}
        for _, f in card.files():
            name = f.basename
            paths[f"/v1/metadata/fz/{name}"] = f.checksum.hex
            paths[f"/v1/metadata/ns/comp/ep/fz/_base/{name}"] = f.checksum.hex
        return Served(server.port, model_dir, paths)

    try:
        yield asyncio.run_coroutine_threadsafe(setup(), loop).result(timeout=60)
    finally:
        asyncio.run_coroutine_threadsafe(server.close(), loop).result(timeout=60)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=60)
        loop.close()


def raw_get(port: int, target: bytes) -> tuple[int | None, bytes]:
    """Status (None when the server closed without answering) and body of one request."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(
            b"GET " + target + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
        )
        chunks = []
        while chunk := sock.recv(1 << 16):
            chunks.append(chunk)
    data = b"".join(chunks)
    if not data:
        return None, b""
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


_NAMES = [
    "fz", "config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json",
    "special_tokens_map.json", "model.safetensors", "secret.txt", "ns", "comp", "ep", "_base",
    "v1", "metadata", "etc", "passwd",
]  # fmt: skip
_TRICKS = [
    "", ".", "..", "...", "%2e%2e", "%2E%2E", ".%2e", "%2e.", "%2f", "%2F", "%5c", "\\", "..\\",
    "%00", "\x00", "%", "%zz", "%252e%252e", "~", "fz%2Fconfig.json", "config.json%00",
    "config.json;x", "CONFIG.JSON", "..%c0%af", "%c0%ae%c0%ae",
    "\uff43\uff4f\uff4e\uff46\uff49\uff47.json",  # fullwidth "config.json"
]  # fmt: skip
_PREFIXES = ["/v1/metadata/", "/v1/metadata", "/", "//", "/v1/metadata//", "", "/v1/./metadata/"]

_text = st.text(
    alphabet=st.characters(exclude_categories=["Cs"], exclude_characters="\r\n"),
    max_size=40,
)
_segment = st.one_of(
    st.sampled_from(_NAMES),
    st.sampled_from(_TRICKS),
    _text,
    st.text(alphabet="a.%/", min_size=200, max_size=400),
)


@st.composite
def raw_targets(draw: st.DrawFn) -> bytes:
    prefix = draw(st.sampled_from(_PREFIXES))
    segments = draw(st.lists(_segment, max_size=8))
    target = prefix + "/".join(segments)
    if draw(st.booleans()):
        target += "?" + draw(_text)
    return target.encode("utf-8")


def _registered(served: Served, target: bytes) -> str | None:
    path = target.split(b"?", 1)[0]
    try:
        return served.paths.get(path.decode("ascii"))
    except UnicodeDecodeError:
        return None


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(target=raw_targets())
def test_fuzzed_raw_paths_never_serve_unregistered_files_or_5xx(
    served: Served, target: bytes
) -> None:
    status, body = raw_get(served.port, target)
    assert status is None or status < 500, (target, status)
    expected = _registered(served, target)
    if status == 200:
        assert expected is not None, target
        assert blake3.blake3(body).hexdigest() == expected
    assert b"must never be served" not in body


@pytest.mark.parametrize("suffix", ["", "?x=1", "?../../secret.txt"])
def test_every_registered_raw_path_is_served(served: Served, suffix: str) -> None:
    for path, expected in served.paths.items():
        status, body = raw_get(served.port, (path + suffix).encode())
        assert status == 200, path
        assert blake3.blake3(body).hexdigest() == expected


# --------------------------------------------------------------------------- near misses


def _encode_all(text: str) -> str:
    return "".join(f"%{b:02X}" for b in text.encode())


@st.composite
def near_misses(draw: st.DrawFn, paths: list[str]) -> bytes:
    """Registered paths bent: encoded, doubled, cased, padded, NUL'd, overlong, unicode."""
    path = draw(st.sampled_from(paths))
    head, _, name = path.rpartition("/")
    bent = draw(
        st.sampled_from(
            [
                f"{head}/{_encode_all(name)}",
                f"{head}/{_encode_all(_encode_all(name))}",
                f"{head}/{name.upper()}",
                f"{head}/{name}/",
                f"{head}/{name}%00",
                f"{head}/{name}\x00.txt",
                f"{head}/./{name}",
                f"{head}/x/../{name}",
                f"{head}/%2e%2e/%2e%2e/{name}",
                f"{head}/..%2f..%2fsecret.txt",
                f"{head}/%c0%ae%c0%ae/secret.txt",
                f"{head}/{name}" + "A" * draw(st.integers(200, 20_000)),
                f"{head}/" + "\u202e\u0301\ufeff" + name,
                f"{head}//{name}",
                f"{head}\\{name}",
                f"{head}/{name};.json",
            ]
        )
    )
    return bent.encode("utf-8", "surrogatepass")


@settings(
    max_examples=2_000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=st.data())
def test_2000_fuzzed_paths_never_serve_an_unregistered_file_or_a_5xx(
    served: Served,
    data: st.DataObject,
) -> None:
    target = data.draw(raw_targets() | near_misses(sorted(served.paths)))
    status, body = raw_get(served.port, target)
    assert status is None or status < 500, (target[:200], status)
    if status == 200:
        # Only ever the bytes of a registered file, never anything else on the disk.
        assert blake3.blake3(body).hexdigest() in set(served.paths.values()), target[:200]
    assert b"must never be served" not in body
