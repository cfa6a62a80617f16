"""``worker --model-name`` / ``--lora-name``: a name no frontend could serve is refused at start
(exit 2, one line, before any side effect) by the frontends' own admission rule."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import pytest

from discovery_mdc.card import unservable_model_id
from discovery_mdc.cli import main

UNSERVABLE = ["", "two\nlines", "tab\there", "cr\r", "line\u2028sep", "org/../up", "m/ready"]


@pytest.fixture
def runs(monkeypatch: pytest.MonkeyPatch) -> list[argparse.Namespace]:
    """Replaces the worker's run (etcd, status server, lease) with a recorder."""
    started: list[argparse.Namespace] = []

    async def run(args: argparse.Namespace, endpoint_id: tuple[str, str, str]) -> int:
        started.append(args)
        return 0

    monkeypatch.setattr("discovery_mdc.cli._worker._run_worker", run)
    return started


@pytest.mark.parametrize("flag", ["--model-name", "--lora-name"])
@pytest.mark.parametrize("name", UNSERVABLE, ids=repr)
def test_a_name_no_frontend_could_serve_exits_2_with_one_line_before_starting(
    flag: str,
    name: str,
    runs: list[argparse.Namespace],
    make_model_dir: Callable[..., Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    why = unservable_model_id(name)
    assert why is not None  # the frontends would reject it at admission
    with pytest.raises(SystemExit) as exc:
        main(["worker", "--model-path", str(make_model_dir()), flag, name])
    assert exc.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("discovery-mdc worker: error: argument")
    assert flag in lines[0] and why in lines[0]
    assert runs == []  # nothing started: no etcd, no status server, no lease


@pytest.mark.parametrize("name", ["Qwen/Qwen3-0.6B", "my model", "org/odd name?#%+;", "ready"])
def test_a_name_the_frontends_serve_is_accepted(
    name: str, runs: list[argparse.Namespace], make_model_dir: Callable[..., Path]
) -> None:
    assert unservable_model_id(name) is None
    assert main(["worker", "--model-path", str(make_model_dir()), "--model-name", name]) == 0
    assert [args.model_name for args in runs] == [name]
