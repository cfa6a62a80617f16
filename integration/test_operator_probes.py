"""What an operator sees, with real etcd and real worker/frontend processes: liveness that
survives an etcd outage, Dynamo's settings, rejections that say what differs, JSON logs."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from discovery_mdc._metrics import package_version
from discovery_mdc._sample import write_sample_model
from discovery_mdc.card import from_dir
from discovery_mdc.etcd import EtcdClient, EtcdServer
from testkit import (
    CliProcess,
    FrontendProcess,
    Process,
    Registered,
    Spawn,
    WorkerProcess,
    card_keys,
    child_env,
    parse_metrics,
    run_cli,
    wait_until,
)

DEADLINE = 60.0


def _status(url: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return int(resp.status), json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


async def status(url: str) -> tuple[int, Any]:
    return await asyncio.to_thread(_status, url)


def _worker_args(etcd: str, model: Path, *extra: str) -> list[str]:
    return ["--etcd", etcd, "--model-path", str(model), "--system-port", "0",
            "--system-host", "127.0.0.1", *extra]  # fmt: skip


@dataclass(frozen=True)
class Serving:
    """A worker of a fresh sample model and a frontend that lists the model."""

    model: Path
    worker: WorkerProcess
    registered: Registered
    fe: FrontendProcess


async def serving(
    etcd: EtcdServer, spawn: Spawn, procs: list[Process], tmp_path: Path,
    name: str, *worker_flags: str,
) -> Serving:  # fmt: skip
    model = write_sample_model(tmp_path / name)
    worker = spawn(*_worker_args(etcd.client_url, model, *worker_flags))
    fe = FrontendProcess(etcd.client_url, tmp=tmp_path)
    procs.append(fe)
    registered = await worker.wait_registered(timeout=DEADLINE)
    await fe.wait_listening()
    await wait_until(lambda: fe.lists(name), timeout=DEADLINE, message=fe.describe)
    return Serving(model, worker, registered, fe)


# --------------------------------------------------------------------------- probes


async def test_etcd_down_keeps_live_200_while_health_turns_503_on_both_halves(
    etcd_server: EtcdServer, spawn: Spawn, procs: list[Process], tmp_path: Path
) -> None:
    up = await serving(etcd_server, spawn, procs, tmp_path, "m", "--lease-ttl", "2")
    worker, fe = up.worker, up.fe
    w_base = f"http://127.0.0.1:{worker.status_port()}"
    f_base = f"http://127.0.0.1:{fe.port}"
    for base in (w_base, f_base):
        assert (await status(f"{base}/health"))[0] == 200
        assert await status(f"{base}/live") == (200, {"status": "live"})

    etcd_server.stop()

    async def both_unhealthy() -> bool:
        return (await status(f"{w_base}/health"))[0] == 503 and (await status(f"{f_base}/health"))[
            0
        ] == 503

    await wait_until(both_unhealthy, timeout=DEADLINE, message=worker.describe)
    # Liveness follows the process, not etcd: a liveness probe must not restart the fleet.
    for base in (w_base, f_base):
        assert await status(f"{base}/live") == (200, {"status": "live"})
    # The frontend still answers, and says the model is not ready to route to... or still is:
    # its last view of etcd stands until etcd answers again.
    assert (await status(f"{f_base}/v1/models"))[0] == 200


async def test_per_model_readiness_answers_200_once_ready_and_503_when_unknown(
    etcd_server: EtcdServer, spawn: Spawn, procs: list[Process], tmp_path: Path
) -> None:
    model = write_sample_model(tmp_path / "ready-model")
    fe = FrontendProcess(etcd_server.client_url, tmp=tmp_path)
    procs.append(fe)
    await fe.wait_listening()
    base = f"http://127.0.0.1:{fe.port}"
    unknown = {"model": "ready-model", "ready": False, "status": "unknown", "instances": 0,
               "ready_instances": 0, "rejected_instances": 0, "namespaces": {}}  # fmt: skip
    assert await status(f"{base}/v1/models/ready-model/ready") == (503, unknown)
    spawn(*_worker_args(etcd_server.client_url, model))
    await wait_until(lambda: fe.lists("ready-model"), timeout=DEADLINE, message=fe.describe)
    code, body = await status(f"{base}/v1/models/ready-model/ready")
    assert code == 200 and body["ready"] is True and body["instances"] == 1
    assert set(body) == set(unknown)  # one shape, known or not
    # OpenAI's 404 for a model that does not exist.
    code, body = await status(f"{base}/v1/models/nope")
    assert code == 404 and body["error"]["code"] == "model_not_found"
    assert body["error"]["param"] == "model"
    # Dynamo's context_window, from the card.
    (entry,) = (await status(f"{base}/v1/models"))[1]["data"]
    assert entry["context_window"] == from_dir(model).effective_context_length()


# --------------------------------------------------------------------------- Dynamo's settings


async def test_dyn_namespace_and_dyn_endpoint_are_honoured_by_both_halves(
    etcd_server: EtcdServer, spawn: Spawn, procs: list[Process], tmp_path: Path
) -> None:
    a = write_sample_model(tmp_path / "model-a", seed=1)
    b = write_sample_model(tmp_path / "model-b", seed=2)
    c = write_sample_model(tmp_path / "model-c", seed=3)
    url = etcd_server.client_url
    # Dynamo's worker suffix: DYN_NAMESPACE "team" becomes "team-a".
    spawn(*_worker_args(url, a),
          env=child_env(DYN_NAMESPACE="team", DYN_NAMESPACE_WORKER_SUFFIX="a"))  # fmt: skip
    # The full form Dynamo backends take sets namespace, component and endpoint at once (and
    # names the namespace exactly: no suffix).
    spawn(*_worker_args(url, c), env=child_env(DYN_ENDPOINT="dyn://team-a.vllm.chat",
                                               DYN_NAMESPACE_WORKER_SUFFIX="x"))  # fmt: skip
    spawn(*_worker_args(url, b), env=child_env(DYN_NAMESPACE="team-b"))
    # ... and a flag still beats the variable.
    fe = FrontendProcess(url, tmp=tmp_path, env={"DYN_NAMESPACE": "team-b"},
                         extra_args=("--namespace", "team-a"))  # fmt: skip
    procs.append(fe)
    async with EtcdClient([url]) as client:

        async def published() -> set[str]:
            keys = await card_keys(client)
            return keys if len(keys) == 3 else set()

        keys = await wait_until(published, timeout=DEADLINE)
    assert {k.rsplit("/", 1)[0] for k in keys} == {
        "v1/mdc/team-a/backend/generate",
        "v1/mdc/team-a/vllm/chat",
        "v1/mdc/team-b/backend/generate",
    }
    await fe.wait_listening()

    async def team_a_listed() -> bool:
        return await fe.model_ids() == {"model-a", "model-c"}

    await wait_until(team_a_listed, timeout=DEADLINE, message=fe.describe)
    # A frontend reading only DYN_NAMESPACE admits only that namespace.
    fe_b = FrontendProcess(url, tmp=tmp_path, env={"DYN_NAMESPACE": "team-b"}, name="fe-b")
    procs.append(fe_b)
    await fe_b.wait_listening()

    async def team_b_listed() -> bool:
        return await fe_b.model_ids() == {"model-b"}

    await wait_until(team_b_listed, timeout=DEADLINE, message=fe_b.describe)


async def test_dyn_http_port_and_json_logs_from_dynamos_variables(
    etcd_server: EtcdServer, tmp_path: Path
) -> None:
    from discovery_mdc.etcd._server import free_port

    port = free_port()
    env = child_env(
        ETCD_ENDPOINTS=etcd_server.client_url,
        DYN_HTTP_HOST="127.0.0.1",
        DYN_HTTP_PORT=str(port),
        DYN_LOGGING_JSONL="true",
        DYN_LOG="warn,discovery_mdc.cli=info",
    )
    fe = CliProcess(
        ["frontend", "--cache-dir", str(tmp_path / "c")], log_path=tmp_path / "fe.log", env=env
    )
    try:
        line = await fe.wait_log(r"frontend listening", timeout=DEADLINE)
        record = json.loads(line)
        assert record["logger"] == "discovery_mdc.cli" and record["level"] == "info"
        assert f"127.0.0.1:{port}" in record["msg"]
        assert (await status(f"http://127.0.0.1:{port}/live"))[0] == 200
        fe.signal(signal.SIGTERM)
        assert await fe.wait_exit(timeout=DEADLINE) == 0
        # DYN_LOG=warn: the info lines of other loggers are filtered out.
        lines = [json.loads(ln) for ln in fe.log().splitlines() if ln.strip()]
        assert all(r["level"] != "info" or r["logger"] == "discovery_mdc.cli" for r in lines)
    finally:
        fe.stop()


async def test_json_logs_carry_structured_fields_and_the_fatal_line_is_json(
    etcd_server: EtcdServer, spawn: Spawn, procs: list[Process], tmp_path: Path
) -> None:
    model = write_sample_model(tmp_path / "json-model")
    worker = spawn(
        *_worker_args(etcd_server.client_url, model, "--log-format", "json", "--namespace", "js")
    )
    fe = FrontendProcess(etcd_server.client_url, tmp=tmp_path,
                         extra_args=("--log-format", "JSON", "--log-level", "INFO"))  # fmt: skip
    procs.append(fe)
    await fe.wait_listening()
    line = await worker.wait_log(r'"registered model', timeout=DEADLINE)
    record = json.loads(line)
    assert record["model"] == "json-model" and record["namespace"] == "js"
    assert record["key"].startswith("v1/mdc/js/backend/generate/")
    assert record["key"].endswith("/" + record["lease"])
    added = json.loads(await fe.wait_log(r"model 'json-model' added", timeout=DEADLINE))
    assert added["model"] == "json-model" and added["level"] == "info"
    created = json.loads(await worker.wait_log(r"created etcd key", timeout=DEADLINE))
    assert (created["key"], created["lease"]) == (record["key"], record["lease"])

    # A fatal error under JSON logs ends with a JSON line too.
    dead = CliProcess(
        ["ls", "--etcd", "http://127.0.0.1:9", "--log-format", "json"],
        log_path=tmp_path / "ls.log",
        env=child_env(),
    )
    procs.append(dead)
    assert await dead.wait_exit(timeout=DEADLINE) == 1
    last = json.loads(dead.log().strip().splitlines()[-1])
    assert last["level"] == "error" and last["exit_code"] == 1
    assert "http://127.0.0.1:9" in last["msg"]


async def test_dyn_worker_graceful_shutdown_timeout_bounds_a_stop_against_a_frozen_etcd(
    etcd_server: EtcdServer, spawn: Spawn, tmp_path: Path
) -> None:
    model = write_sample_model(tmp_path / "m")
    worker = spawn(*_worker_args(etcd_server.client_url, model),
                   env=child_env(DYN_WORKER_GRACEFUL_SHUTDOWN_TIMEOUT="1"))  # fmt: skip
    reg = await worker.wait_registered(timeout=DEADLINE)
    assert etcd_server.pid is not None
    os.kill(etcd_server.pid, signal.SIGSTOP)  # the revoke will hang
    try:
        # Under load the stop can lag the signal: let it take effect before the revoke.
        await wait_until(lambda: _stopped(etcd_server.pid), timeout=DEADLINE)
        worker.signal(signal.SIGTERM)
        assert await worker.wait_exit(timeout=DEADLINE) == 0
    finally:
        os.kill(etcd_server.pid, signal.SIGCONT)
    log = worker.log()
    assert "graceful shutdown within 1s" in log
    assert f"could not revoke etcd lease {reg.lease:x}" in log


def _stopped(pid: int | None) -> bool:
    """Whether process ``pid`` is stopped (state ``T`` in ``/proc/<pid>/stat``)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[0] == "T"


