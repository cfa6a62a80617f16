"""P5: requests/s for tokenizer.json (~1.8 MB) from our status server vs nginx.

Our status server (a subprocess, one event loop) and nginx (Debian package; one worker
process, ``sendfile on``, access log off, run in the foreground from a temp config on
127.0.0.1) serve the same file. Load comes from ``wrk`` with the same threads, connections
and duration for both (an aiohttp load generator in a separate process if wrk is missing).
Rounds alternate ours/nginx.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from bench._ctx import Ctx
from bench._peers import ensure_tools
from bench._util import (
    HOST,
    Proc,
    Row,
    ScenarioResult,
    Stats,
    child_args,
    http_get,
    write_bench_model,
)
from testkit import child_env, free_port, wait_until_sync

NAME = "P5"
TITLE = "Serving tokenizer.json: status server vs nginx"
CONNECTIONS = 16
THREADS = 1

NGINX_CONF = """\
worker_processes 1;
daemon off;
master_process off;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 1000000;
    keepalive_timeout 65;
    client_body_temp_path {dir}/tmp;
    proxy_temp_path {dir}/tmp;
    fastcgi_temp_path {dir}/tmp;
    uwsgi_temp_path {dir}/tmp;
    scgi_temp_path {dir}/tmp;
    types {{ application/json json; }}
    default_type application/octet-stream;
    server {{
        listen {host}:{port};
        root {root};
        location / {{ }}
    }}
}}
"""


def _start_nginx(nginx: str, work: Path, root: Path) -> tuple[Proc, str]:
    conf_dir = work / "nginx"
    (conf_dir / "tmp").mkdir(parents=True, exist_ok=True)
    port = free_port()
    conf = conf_dir / "nginx.conf"
    conf.write_text(NGINX_CONF.format(dir=conf_dir, host=HOST, port=port, root=root))
    proc = Proc(
        "nginx",
        [nginx, "-c", str(conf), "-p", str(conf_dir), "-e", str(conf_dir / "error.log")],
        log=work / "nginx.log",
    )
    url = f"http://{HOST}:{port}/tokenizer.json"
    wait_until_sync(lambda: http_get(url), timeout=30, message="nginx", proc=proc)
    return proc, url


def _wrk(wrk: str | None, url: str, seconds: float, work: Path) -> tuple[float, float]:
    """(requests/s, transfer MB/s) for ``seconds`` of load on ``url``."""
    if wrk is not None:
        done = subprocess.run(
            [wrk, f"-t{THREADS}", f"-c{CONNECTIONS}", f"-d{seconds:.0f}s", url],
            capture_output=True,
            timeout=seconds + 60,
            check=True,
        )
        out = done.stdout.decode()
        m = re.search(r"Requests/sec:\s+([\d.]+)", out)
        if m is None:
            raise RuntimeError(f"cannot parse wrk output:\n{out}")
        bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
        if bad:
            raise RuntimeError(f"{url}: {bad.group(1)} non-2xx responses under load")
        t = re.search(r"Transfer/sec:\s+([\d.]+)([KMG]B)", out)
        mbps = 0.0
        if t:
            mbps = float(t.group(1)) * {"KB": 1 / 1024, "MB": 1.0, "GB": 1024.0}[t.group(2)]
        return float(m.group(1)), mbps
    load = Proc(
        "load",
        child_args(
            "bench._child",
            "load",
            "--url",
            url,
            "--connections",
            str(CONNECTIONS),
            "--duration",
            str(seconds),
        ),
        log=work / "load.log",
        env=child_env(),
        stdout_pipe=True,
    )
    try:
        r = load.recv(seconds + 60)
    finally:
        load.stop()
    if r["errors"]:
        raise RuntimeError(f"{url}: {r['errors']} failed requests under load")
    return float(r["rps"]), r["bytes"] / r["elapsed"] / (1 << 20)


def run(ctx: Ctx) -> ScenarioResult:
    result = ScenarioResult(NAME, TITLE)
    work = ctx.scenario_dir(NAME)
    tools = ensure_tools("nginx", "wrk")
    if tools["nginx"] is None:
        raise RuntimeError("nginx is not installed and `apt-get install nginx` failed")
    model = write_bench_model(work / "model", seed=5)
    tok = model / "tokenizer.json"
    seconds = 2.0 if ctx.quick else 5.0
    rounds = ctx.n(3, 1)
    ours = Proc(
        "status-server",
        child_args(
            "bench._child",
            "serve",
            "--file",
            str(tok),
            "--key",
            "bench-p5/tokenizer.json",
            profile_to=ctx.profile_session(NAME),
        ),
        log=work / "server.log",
        env=child_env(),
        stdin=subprocess.PIPE,
        stdout_pipe=True,
    )
    nginx: Proc | None = None
    o_rps: list[float] = []
    n_rps: list[float] = []
    o_mb: list[float] = []
    n_mb: list[float] = []
    try:
        our_url = ours.recv(60)["url"]
        nginx, nginx_url = _start_nginx(tools["nginx"], work, model)
        if http_get(our_url) != http_get(nginx_url) or http_get(our_url) != tok.read_bytes():
            raise RuntimeError("our server and nginx do not serve the same bytes")
        _wrk(tools["wrk"], our_url, 1, work)  # warm both up
        _wrk(tools["wrk"], nginx_url, 1, work)
        for _ in range(rounds):
            rps, mb = _wrk(tools["wrk"], our_url, seconds, work)
            o_rps.append(rps)
            o_mb.append(mb)
            rps, mb = _wrk(tools["wrk"], nginx_url, seconds, work)
            n_rps.append(rps)
            n_mb.append(mb)
        ours.call({"op": "quit"}, 30)
    finally:
        ours.stop()
        if nginx is not None:
            nginx.stop()
    loader = "wrk" if tools["wrk"] else "aiohttp load process (wrk missing)"
    row = Row(
        NAME,
        f"requests/s, {tok.stat().st_size / 1e6:.2f} MB file, {CONNECTIONS} conns",
        Stats.of(o_rps, "req/s"),
        Stats.of(n_rps, "req/s"),
        "nginx (1 worker, sendfile)",
        "rate",
        "≥ 0.5 of nginx",
    )
    row.met = row.ratio is not None and row.ratio >= 0.5
    row.note = (
        f"transfer: ours {Stats.of(o_mb, 'MB/s').summary()}, nginx "
        f"{Stats.of(n_mb, 'MB/s').summary()}"
    )
    result.rows.append(row)
    result.notes.append(
        f"load: {loader}, {THREADS} thread, {CONNECTIONS} keep-alive "
        f"connections, {seconds:.0f} s per round, {rounds} round(s) each, "
        "alternating, after a 1 s warm-up"
    )
    return result
