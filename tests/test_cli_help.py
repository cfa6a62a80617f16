"""Every subcommand's ``--help`` works and explains every option."""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

import discovery_mdc
from discovery_mdc.cli import build_parser, main


def _subcommands(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _subcommands(sub, (*path, name))


ALL = list(_subcommands(build_parser()))
COMMANDS = [path for path, _ in ALL]


def test_every_expected_subcommand_exists() -> None:
    names = {" ".join(p) for p in COMMANDS}
    assert {
        "",
        "worker",
        "frontend",
        "ls",
        "demo",
        "sample-model",
        "card",
        "card inspect",
        "card fetch",
        "cache",
        "cache ls",
        "cache verify",
        "cache prune",
        "cache rm",
    } <= names


@pytest.mark.parametrize("path", COMMANDS, ids=lambda p: " ".join(p) or "root")
def test_help_exits_0_and_lists_every_option(
    path: tuple[str, ...], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main([*path, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: discovery-mdc")
    parser = dict(ALL)[path]
    for action in parser._actions:
        for flag in action.option_strings:
            assert flag in out, f"{flag} missing from `{' '.join(path)} --help`"


@pytest.mark.parametrize("path", COMMANDS, ids=lambda p: " ".join(p) or "root")
def test_every_help_ends_with_two_or_three_examples(
    path: tuple[str, ...], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        main([*path, "--help"])
    out = capsys.readouterr().out
    _, sep, tail = out.rpartition("\nexamples:\n")
    assert sep, f"`{' '.join(path)} --help` has no examples section"
    lines = tail.rstrip("\n").splitlines()
    commands = [ln for ln in lines if ln.startswith("  ") and not ln.startswith("   ")]
    explained = [ln for ln in lines if ln.startswith("      ")]
    assert 2 <= len(commands) <= 3 and len(explained) == len(commands), tail
    assert len(commands) + len(explained) == len(lines), "the examples are the last thing"
    # Each example runs this command (or feeds or follows it).
    assert all("discovery-mdc" in c or "curl" in c for c in commands), commands
    if path:
        assert any(f"discovery-mdc {' '.join(path)}" in c for c in commands), commands


@pytest.mark.parametrize("path", COMMANDS, ids=lambda p: " ".join(p) or "root")
def test_every_option_and_subcommand_has_help_text(path: tuple[str, ...]) -> None:
    parser = dict(ALL)[path]
    if path:
        assert parser.description, f"`{' '.join(path)}` has no description"
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for choice in action._choices_actions:
                assert choice.help, f"subcommand {choice.dest} of {path} has no help"
            continue
        assert action.help and action.help.strip(), (
            f"{action.option_strings or action.dest} of `{' '.join(path)}` has no help text"
        )


def test_env_backed_options_name_their_variable(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["worker", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for var in (
        "ETCD_ENDPOINTS",
        "ETCD_LEASE_TTL",
        "DYN_SYSTEM_PORT",
        "DYN_SYSTEM_HOST",
        "DYN_SELF_HOST_METADATA",
        "ETCD_AUTH_USERNAME",
        "ETCD_AUTH_CA",
    ):
        assert var in out


def test_version_prints_the_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"discovery-mdc {discovery_mdc.__version__}"


def _readme_rows() -> dict[str, str]:
    """README's command table: the command cell of each row, keyed by its subcommand path."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("## Command line", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        if line.startswith("| `discovery-mdc "):
            cell = line.split("`", 2)[1]
            words = cell.split()[1:]
            path = " ".join(w for w in words[:2] if re.fullmatch(r"[a-z][a-z-]*", w))
            rows[path] = cell
    return rows


@pytest.mark.parametrize("path", COMMANDS, ids=lambda p: " ".join(p) or "root")
def test_the_readme_command_table_lists_every_command_and_flag(path: tuple[str, ...]) -> None:
    parser = dict(ALL)[path]
    global_flags = {"-h", "--help", "--log-level", "--log-format"}
    own = [
        flags
        for action in parser._actions
        if (flags := [f for f in action.option_strings if f not in global_flags])
    ]
    group = any(isinstance(a, argparse._SubParsersAction) for a in parser._actions)
    if group and not own:
        return  # a group (card, cache) with no flag of its own: its subcommands have the rows
    rows = _readme_rows()
    key = " ".join(path)
    assert key in rows, (
        f"README's command table has no row for `{' '.join(['discovery-mdc', *path])}`"
    )
    for flags in own:
        assert any(f in rows[key] for f in flags), (path, flags, rows[key])
