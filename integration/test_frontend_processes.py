"""The frontend as a real process against real etcd and real worker processes.

Covers the must-hold list of the frontend: cold start, replicas and rejection, removal on a
graceful stop, an etcd restart, compaction while cut off (through a proxy), bad input,
namespace filtering, a cache shared by two frontends, and ``discovery-mdc ls``.

One etcd serves the module; tests use their own namespaces and model names so they never see
each other's keys (the restart test has its own etcd). Every process is stopped by PID in a
fixture finalizer: SIGTERM, then SIGKILL after a deadline. Conditions are polled, never slept
for.
"""

from __future__ import annotations

import asyncio
import itertools
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from discovery_mdc._sample import write_sample_model
from discovery_mdc.card import (
    ModelDeploymentCard,
    ModelEnvelope,
    card_key,
    decode_envelope,
    encode_envelope,
    from_dir,
    hash_file,
    mdcsum,
)
from discovery_mdc.etcd import EtcdClient, EtcdServer
from testkit import (
    FrontendProcess,
    Process,
    Spawn,
    TcpProxy,
    WorkerProcess,
    card_keys,
    child_env,
    publish,
    published_card,
    run_cli,
    start_frontend,
    wait_until,
)

DEADLINE = 60.0  # generous: the machine is shared with other test runs
LEASE_TTL = "3"
_instance_ids = itertools.count(0x7E57000)


async def put_card(etcd: EtcdClient, namespace: str, card: ModelDeploymentCard) -> str:
    """Publish ``card`` directly (no worker, no lease) under a fresh instance id; its key."""
    return await publish(etcd, next(_instance_ids), card, namespace)


# --------------------------------------------------------------------------- processes


async def start_worker(
    spawn: Spawn,
    etcd_url: str,
    model_dir: Path,
    name: str,
    namespace: str,
    *,
    cwd: Path | None = None,
) -> tuple[WorkerProcess, str]:
    """A worker publishing ``model_dir`` (relative to ``cwd`` when given: the card's
    source_path is the path as given, and it is part of the mdcsum), and its card key."""
    worker = spawn(
        "--etcd", etcd_url, "--model-path", str(model_dir), "--model-name", name,
        "--namespace", namespace, "--lease-ttl", LEASE_TTL,
        env=child_env(DYN_SYSTEM_HOST="127.0.0.1", DYN_SYSTEM_PORT="0"), cwd=cwd,
    )  # fmt: skip
    return worker, (await worker.wait_registered(timeout=DEADLINE)).key


async def stopped(*workers: WorkerProcess) -> list[int]:
    """SIGTERM each worker at once; their exit codes."""
    for w in workers:
        w.signal(signal.SIGTERM)
    return [await w.wait_exit(DEADLINE) for w in workers]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def model_dirs(tmp_path: Path) -> Callable[..., Path]:
    def make(name: str, **kwargs: Any) -> Path:
        return write_sample_model(tmp_path / "models" / name, vocab_size=300, **kwargs)

    return make


def card_files(card: ModelDeploymentCard) -> dict[str, str]:
    """basename -> blake3 hex of every file of ``card``."""
    return {f.basename: f.checksum.hex for _, f in card.files()}


def local_card(model_dir: Path, name: str) -> ModelDeploymentCard:
    return from_dir(model_dir).replace(display_name=name)


# --------------------------------------------------------------------------- tests


async def test_cold_start_lists_the_model_with_every_file_cached_and_verified(
    shared_etcd: EtcdServer,
    shared_client: EtcdClient,
    procs: list[Process],
    spawn: Spawn,
    model_dirs: Callable[..., Path],
    tmp_path: Path,
) -> None:
    model_dir = model_dirs("cold")
    worker, key = await start_worker(spawn, shared_etcd.client_url, model_dir, "org/cold", "cold")
    kv = await shared_client.get(key)
    assert kv is not None
    card = decode_envelope(kv.value).card
    assert all(
        f.path.startswith(f"http://127.0.0.1:{worker.status_port()}/") for _, f in card.files()
    )

    # `ls` lists the card and fetches nothing.
    ls = await asyncio.to_thread(run_cli, "ls", "--etcd", shared_etcd.client_url)
    assert ls.returncode == 0, ls.stderr
    [row] = [line.split() for line in ls.stdout.splitlines() if key in line]
    assert row == [key, "org/cold", mdcsum(card), f"{kv.lease:x}"]
    assert ls.stdout.splitlines()[0].split() == ["KEY", "MODEL", "MDCSUM", "LEASE"]
    assert await worker.metadata_gets() == 0

    fe = await start_frontend(
        shared_etcd.client_url,
        tmp_path,
        procs,
        cache_dir=tmp_path / "cache",
        extra_args=("--namespace", "cold"),
    )
    await wait_until(lambda: fe.model_ids(), timeout=DEADLINE, message=fe.describe)
    assert await fe.model_ids() == {"org/cold"}
    info = await fe.details("org/cold")
    assert info is not None
    [ws] = info["worker_sets"]
    assert ws["instances"] == [key] and ws["mdcsum"] == mdcsum(card)
    link_dir = tmp_path / "cache" / "by-slug" / card.slug / mdcsum(card)
    assert Path(ws["local_dir"]) == link_dir
    expected = card_files(card)
    assert sorted(p.name for p in link_dir.iterdir()) == sorted(expected)
    for name, hexdigest in expected.items():
        assert hash_file(link_dir / name)[0].hex == hexdigest == hash_file(model_dir / name)[0].hex
    assert await worker.metadata_gets() == len(expected)
    assert await fe.metric("discovery_mdc_fetched_bytes_total") == sum(
        (model_dir / n).stat().st_size for n in expected
    )
    assert "model 'org/cold' added" in fe.log()

    # Removal: a graceful stop revokes the lease; the model leaves within 2 s of the exit.
    assert await stopped(worker) == [0]
    await wait_until(
        lambda: _empty(fe.model_ids()), timeout=2.0, interval=0.05, message=fe.describe
    )
    assert "model 'org/cold' removed" in fe.log()


