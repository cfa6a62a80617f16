"""Worker/frontend interop with the real NVIDIA Dynamo 1.6.1 runtime, both ways (``-m dynamo``).

One etcd, one Dynamo frontend (``python -m dynamo.frontend``, cold ``$HOME``) and one of our
frontends (``python -m discovery_mdc frontend``, cold ``--cache-dir``) are shared by the
module. Every test uses its own namespace and model name, so tests never see each other's
workers; every worker is a real process, stopped with SIGTERM by its PID.

- Dynamo worker -> our frontend: listed, every slot and extra file cached, and the
  ``by-slug/<slug>/<mdcsum>`` dir equals the Dynamo frontend's and Dynamo's own ``local_dir()``.
- Our worker -> Dynamo frontend: listed, and Dynamo's cache holds our bytes (blobs named by
  blake3) for a self-hosted card and for local-path cards (``--no-self-host`` and
  ``DYN_SELF_HOST_METADATA=0``).
- Mixed replicas: a Dynamo worker and ours on the same model dir join one worker set in both
  frontends, when both self-host and when neither does; with different self-hosting settings
  they cannot (by design: only self-hosted cards carry ``extra_files``, which are hashed).
- Stop: SIGTERM on either worker drops its instance from both frontends; the model goes with
  the last one.
"""

from __future__ import annotations

import json
import re
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import blake3
import pytest

from discovery_mdc._sample import write_sample_model
from discovery_mdc.card import ModelDeploymentCard, decode_envelope, mdcsum
from discovery_mdc.etcd import EtcdServer
from testkit import Process, free_port, wait_until_sync
from testkit.dynamo import (
    dynamo_env,
    dynamo_instances,
    dynamo_model_workers,
    ensure_dynamo_venv,
    etcd_get_prefix,
    free_port_below_32768,
    http_json,
    list_models,
    oracle_local_dirs,
    raw_card_json,
    read_port_file,
    start_dynamo_frontend,
    start_dynamo_worker,
    start_our_frontend,
    start_our_worker,
    wait_for_keys,
    wait_for_models,
)

pytestmark = [pytest.mark.dynamo, pytest.mark.timeout(240)]

# Generous: the machine is shared; these are deadlines for polling, never sleeps.
DEADLINE = 90.0
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


@dataclass(frozen=True)
class Stack:
    """The module's shared etcd and the two frontends."""

    peer: Path
    etcd_url: str
    work: Path
    dyn_fe: Process
    dyn_port: int
    dyn_home: Path
    our_fe: Process
    our_port: int
    our_cache: Path

    @property
    def dyn_cache(self) -> Path:
        return self.dyn_home / ".cache" / "dynamo" / "mdc"

    def dyn_log(self) -> str:
        return _ANSI.sub("", (self.work / "dynamo-frontend.log").read_text(errors="replace"))

    def our_log(self) -> str:
        return (self.work / "our-frontend.log").read_text(errors="replace")


