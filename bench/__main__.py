"""``python -m bench``: run the benchmarks and write docs/benchmarks.md.

python -m bench all [--quick]      every scenario; writes docs/benchmarks.md
python -m bench P1 P4 [--quick]    some scenarios; prints the table only (or --out FILE)
python -m bench profile P4         run P4 with our side under pyinstrument; writes
                                   bench/out/profile-P4.txt (top frames + call tree)

BENCH_CHILD_LOG=LEVEL sets the log level of the child processes (default WARNING; their logs
are under the scenario's work dir). Children get our environment minus DYN_*, ETCD_*, NATS_* and
HF_* (the test kit's child_env).
"""

from __future__ import annotations

import argparse
import atexit
import datetime as dt
import importlib
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import FrameType, ModuleType

from bench._ctx import Ctx
from bench._report import console_table, machine_facts, worst_row, write_markdown
from bench._util import PY, ROOT, ScenarioResult, stop_all

SCENARIOS: dict[str, str] = {
    "P1": "bench.p1_registration",
    "P2": "bench.p2_warm_resolve",
    "P3": "bench.p3_fanin",
    "P4": "bench.p4_streaming",
    "P5": "bench.p5_serving",
    "P6": "bench.p6_watch",
    "P7": "bench.p7_fleet",
    "P8": "bench.p8_reconcile",
    "P9": "bench.p9_silent",
    "P10": "bench.p10_tarpit",
}
DOC = ROOT / "docs" / "benchmarks.md"
OUT = ROOT / "bench" / "out"
BUDGET_S = 15 * 60


def _module(name: str) -> ModuleType:
    return importlib.import_module(SCENARIOS[name])


def scenario_description(mod: ModuleType) -> str:
    """A scenario module's docstring without its title paragraph (which may span lines)."""
    parts = (mod.__doc__ or "").split("\n\n", 1)
    return parts[1].strip() if len(parts) == 2 else ""


def run_scenarios(names: list[str], ctx: Ctx) -> list[ScenarioResult]:
    results = []
    for name in names:
        print(f"bench: {name} …", file=sys.stderr, flush=True)
        t0 = time.monotonic()
        mod = _module(name)
        try:
            res: ScenarioResult = mod.run(ctx)
        except Exception:
            res = ScenarioResult(name, getattr(mod, "TITLE", name))
            res.error = traceback.format_exc()
            print(
                f"bench: {name} FAILED (logs in {ctx.work / name}):\n{res.error}",
                file=sys.stderr,
                flush=True,
            )
        finally:
            stop_all()
        res.seconds = time.monotonic() - t0
        print(f"bench: {name} done in {res.seconds:.1f}s", file=sys.stderr, flush=True)
        results.append(res)
    return results


def _render_profile(name: str, sessions: list[Path]) -> Path:
    """Top frames by own time (pstats of the pyinstrument session) and the call tree."""
    import io
    import pstats

    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / ".gitignore").write_text("*\n")
    report = OUT / f"profile-{name}.txt"
    parts: list[str] = []
    for session in sessions:
        pst = session.with_suffix(".pstats")
        subprocess.run(
            [PY, "-m", "pyinstrument", f"--load={session}", "-r", "pstats", "-o", str(pst)],
            check=True,
            timeout=300,
        )
        buf = io.StringIO()
        stats = pstats.Stats(str(pst), stream=buf)
        stats.strip_dirs().sort_stats("tottime").print_stats(30)
        own = buf.getvalue()
        buf = io.StringIO()
        stats = pstats.Stats(str(pst), stream=buf)
        stats.strip_dirs().sort_stats("cumulative").print_stats(30)
        cum = buf.getvalue()
        tree = subprocess.run(
            [
                PY,
                "-m",
                "pyinstrument",
                f"--load={session}",
                "-r",
                "text",
                "--no-color",
                "--unicode",
            ],
            capture_output=True,
            check=True,
            timeout=300,
        ).stdout.decode()
        parts += [
            f"#### {session.name}: top 30 frames by own time",
            own,
            f"#### {session.name}: top 30 frames by cumulative time",
            cum,
            f"#### {session.name}: call tree (pyinstrument)",
            tree,
        ]
    report.write_text("\n".join(parts))
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("what", nargs="+", help="all | P1..P10 | profile P?")
    parser.add_argument("--quick", action="store_true", help="small iteration counts")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="markdown file to write (default docs/benchmarks.md for `all`)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the work dir (logs)")
    args = parser.parse_args(argv)

    what = [
        w.upper() if w.lower() != "all" and w.lower() != "profile" else w.lower() for w in args.what
    ]
    profile = None
    if what[0] == "profile":
        if len(what) != 2 or what[1] not in SCENARIOS:
            parser.error(f"usage: python -m bench profile {'|'.join(SCENARIOS)}")
        profile = what[1]
        names = [profile]
    elif what == ["all"]:
        names = list(SCENARIOS)
    else:
        bad = [w for w in what if w not in SCENARIOS]
        if bad:
            parser.error(f"unknown scenario(s) {bad}; choose from all, {', '.join(SCENARIOS)}")
        names = what

    atexit.register(stop_all)

    def on_term(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    os.chdir(ROOT)
    work = Path(tempfile.mkdtemp(prefix="dmdc-bench-"))
    ctx = Ctx(
        quick=args.quick,
        work=work,
        profile=profile,
        profile_dir=work / "profile" if profile else None,
    )
    facts = machine_facts()
    started = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M")
    t0 = time.monotonic()
    print(
        f"bench: work dir {work}; {facts['nproc']} CPUs, load {facts['loadavg']}",
        file=sys.stderr,
        flush=True,
    )
    results = run_scenarios(names, ctx)
    seconds = time.monotonic() - t0

    print()
    print(console_table(results))
    worst = worst_row(results)
    if worst is not None:
        print(
            f"\nworst ratio vs a peer: {worst.scenario} {worst.metric}: {worst.ratio:.2f} "
            f"(ours/{worst.peer_name})"
        )
    print(f"total {seconds:.0f}s" + (" — over the 15 min budget!" if seconds > BUDGET_S else ""))

    failed = any(r.error for r in results)
    if profile is not None:
        sessions = sorted(ctx.profile_dir.glob("*.pyisession")) if ctx.profile_dir else []
        if not sessions:
            print("bench: no profile session was written", file=sys.stderr)
            failed = True
        else:
            report = _render_profile(profile, sessions)
            text = report.read_text()
            print(f"\nprofile of our side of {profile}: {report}\n")
            print(text.split("#### ", 2)[1][:6000] if "#### " in text else text[:6000])
    else:
        out = args.out or (DOC if what == ["all"] else None)
        if out is not None:
            from bench._peers import tool_versions

            cmd = "python -m bench " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
            docs = {n: scenario_description(_module(n)) for n in names}
            write_markdown(
                out,
                results,
                command=cmd,
                started=started,
                seconds=seconds,
                quick=args.quick,
                facts=facts,
                load_end=os.getloadavg(),
                tools=tool_versions(),
                docs=docs,
            )
            print(f"wrote {out}")
    if failed or args.keep:
        print(f"bench: logs kept in {work}", file=sys.stderr)
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
