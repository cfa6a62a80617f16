"""``--log-level`` and ``--log-format`` work before or after any subcommand."""

from __future__ import annotations

import contextlib
import io
import json
import logging
from pathlib import Path

import pytest

from discovery_mdc.cli import build_parser, main

pytestmark = pytest.mark.usefixtures("restore_root_logger")


@pytest.mark.parametrize(
    ("argv", "level", "fmt"),
    [
        (["ls"], None, None),
        (["--log-level", "debug", "ls"], "debug", None),
        (["ls", "--log-level", "debug"], "debug", None),
        (["cache", "ls", "--log-format", "json"], None, "json"),
        (["card", "inspect", "x", "--log-level", "error", "--log-format", "json"], "error", "json"),
        (["worker", "--model-path", "m", "--log-level", "warning"], "warning", None),
        # Given twice, the one after the subcommand wins.
        (["--log-level", "error", "frontend", "--log-level", "info"], "info", None),
        (["--log-format", "json", "demo"], None, "json"),
        # Any case; warn is warning (as in DYN_LOG).
        (["ls", "--log-level", "DEBUG", "--log-format", "JSON"], "debug", "json"),
        (["ls", "--log-level", "Warn"], "warning", None),
    ],
)
def test_logging_options_parse_anywhere(
    argv: list[str], level: str | None, fmt: str | None
) -> None:
    args = build_parser().parse_args(argv)
    assert args.log_level == level
    assert args.log_format == fmt


def test_log_level_after_subcommand_takes_effect(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["cache", "ls", "--cache-dir", str(tmp_path), "--log-level", "debug"]) == 0
    assert logging.getLogger().level == logging.DEBUG
    assert main(["cache", "ls", "--cache-dir", str(tmp_path), "--log-level", "error"]) == 0
    assert logging.getLogger().level == logging.ERROR


def test_main_leaves_no_handler_on_a_stream_that_is_closed_after_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A test capturing stderr closes its stream afterwards: records logged later go to the
    stderr of their time, not to a closed stream ("--- Logging error ---")."""
    captured = io.StringIO()
    with contextlib.redirect_stderr(captured):
        assert main(["cache", "ls", "--cache-dir", str(tmp_path), "--log-level", "info"]) == 0
    captured.close()
    logging.getLogger("discovery_mdc.cli").warning("logged after main returned")
    err = capsys.readouterr().err
    assert "logged after main returned" in err and "Logging error" not in err


def test_default_levels_info_and_warning_for_the_demo(tmp_path: Path) -> None:
    assert main(["cache", "ls", "--cache-dir", str(tmp_path)]) == 0
    assert logging.getLogger().level == logging.INFO
    args = build_parser().parse_args(["demo"])
    assert args.log_level is None and args.default_log_level == "warning"


def test_json_log_format_after_subcommand_writes_json_lines(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["cache", "ls", "--cache-dir", str(tmp_path), "--log-format", "json"]) == 0
    capsys.readouterr()
    logging.getLogger("discovery_mdc.test").warning("model %r at %s", "m", "key")
    line = capsys.readouterr().err.strip()
    record = json.loads(line)
    assert record["level"] == "warning"
    assert record["logger"] == "discovery_mdc.test"
    assert record["msg"] == "model 'm' at key"
    assert record["ts"].endswith("Z")