@pytest.fixture(scope="module")
def stack(shared_etcd: EtcdServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    peer = ensure_dynamo_venv()
    work = tmp_path_factory.mktemp("dynamo-interop")
    url = shared_etcd.client_url
    home = work / "dynamo-frontend-home"
    home.mkdir()
    dyn_port = free_port()
    dyn_fe = start_dynamo_frontend(
        peer, dynamo_env(url, home), dyn_port, log=work / "dynamo-frontend.log"
    )
    our_fe = start_our_frontend(
        url, work / "our-cache", work / "our-port", log=work / "our-frontend.log"
    )
    try:
        our_port = read_port_file(work / "our-port", timeout=DEADLINE, proc=our_fe)
        wait_until_sync(
            lambda: list_models(dyn_port) is not None,
            timeout=DEADLINE,
            message="the Dynamo frontend to serve /v1/models",
            proc=dyn_fe,
        )
        wait_until_sync(
            lambda: list_models(our_port) is not None,
            timeout=DEADLINE,
            message="our frontend to serve /v1/models",
            proc=our_fe,
        )
        yield Stack(peer, url, work, dyn_fe, dyn_port, home, our_fe, our_port, work / "our-cache")
    finally:
        dyn_fe.stop()
        our_fe.stop()


@pytest.fixture
def spawned() -> Iterator[Callable[[Process], Process]]:
    """Track worker processes a test starts; any still running are stopped (by PID) after."""
    procs: list[Process] = []

    def track(proc: Process) -> Process:
        procs.append(proc)
        return proc

    yield track
    for proc in procs:
        proc.stop()


# --------------------------------------------------------------------------- helpers


def _model_dir(path: Path, seed: int) -> Path:
    """A sample model Dynamo's frontend loads, with extra files Dynamo self-hosts
    (``added_tokens.json``, ``tokenizer.model``) and ones it never publishes."""
    model = write_sample_model(path, vocab_size=64, seed=seed)
    (model / "added_tokens.json").write_text(json.dumps({"<pad>": 64}))
    (model / "tokenizer.model").write_bytes(bytes(range(256)) * 3)
    (model / "README.md").write_text("# not published by Dynamo or by us\n")
    (model / ".hidden").write_text("hidden\n")
    (model / "model.safetensors").write_bytes(b"\0" * 128)
    (model / "sub").mkdir()
    (model / "sub" / "nested.json").write_text("{}")
    return model


def _cards(etcd_url: str, namespace: str) -> dict[str, tuple[ModelDeploymentCard, bytes]]:
    """``{key: (card, raw value)}`` under ``v1/mdc/<namespace>/``."""
    kvs = etcd_get_prefix(etcd_url, f"v1/mdc/{namespace}/")
    return {k: (decode_envelope(v).card, v) for k, v in kvs.items()}


def _wait_cards(
    etcd_url: str, namespace: str, count: int, *procs: Process
) -> dict[str, tuple[ModelDeploymentCard, bytes]]:
    for proc in procs:
        wait_for_keys(etcd_url, f"v1/mdc/{namespace}/", 1, timeout=DEADLINE, proc=proc)
    wait_for_keys(etcd_url, f"v1/mdc/{namespace}/", count, timeout=DEADLINE)
    return _cards(etcd_url, namespace)


def _blake3(path: Path) -> str:
    return str(blake3.blake3(path.read_bytes()).hexdigest())


def _our_model(stack: Stack, name: str) -> dict[str, Any] | None:
    quoted = urllib.parse.quote(name, safe="")
    try:
        body: dict[str, Any] = http_json(f"http://127.0.0.1:{stack.our_port}/v1/models/{quoted}")
    except OSError:
        return None
    return body


def _wait_our_instances(stack: Stack, name: str, keys: set[str]) -> dict[str, Any]:
    """Wait until our frontend shows ``name`` as one ready worker set with exactly ``keys``."""

    def check() -> dict[str, Any] | None:
        body = _our_model(stack, name)
        if body is None or len(body["worker_sets"]) != 1:
            return None
        ws: dict[str, Any] = body["worker_sets"][0]
        return ws if ws["ready"] and set(ws["instances"]) == keys else None

    ws: dict[str, Any] = wait_until_sync(
        check,
        timeout=DEADLINE,
        message=f"our frontend: {name!r} as one ready worker set with {sorted(keys)}",
        proc=stack.our_fe,
    )
    return ws


def _wait_dynamo_workers(stack: Stack, name: str, expected: dict[str, int]) -> None:
    wait_until_sync(
        lambda: dynamo_model_workers(stack.dyn_port, name) == expected,
        timeout=DEADLINE,
        message=f"Dynamo frontend: {name!r} admitted workers == {expected}",
        proc=stack.dyn_fe,
    )


def _wait_gone(stack: Stack, name: str) -> None:
    wait_for_models(stack.dyn_port, [name], present=False, timeout=DEADLINE, proc=stack.dyn_fe)
    wait_for_models(stack.our_port, [name], present=False, timeout=DEADLINE, proc=stack.our_fe)
    assert _our_model(stack, name) is None


def _dyn_instance_ids(stack: Stack, namespace: str) -> set[int]:
    return {
        int(i["instance_id"])
        for i in dynamo_instances(stack.dyn_port)
        if i.get("namespace") == namespace
    }


def _check_cached(card: ModelDeploymentCard, cache_dir: Path, model: Path) -> None:
    """Every file of ``card`` is in ``cache_dir`` under its name, with the card's blake3 and
    the source bytes."""
    for slot, f in card.files():
        cached = cache_dir / f.basename
        assert cached.is_file(), f"{slot} {f.basename} missing from {cache_dir}"
        assert _blake3(cached) == f.checksum.hex, slot
        assert cached.read_bytes() == (model / f.basename).read_bytes(), slot


def _oracle_dir(stack: Stack, raw_values: list[bytes]) -> list[str]:
    """Dynamo's own ``by-slug/<slug>/<mdcsum>`` for each envelope (its Rust code)."""
    return [
        "/".join(Path(d).parts[-2:])
        for d in oracle_local_dirs([raw_card_json(v) for v in raw_values], stack.peer)
    ]


# --------------------------------------------------------------------------- Dynamo -> ours


@pytest.mark.parametrize("mode", ["selfhost", "local"])
def test_dynamo_worker_to_our_frontend(
    stack: Stack,
    spawned: Callable[[Process], Process],
    tmp_path: Path,
    mode: str,
) -> None:
    ns, name = f"d2o{mode}", f"dynamo-to-ours-{mode}"
    model = _model_dir(tmp_path / "model", seed=11)
    home = tmp_path / "worker-home"
    home.mkdir()
    sysport = free_port_below_32768() if mode == "selfhost" else None
    worker = spawned(
        start_dynamo_worker(
            stack.peer,
            dynamo_env(stack.etcd_url, home, system_port=sysport),
            model,
            name,
            endpoint=f"{ns}.backend.generate",
            log=tmp_path / "dynamo-worker.log",
            workdir=home,
        )
    )
    ((key, (card, raw)),) = _wait_cards(stack.etcd_url, ns, 1, worker).items()
    assert card.display_name == name
    # Dynamo publishes extra_files only when it self-hosts.
    expected_extras = {"added_tokens.json", "tokenizer.model", "special_tokens_map.json"}
    if mode == "selfhost":
        assert {f.basename for f in card.extra_files} >= expected_extras
        assert all(f.is_url for _, f in card.files())
    else:
        assert card.extra_files == ()
        assert all(not f.is_url for _, f in card.files())
    wanted = f"{card.slug}/{mdcsum(card)}"

    # Our frontend: listed, one worker set with this instance only, every file cached.
    wait_for_models(stack.our_port, [name], timeout=DEADLINE, proc=stack.our_fe)
    ws = _wait_our_instances(stack, name, {key})
    ours = Path(ws["local_dir"])
    assert ours.relative_to(stack.our_cache / "by-slug").as_posix() == wanted
    assert ws["mdcsum"] == mdcsum(card)
    _check_cached(card, ours, model)
    assert sorted(p.name for p in ours.iterdir()) == sorted(f.basename for _, f in card.files())

    # The Dynamo frontend caches the same worker under the same dir name; so does its oracle.
    wait_for_models(stack.dyn_port, [name], timeout=DEADLINE, proc=stack.dyn_fe)
    dyn_dirs = [
        p.relative_to(stack.dyn_cache / "by-slug").as_posix()
        for p in (stack.dyn_cache / "by-slug" / card.slug).iterdir()
    ]
    assert dyn_dirs == [wanted]
    assert _oracle_dir(stack, [raw]) == [wanted]

    # Stop: SIGTERM drops the model from both frontends.
    worker.stop()
    _wait_gone(stack, name)


# --------------------------------------------------------------------------- ours -> Dynamo


@pytest.mark.parametrize("mode", ["selfhost", "no-self-host", "env-off"])
def test_our_worker_to_dynamo_frontend(
    stack: Stack,
    spawned: Callable[[Process], Process],
    tmp_path: Path,
    mode: str,
) -> None:
    ns, name = f"o2d{mode.replace('-', '')}", f"ours-to-dynamo-{mode}"
    model = _model_dir(tmp_path / "model", seed=23)
    # The transport our application would serve; Dynamo lists without connecting to it.
    transport = f"127.0.0.1:{free_port()}/{ns}/backend/generate"
    worker = spawned(
        start_our_worker(
            stack.etcd_url,
            model,
            name,
            namespace=ns,
            system_port=0,
            self_host=False if mode == "no-self-host" else None,
            env_extra={"DYN_SELF_HOST_METADATA": "0"} if mode == "env-off" else None,
            instance_transport=f"tcp://{transport}",
            log=tmp_path / "our-worker.log",
        )
    )
    ((key, (card, raw)),) = _wait_cards(stack.etcd_url, ns, 1, worker).items()
    envelope = decode_envelope(raw)
    # The Endpoint record on the same lease, keyed and shaped as Dynamo's own.
    records = wait_for_keys(stack.etcd_url, f"v1/instances/{ns}/", 1, timeout=DEADLINE)
    assert list(records) == [f"v1/instances/{ns}/backend/generate/{envelope.instance_id:x}"]
    assert json.loads(next(iter(records.values()))) == {
        "type": "Endpoint",
        "component": "backend",
        "endpoint": "generate",
        "namespace": ns,
        "instance_id": envelope.instance_id,
        "transport": {"tcp": transport},
    }
    if mode == "selfhost":
        assert all(f.path.startswith("http://127.0.0.1:") for _, f in card.files())
        assert {f.basename for f in card.extra_files} >= {"added_tokens.json", "tokenizer.model"}
    else:
        assert all(f.path == str(model / f.basename) for _, f in card.files())
        assert card.extra_files == ()
    wanted = f"{card.slug}/{mdcsum(card)}"
    assert _oracle_dir(stack, [raw]) == [wanted]

    # The Dynamo frontend lists it, routes to our record, and caches our bytes.
    wait_for_models(stack.dyn_port, [name], timeout=DEADLINE, proc=stack.dyn_fe)
    _wait_dynamo_workers(stack, name, {ns: 1})
    (listed,) = [
        i for i in dynamo_instances(stack.dyn_port) if i["instance_id"] == envelope.instance_id
    ]
    assert listed["transport"] == {"tcp": transport}
    dyn_dir = stack.dyn_cache / "by-slug" / card.slug / mdcsum(card)
    assert [p.name for p in dyn_dir.parent.iterdir()] == [dyn_dir.name]
    _check_cached(card, dyn_dir, model)
    for _, f in card.files():
        blob = (dyn_dir / f.basename).resolve()
        assert blob == (stack.dyn_cache / "blobs" / f.checksum.hex).resolve()
        assert _blake3(blob) == f.checksum.hex
    names = {p.name for p in dyn_dir.iterdir()}
    card_names = {f.basename for _, f in card.files()}
    if mode == "selfhost":
        assert names == card_names
    else:
        # For a local-path card Dynamo also links the dir's other non-weight files, unverified.
        assert names >= card_names

    # Our frontend lists the same card and ignores the v1/instances/ record beside it.
    ws = _wait_our_instances(stack, name, {key})
    assert Path(ws["local_dir"]).relative_to(stack.our_cache / "by-slug").as_posix() == wanted

    # Stop: SIGTERM revokes the lease; both frontends drop the model, etcd holds nothing.
    assert worker.stop() == 0
    _wait_gone(stack, name)
    assert etcd_get_prefix(stack.etcd_url, f"v1/instances/{ns}/") == {}
    assert ns not in {i.get("namespace") for i in dynamo_instances(stack.dyn_port)}


# --------------------------------------------------------------------------- mixed replicas


@pytest.mark.parametrize(
    ("mode", "first_to_stop"), [("selfhost", "ours"), ("local", "dynamo")]
)  # fmt: skip
def test_mixed_replicas_share_one_worker_set(
    stack: Stack,
    spawned: Callable[[Process], Process],
    tmp_path: Path,
    mode: str,
    first_to_stop: str,
) -> None:
    ns, name = f"mix{mode}", f"mixed-{mode}"
    model = _model_dir(tmp_path / "model", seed=37)
    model_path = str(model)  # the identical string to both: source_path is hashed as given
    home = tmp_path / "worker-home"
    home.mkdir()
    selfhost = mode == "selfhost"
    our_transport = f"127.0.0.1:{free_port()}/{ns}/backend/generate"
    dyn = spawned(
        start_dynamo_worker(
            stack.peer,
            dynamo_env(
                stack.etcd_url, home, system_port=free_port_below_32768() if selfhost else None
            ),
            model_path,
            name,
            endpoint=f"{ns}.backend.generate",
            log=tmp_path / "dynamo-worker.log",
            workdir=home,
        )
    )
    ours = spawned(
        start_our_worker(
            stack.etcd_url,
            model_path,
            name,
            namespace=ns,
            system_port=0 if selfhost else None,
            instance_transport=f"tcp://{our_transport}",
            log=tmp_path / "our-worker.log",
        )
    )
    cards = _wait_cards(stack.etcd_url, ns, 2, dyn, ours)
    (sums,) = [{mdcsum(c) for c, _ in cards.values()}]
    assert len(sums) == 1, "the two workers must publish the same mdcsum"
    for card, _ in cards.values():
        assert card.source_path == model_path
        assert bool(card.extra_files) == selfhost
    (card, _) = next(iter(cards.values()))
    wanted = f"{card.slug}/{sums.pop()}"
    assert _oracle_dir(stack, [raw for _, raw in cards.values()]) == [wanted, wanted]
    by_lease = {decode_envelope(raw).instance_id: key for key, (_, raw) in cards.items()}
    records = wait_for_keys(stack.etcd_url, f"v1/instances/{ns}/", 2, timeout=DEADLINE)
    transports = {
        json.loads(v)["instance_id"]: json.loads(v)["transport"]["tcp"] for v in records.values()
    }
    assert set(transports) == set(by_lease)
    (our_id,) = [iid for iid, tcp in transports.items() if tcp == our_transport]
    (dyn_id,) = set(by_lease) - {our_id}

    # Ours: one worker set, both instances, one cache dir.
    ws = _wait_our_instances(stack, name, set(cards))
    assert Path(ws["local_dir"]).relative_to(stack.our_cache / "by-slug").as_posix() == wanted
    # Dynamo: both admitted into the model's worker set (a card with another mdcsum would be
    # rejected and not counted), both Endpoint records known, one cache dir.
    _wait_dynamo_workers(stack, name, {ns: 2})
    assert _dyn_instance_ids(stack, ns) == {dyn_id, our_id}
    assert f"model={name} " not in "".join(
        ln for ln in stack.dyn_log().splitlines(True) if "Rejected incompatible" in ln
    )
    assert [p.name for p in (stack.dyn_cache / "by-slug" / card.slug).iterdir()] == [
        wanted.split("/")[1]
    ]

    # Stop one: both frontends drop exactly its instance and keep serving the model.
    first, second = (ours, dyn) if first_to_stop == "ours" else (dyn, ours)
    gone_id = our_id if first_to_stop == "ours" else dyn_id
    first.stop()
    _wait_our_instances(stack, name, {by_lease[i] for i in by_lease if i != gone_id})
    _wait_dynamo_workers(stack, name, {ns: 1})
    wait_until_sync(
        lambda: _dyn_instance_ids(stack, ns) == set(by_lease) - {gone_id},
        timeout=DEADLINE,
        message="the Dynamo frontend to drop the stopped instance",
        proc=stack.dyn_fe,
    )
    assert name in list_models(stack.dyn_port)
    assert name in list_models(stack.our_port)

    # Stop the last: the model disappears from both.
    second.stop()
    _wait_gone(stack, name)
    assert dynamo_model_workers(stack.dyn_port, name) == {}


def test_mixed_self_host_settings_split_by_design(
    stack: Stack,
    spawned: Callable[[Process], Process],
    tmp_path: Path,
) -> None:
    """A self-hosting replica and a local-path replica of a dir with extra files have two
    mdcsums (only the self-hosted card lists ``extra_files``), so both frontends keep the
    first worker set and reject the other: by design in Dynamo, and matched by us."""
    ns, name = "mixsplit", "mixed-split"
    model = _model_dir(tmp_path / "model", seed=41)
    home = tmp_path / "worker-home"
    home.mkdir()
    dyn = spawned(
        start_dynamo_worker(
            stack.peer,
            dynamo_env(stack.etcd_url, home, system_port=free_port_below_32768()),
            str(model),
            name,
            endpoint=f"{ns}.backend.generate",
            log=tmp_path / "dynamo-worker.log",
            workdir=home,
        )
    )
    ((dyn_key, (dyn_card, _)),) = _wait_cards(stack.etcd_url, ns, 1, dyn).items()
    _wait_our_instances(stack, name, {dyn_key})
    _wait_dynamo_workers(stack, name, {ns: 1})
    ours = spawned(
        start_our_worker(
            stack.etcd_url,
            str(model),
            name,
            namespace=ns,
            system_port=None,
            instance_transport=f"tcp://127.0.0.1:{free_port()}/{ns}/backend/generate",
            log=tmp_path / "our-worker.log",
        )
    )
    cards = _wait_cards(stack.etcd_url, ns, 2, ours)
    (our_key,) = set(cards) - {dyn_key}
    assert mdcsum(cards[our_key][0]) != mdcsum(dyn_card)
    # Both frontends say so in their logs, and keep the incumbent set with one instance.
    wait_until_sync(
        lambda: f"rejected instance {our_key}" in stack.our_log(),
        timeout=DEADLINE,
        message="our frontend to reject the local-path replica",
        proc=stack.our_fe,
    )
    wait_until_sync(
        lambda: any(
            "Rejected incompatible" in ln and f"model={name} " in ln
            for ln in stack.dyn_log().splitlines()
        ),
        timeout=DEADLINE,
        message="the Dynamo frontend to reject the local-path replica",
        proc=stack.dyn_fe,
    )
    _wait_our_instances(stack, name, {dyn_key})
    assert dynamo_model_workers(stack.dyn_port, name) == {ns: 1}
    ours.stop()
    dyn.stop()
    _wait_gone(stack, name)