async def _empty(ids: Any) -> bool:
    return not await ids


async def test_replicas_form_one_worker_set_and_a_different_tokenizer_is_rejected(
    shared_etcd: EtcdServer,
    shared_client: EtcdClient,
    procs: list[Process],
    spawn: Spawn,
    model_dirs: Callable[..., Path],
    tmp_path: Path,
) -> None:
    url = shared_etcd.client_url
    fe = await start_frontend(
        url,
        tmp_path,
        procs,
        cache_dir=tmp_path / "cache",
        extra_args=("--namespace", "rep"),
    )
    # Two replicas with identical files in separate copies, as on two hosts that both keep
    # the model at ./model (the same source_path, so the same mdcsum).
    hosts = {h: tmp_path / f"host-{h}" for h in "abc"}
    for h, root in hosts.items():
        write_sample_model(root / "model", vocab_size=300, seed=1 if h == "c" else 0)
    model = Path("model")
    (a, a_key), (b, b_key) = await asyncio.gather(
        start_worker(spawn, url, model, "org/rep", "rep", cwd=hosts["a"]),
        start_worker(spawn, url, model, "org/rep", "rep", cwd=hosts["b"]),
    )

    async def both_listed() -> bool:
        return await fe.instances("org/rep") == {a_key, b_key}

    await wait_until(both_listed, timeout=DEADLINE, message=fe.describe)
    info = await fe.details("org/rep")
    assert info is not None and len(info["worker_sets"]) == 1
    n_files = len(card_files(await published_card(shared_client, a_key)))
    assert n_files == len(card_files(await published_card(shared_client, b_key))) >= 4
    served = await a.metadata_gets() + await b.metadata_gets()
    assert served == n_files

    # A third replica with the same name and another tokenizer is rejected.
    c, c_key = await start_worker(spawn, url, model, "org/rep", "rep", cwd=hosts["c"])
    await wait_until(
        lambda: f"rejected instance {c_key}" in fe.log(),
        timeout=DEADLINE,
        message=fe.describe,
    )
    assert await fe.metric("discovery_mdc_rejected_instances_total", model="org/rep") == 1
    assert await fe.instances("org/rep") == {a_key, b_key}
    assert await c.metadata_gets() == 0

    # Stop every replica (the rejected one first, so it is never admitted in their place).
    assert await stopped(c) == [0]
    assert await stopped(a, b) == [0, 0]
    await wait_until(
        lambda: _empty(fe.model_ids()), timeout=2.0, interval=0.05, message=fe.describe
    )
    assert c_key not in str(await fe.details("org/rep"))


async def test_etcd_restart_lists_new_models_and_drops_models_deleted_meanwhile(
    etcd_server_factory: Callable[..., EtcdServer],
    procs: list[Process],
    spawn: Spawn,
    model_dirs: Callable[..., Path],
    tmp_path: Path,
) -> None:
    server = etcd_server_factory()
    async with EtcdClient([server.client_url]) as etcd:
        stays = await put_card(etcd, "rs", local_card(model_dirs("rs-stays"), "org/rs-stays"))
        goes = await put_card(etcd, "rs", local_card(model_dirs("rs-goes"), "org/rs-goes"))
        fe = await start_frontend(server.client_url, tmp_path, procs, cache_dir=tmp_path / "cache")

        async def listed(expected: set[str]) -> bool:
            return await fe.model_ids() == expected

        await wait_until(lambda: listed({"org/rs-stays", "org/rs-goes"}), timeout=DEADLINE)

        await asyncio.to_thread(server.stop)
        await wait_until(lambda: "watch on v1/mdc/ lost" in fe.log(), timeout=DEADLINE)
        await asyncio.to_thread(server.start)
        await etcd.delete(goes)
        _, key = await start_worker(
            spawn, server.client_url, model_dirs("rs-new"), "org/rs-new", "rs"
        )

        await wait_until(
            lambda: listed({"org/rs-stays", "org/rs-new"}),
            timeout=DEADLINE,
            message=fe.describe,
        )
        assert await fe.instances() == {stays, key} == await card_keys(etcd, "v1/mdc/")
        assert await fe.metric("discovery_mdc_watch_reconnects_total") >= 1