# --------------------------------------------------------------------------- rejections


async def test_a_rejected_replica_is_explained_naming_the_differing_slot(
    etcd_server: EtcdServer, spawn: Spawn, procs: list[Process], tmp_path: Path
) -> None:
    url = etcd_server.client_url
    up = await serving(etcd_server, spawn, procs, tmp_path, "twin")
    model, reg, fe = up.model, up.registered, up.fe
    before = from_dir(model).tokenizer
    # The same path, but another tokenizer: the second replica's mdcsum differs.
    tokenizer = model / "tokenizer.json"
    tokenizer.write_bytes(tokenizer.read_bytes() + b"\n")
    after = from_dir(model).tokenizer
    assert before is not None and after is not None and before.file.checksum != after.file.checksum
    second = spawn(*_worker_args(url, model))
    reg2 = await second.wait_registered(timeout=DEADLINE)
    expected = (
        f"tokenizer {before.file.checksum} ({before.file.size} bytes) vs "
        f"{after.file.checksum} ({after.file.size} bytes)"
    )
    # The log line...
    line = await fe.wait_log(rf"rejected instance {re.escape(reg2.key)}", timeout=DEADLINE)
    assert expected in line and "context_length" not in line
    # ... /v1/models/{id}...
    _, details = await fe.get_json("/v1/models/twin")
    (rejected,) = details["rejected_instances"]
    assert rejected["key"] == reg2.key and expected in rejected["reason"]
    assert [d["field"] for d in rejected["diff"]] == ["tokenizer"]
    assert details["worker_sets"][0]["instances"] == [reg.key]
    # ... the per-model metric...
    assert (await fe.metrics())['discovery_mdc_model_rejected_instances{model="twin"}'] == 1
    # ... and `discovery-mdc ls`.
    ls = CliProcess(["ls", "--etcd", url], log_path=tmp_path / "ls.log", env=child_env())
    procs.append(ls)
    assert await ls.wait_exit(timeout=DEADLINE) == 0, ls.describe()
    (row,) = [ln for ln in ls.log().splitlines() if ln.startswith(reg2.key)]
    assert "REJECTED" in row and expected in row
    (ok_row,) = [ln for ln in ls.log().splitlines() if ln.startswith(reg.key)]
    assert "REJECTED" not in ok_row
    # ... and `ls --json`, field by field.
    listed = await asyncio.to_thread(run_cli, "ls", "--etcd", url, "--json", timeout=DEADLINE)
    assert listed.returncode == 0, listed.stderr
    cards = {c["key"]: c for c in json.loads(listed.stdout)["cards"]}
    assert (cards[reg.key]["status"], cards[reg.key]["diff"]) == ("ok", None)
    assert cards[reg2.key]["status"] == "rejected" and expected in cards[reg2.key]["reason"]
    assert cards[reg2.key]["diff"] == [
        {
            "field": "tokenizer",
            "worker_set": f"{before.file.checksum} ({before.file.size} bytes)",
            "instance": f"{after.file.checksum} ({after.file.size} bytes)",
        }
    ]