async def test_compaction_while_cut_off_converges_to_exactly_what_etcd_holds(
    shared_etcd: EtcdServer,
    shared_client: EtcdClient,
    procs: list[Process],
    spawn: Spawn,
    model_dirs: Callable[..., Path],
    tmp_path: Path,
) -> None:
    ns = "cmp"
    cards = {n: local_card(model_dirs(f"cmp-{n}"), f"org/cmp-{n}") for n in "abcde"}
    a1 = await put_card(shared_client, ns, cards["a"])
    a2 = await put_card(shared_client, ns, cards["a"])
    b1 = await put_card(shared_client, ns, cards["b"])
    await put_card(shared_client, ns, cards["c"])
    prefix = f"v1/mdc/{ns}/"
    with TcpProxy("127.0.0.1", shared_etcd.client_port) as proxy:
        # A large reconcile interval: only the compaction path can repair what follows.
        fe = await start_frontend(
            proxy.url,
            tmp_path,
            procs,
            cache_dir=tmp_path / "cache",
            extra_args=("--namespace", ns, "--reconcile-interval", "3600"),
        )

        async def converged() -> bool:
            return await fe.instances() == await card_keys(shared_client, prefix)

        await wait_until(converged, timeout=DEADLINE, message=fe.describe)
        assert await fe.model_ids() == {"org/cmp-a", "org/cmp-b", "org/cmp-c"}

        proxy.cut()
        await wait_until(lambda: "watch on v1/mdc/cmp/ lost" in fe.log(), timeout=DEADLINE)
        await shared_client.delete(a1)  # a keeps one replica
        await shared_client.delete(b1)  # b goes entirely
        await put_card(shared_client, ns, cards["c"])  # c gains a replica
        await put_card(shared_client, ns, cards["d"])  # d is new
        gone = await put_card(shared_client, ns, cards["e"])  # e comes and goes unseen
        await shared_client.delete(gone)
        revision = (await shared_client.range_prefix_all(prefix)).revision
        await shared_client.compact(revision)
        proxy.restore()

        await wait_until(
            lambda: "hit compaction" in fe.log(), timeout=DEADLINE, message=fe.describe
        )
        await wait_until(converged, timeout=DEADLINE, message=fe.describe)
        assert await fe.model_ids() == {"org/cmp-a", "org/cmp-c", "org/cmp-d"}
        assert await fe.instances("org/cmp-a") == {a2}
        assert await fe.metric("discovery_mdc_relists_total", reason="compaction") >= 1
        assert await fe.metric("discovery_mdc_relists_total", reason="reconcile") == 0