# --------------------------------------------------------------------------- /v1/models


async def _entry(fe: FrontendProcess, model: str) -> dict[str, Any] | None:
    _, body = await fe.get_json("/v1/models")
    return next((m for m in body["data"] if m["id"] == model), None)


async def test_created_stays_the_same_when_a_model_drops_out_across_an_etcd_restart(
    etcd_server: EtcdServer, spawn: Spawn, procs: list[Process], tmp_path: Path
) -> None:
    up = await serving(etcd_server, spawn, procs, tmp_path, "steady", "--lease-ttl", "2")
    worker, reg, fe = up.worker, up.registered, up.fe
    first = await _entry(fe, "steady")
    assert first is not None
    # A frozen worker sends no keepalive: after etcd's restart its lease runs out, the card
    # goes and the model drops out. It comes back once the worker thaws and re-registers.
    worker.signal(signal.SIGSTOP)
    try:
        await asyncio.to_thread(etcd_server.restart)

        async def dropped() -> bool:
            return await _entry(fe, "steady") is None

        await wait_until(dropped, timeout=DEADLINE, message=fe.describe)
        # Out for over a second, so a model that came back as new would get another second.
        out_since = time.time()
        await wait_until(lambda: time.time() - out_since > 1.5, timeout=DEADLINE)
        assert int(time.time()) > first["created"]
    finally:
        worker.signal(signal.SIGCONT)
    await worker.wait_log(r"re-registered 1 key", timeout=DEADLINE)
    back = await wait_until(lambda: _entry(fe, "steady"), timeout=DEADLINE, message=fe.describe)
    assert back["created"] == first["created"]
    _, details = await fe.get_json("/v1/models/steady")
    assert details["created"] == first["created"]
    assert reg.key not in details["worker_sets"][0]["instances"]  # a new lease, a new key