async def test_malformed_values_and_bad_checksums_are_skipped_counted_and_logged(
    shared_etcd: EtcdServer,
    shared_client: EtcdClient,
    procs: list[Process],
    spawn: Spawn,
    model_dirs: Callable[..., Path],
    tmp_path: Path,
) -> None:
    ns = "bad"
    garbage_key = card_key(ns, "backend", "generate", next(_instance_ids))
    await shared_client.put(garbage_key, b"\x00 this is not a card")
    # A checksum that is not blake3 hex: the card does not decode.
    good_card = local_card(model_dirs("bad-syntax"), "org/bad-syntax")
    hexdigest = next(iter(card_files(good_card).values()))
    raw = encode_envelope(
        ModelEnvelope(
            namespace=ns, component="backend", endpoint="generate", instance_id=1, card=good_card
        )
    ).replace(hexdigest.encode(), b"not-a-checksum", 1)
    syntax_key = card_key(ns, "backend", "generate", next(_instance_ids))
    await shared_client.put(syntax_key, raw)
    # A well-formed checksum that the file does not match: the pipeline rejects the bytes.
    tampered_dir = model_dirs("bad-sum")
    tampered = local_card(tampered_dir, "org/bad-sum")
    (tampered_dir / "tokenizer_config.json").write_text('{"tampered": true}')
    tampered_key = await put_card(shared_client, ns, tampered)
    ok_key = await put_card(shared_client, ns, local_card(model_dirs("bad-ok"), "org/bad-ok"))

    fe = await start_frontend(
        shared_etcd.client_url,
        tmp_path,
        procs,
        cache_dir=tmp_path / "cache",
        extra_args=("--namespace", ns),
    )
    await wait_until(lambda: fe.model_ids(), timeout=DEADLINE, message=fe.describe)

    async def tampered_failed() -> bool:
        return await fe.metric("discovery_mdc_pipelines_total", result="failed") >= 1

    await wait_until(tampered_failed, timeout=DEADLINE, message=fe.describe)
    assert await fe.model_ids() == {"org/bad-ok"}
    assert await fe.instances() == {ok_key}
    assert await fe.metric("discovery_mdc_malformed_cards_total") == 2
    log = fe.log()
    assert f"skipping malformed card at {garbage_key}" in log
    assert f"skipping malformed card at {syntax_key}" in log
    assert "model 'org/bad-sum'" in log and "not ready" in log
    assert tampered_key not in await fe.instances()
    # The tampered bytes never entered blobs/, and every blob there is what its name says.
    blobs = tmp_path / "cache" / "blobs"
    assert not (blobs / hash_file(tampered_dir / "tokenizer_config.json")[0].hex).exists()
    assert all(hash_file(b)[0].hex == b.name for b in blobs.iterdir())


async def test_namespace_filters_admit_exact_prefix_and_global(
    shared_etcd: EtcdServer,
    shared_client: EtcdClient,
    procs: list[Process],
    spawn: Spawn,
    model_dirs: Callable[..., Path],
    tmp_path: Path,
) -> None:
    card = local_card(model_dirs("flt"), "org/flt")
    by_ns = {
        ns: await put_card(shared_client, ns, card.replace(display_name=f"org/flt-{ns}"))
        for ns in ("ns1", "ns10", "other")
    }
    url = shared_etcd.client_url
    cache = tmp_path / "cache"
    flags = {"exact": ("--namespace", "ns1"), "prefix": ("--namespace-prefix", "ns1"), "global": ()}
    fes = [
        FrontendProcess(url, tmp=tmp_path, cache_dir=cache, extra_args=args, name=name)
        for name, args in flags.items()
    ]
    procs.extend(fes)
    for fe in fes:
        await fe.wait_listening()
    exact, prefix, global_ = fes

    async def lists(fe: FrontendProcess, expected: set[str]) -> bool:
        return expected <= await fe.model_ids()

    for fe, expected in (
        (exact, {"org/flt-ns1"}),
        (prefix, {"org/flt-ns1", "org/flt-ns10"}),
        (global_, {"org/flt-ns1", "org/flt-ns10", "org/flt-other"}),
    ):
        await wait_until(
            lambda fe=fe, expected=expected: lists(fe, expected),  # type: ignore[misc]
            timeout=DEADLINE,
            message=fe.describe,
        )
    assert await exact.model_ids() == {"org/flt-ns1"}
    assert await exact.instances() == {by_ns["ns1"]}
    assert {m for m in await prefix.model_ids() if m.startswith("org/flt")} == {
        "org/flt-ns1",
        "org/flt-ns10",
    }
    assert await prefix.instances("org/flt-ns1", "org/flt-ns10") == {
        by_ns["ns1"],
        by_ns["ns10"],
    }


async def test_two_frontends_sharing_a_cache_fetch_each_blob_once(
    shared_etcd: EtcdServer,
    shared_client: EtcdClient,
    procs: list[Process],
    spawn: Spawn,
    model_dirs: Callable[..., Path],
    tmp_path: Path,
) -> None:
    url = shared_etcd.client_url
    model_dir = model_dirs("shared")
    worker, key = await start_worker(spawn, url, model_dir, "org/shared", "shared")
    cache = tmp_path / "cache"
    fes = [
        FrontendProcess(url, tmp=tmp_path, cache_dir=cache, extra_args=("--namespace", "shared"),
                        name=f"fe{i}")
        for i in (1, 2)
    ]  # fmt: skip
    procs.extend(fes)
    for fe in fes:
        await fe.wait_listening()
    for fe in fes:
        await wait_until(
            lambda fe=fe: fe.model_ids(),  # type: ignore[misc]
            timeout=DEADLINE,
            message=fe.describe,
        )
        assert await fe.model_ids() == {"org/shared"}
    files = card_files(await published_card(shared_client, key))
    assert await worker.metadata_gets() == len(files)
    # Between them the two frontends fetched every byte exactly once.
    fetched = [await fe.metric("discovery_mdc_fetched_bytes_total") for fe in fes]
    assert sum(fetched) == sum((model_dir / name).stat().st_size for name in files)