# --------------------------------------------------------------------------- metrics


def _scrape_sync(url: str) -> tuple[str, str]:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return str(resp.headers["Content-Type"]), resp.read().decode()


async def scrape(url: str) -> tuple[str, str]:
    """``(content type, Prometheus text)`` of a ``/metrics`` endpoint."""
    return await asyncio.to_thread(_scrape_sync, url)


def _histogram(samples: dict[str, float], name: str) -> tuple[float, float]:
    """``(count, sum)`` of a histogram, after checking its +Inf bucket equals its count."""
    count, total = samples[f"{name}_count"], samples[f"{name}_sum"]
    assert samples[f'{name}_bucket{{le="+Inf"}}'] == count, name
    return count, total


async def test_both_halves_export_standard_series_and_histograms_in_seconds(
    etcd_server: EtcdServer, spawn: Spawn, procs: list[Process], tmp_path: Path
) -> None:
    up = await serving(etcd_server, spawn, procs, tmp_path, "metered")
    model, worker, fe = up.model, up.worker, up.fe
    _, details = await fe.get_json("/v1/models/metered")
    (ws,) = details["worker_sets"]
    files = ws["files"]
    # Every metadata file of the dir (all but the weights) was fetched.
    assert len(files) == len([p for p in model.iterdir() if p.suffix != ".safetensors"])

    halves = {
        "worker": await scrape(f"http://127.0.0.1:{worker.status_port()}/metrics"),
        "frontend": await scrape(f"http://127.0.0.1:{fe.port}/metrics"),
    }
    types = {content_type for content_type, _ in halves.values()}
    assert types == {"text/plain; version=0.0.4; charset=utf-8"}, types
    samples = {name: parse_metrics(text) for name, (_, text) in halves.items()}
    for name, (_, text) in halves.items():
        have = samples[name]
        assert have[f'discovery_mdc_build_info{{version="{package_version()}"}}'] == 1, name
        assert have["process_resident_memory_bytes"] > 0, name
        assert have["process_cpu_seconds_total"] >= 0 and have["process_open_fds"] > 0, name
        assert have["process_start_time_seconds"] > 0, name
        created = [ln for ln in text.splitlines() if re.search(r"_created\b", ln)]
        assert created == [], (name, created)
    w, f = samples["worker"], samples["frontend"]
    # Files, not registry keys (each file has a key per route).
    assert w["discovery_mdc_metadata_registered_files"] == len(files)
    count, total = _histogram(w, "discovery_mdc_worker_registration_seconds")
    assert count == 1 and 0 < total < DEADLINE
    count, total = _histogram(f, "discovery_mdc_blob_fetch_seconds")
    assert count == len(files) and 0 < total < DEADLINE
    count, total = _histogram(f, "discovery_mdc_pipeline_seconds")
    assert count == 1 and 0 < total < DEADLINE
    assert f['discovery_mdc_model_ready{model="metered"}'] == 1
