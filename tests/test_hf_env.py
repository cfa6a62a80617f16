"""The one HF resolver: the environment read as huggingface_hub reads it, used by both halves.

Expected values follow huggingface_hub's ``constants.py`` (``HF_HOME``, ``HF_HUB_CACHE``,
``HF_TOKEN_PATH``: ``expandvars(expanduser(...))``; ``HF_HUB_OFFLINE``/``TRANSFORMERS_OFFLINE``
true for 1/ON/YES/TRUE) and ``utils/_auth.py`` (``HF_TOKEN``, then the token file).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from discovery_mdc._hf import DEFAULT_ENDPOINT, HfEnv
from discovery_mdc.cache import resolve_metadata_files
from discovery_mdc.card import from_dir
from discovery_mdc.errors import FetchError
from discovery_mdc.worker import resolve_model_source

HOME = "/home/u"


@pytest.mark.parametrize(
    ("env", "hub"),
    [
        ({}, f"{HOME}/.cache/huggingface/hub"),
        ({"XDG_CACHE_HOME": "/x"}, "/x/huggingface/hub"),
        ({"XDG_CACHE_HOME": "~/xdg"}, f"{HOME}/xdg/huggingface/hub"),
        ({"HF_HOME": "/h", "XDG_CACHE_HOME": "/x"}, "/h/hub"),
        ({"HF_HOME": "~/hf"}, f"{HOME}/hf/hub"),
        ({"HF_HOME": "$DATA/hf", "DATA": "/data"}, "/data/hf/hub"),
        ({"HF_HOME": "${DATA}/hf", "DATA": "/data"}, "/data/hf/hub"),
        ({"HF_HOME": "$UNSET/hf"}, "$UNSET/hf/hub"),
        ({"HUGGINGFACE_HUB_CACHE": "/l", "HF_HOME": "/h"}, "/l"),
        ({"HUGGINGFACE_HUB_CACHE": "~/legacy"}, f"{HOME}/legacy"),
        ({"HF_HUB_CACHE": "/c", "HUGGINGFACE_HUB_CACHE": "/l"}, "/c"),
        ({"HF_HUB_CACHE": "~/c"}, f"{HOME}/c"),
    ],
)
def test_hub_cache_follows_huggingface_hub(env: dict[str, str], hub: str) -> None:
    assert HfEnv.from_env({"HOME": HOME, **env}).hub_cache == Path(hub)


def test_token_path_defaults_under_hf_home_and_can_be_set() -> None:
    assert HfEnv.from_env({"HOME": HOME}).token_path == Path(f"{HOME}/.cache/huggingface/token")
    assert HfEnv.from_env({"HOME": HOME, "HF_HOME": "~/h"}).token_path == Path(f"{HOME}/h/token")
    env = {"HOME": HOME, "HF_TOKEN_PATH": "~/secret/t"}
    assert HfEnv.from_env(env).token_path == Path(f"{HOME}/secret/t")


def test_token_comes_from_env_then_from_the_login_file(tmp_path: Path) -> None:
    home = tmp_path / "hf"
    home.mkdir()
    base = {"HOME": str(tmp_path), "HF_HOME": str(home)}
    assert HfEnv.from_env(base).token() is None
    (home / "token").write_text("  hf_file\r\n")  # what `hf auth login` writes, then some
    assert HfEnv.from_env(base).token() == "hf_file"
    assert HfEnv.from_env({**base, "HUGGING_FACE_HUB_TOKEN": "hf_legacy"}).token() == "hf_legacy"
    assert HfEnv.from_env({**base, "HF_TOKEN": " hf_env\n"}).token() == "hf_env"
    # An empty variable is no token: the file is used, as huggingface_hub does.
    assert HfEnv.from_env({**base, "HF_TOKEN": "  "}).token() == "hf_file"
    assert HfEnv.from_env({**base, "HF_HUB_DISABLE_IMPLICIT_TOKEN": "1"}).token() is None
    other = tmp_path / "other-token"
    other.write_text("hf_other")
    assert HfEnv.from_env({**base, "HF_TOKEN_PATH": str(other)}).token() == "hf_other"


def test_an_unreadable_token_file_is_an_error_naming_it(tmp_path: Path) -> None:
    (tmp_path / "token").mkdir()  # a directory where the file should be
    with pytest.raises(FetchError, match=r"HF token file .*token"):
        HfEnv.from_env({"HF_HOME": str(tmp_path)}).token()


@pytest.mark.parametrize(
    ("env", "offline"),
    [
        ({}, False),
        ({"HF_HUB_OFFLINE": "1"}, True),
        ({"HF_HUB_OFFLINE": "true"}, True),
        ({"HF_HUB_OFFLINE": "Yes"}, True),
        ({"HF_HUB_OFFLINE": "ON"}, True),
        ({"HF_HUB_OFFLINE": "0"}, False),
        ({"HF_HUB_OFFLINE": "no"}, False),
        ({"HF_HUB_OFFLINE": " 1"}, False),  # huggingface_hub does not strip it
        ({"TRANSFORMERS_OFFLINE": "1"}, True),
        ({"HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "1"}, False),
    ],
)
def test_offline_values(env: dict[str, str], offline: bool) -> None:
    assert HfEnv.from_env(env).offline is offline


def test_endpoint() -> None:
    assert HfEnv.from_env({}).endpoint == DEFAULT_ENDPOINT
    hf = HfEnv.from_env({"HF_ENDPOINT": "http://mirror:8080/"})
    assert hf.resolve_url("org/m", "refs/pr/1", "a b.json") == (
        "http://mirror:8080/org/m/resolve/refs%2Fpr%2F1/a%20b.json"
    )
    with pytest.raises(FetchError, match="HF_ENDPOINT is set but empty"):
        HfEnv.from_env({"HF_ENDPOINT": ""}).resolve_url("org/m", "main", "config.json")


# --------------------------------------------------------------------------- both halves


@pytest.fixture
def hf_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A clean HF environment with ``HOME`` at ``tmp_path``."""
    for var in (
        "HF_HOME", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "XDG_CACHE_HOME", "HF_TOKEN",
        "HF_TOKEN_PATH", "HF_ENDPOINT", "TRANSFORMERS_OFFLINE", "DYN_MDC_CACHE_DIR",
    ):  # fmt: skip
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # never the network
    return tmp_path


@pytest.mark.parametrize(
    ("var", "value", "hub"),
    [
        ("XDG_CACHE_HOME", "{home}/xdg", "xdg/huggingface/hub"),
        ("HUGGINGFACE_HUB_CACHE", "{home}/legacy", "legacy"),
        ("HF_HOME", "~/hfhome", "hfhome/hub"),
    ],
)
async def test_worker_and_frontend_find_the_same_hf_cache(
    hf_home: Path,
    monkeypatch: pytest.MonkeyPatch,
    make_model_dir: Callable[..., Path],
    make_hf_repo: Callable[..., Path],
    var: str,
    value: str,
    hub: str,
) -> None:
    monkeypatch.setenv(var, value.format(home=hf_home))
    snapshot = make_hf_repo(hf_home / hub, "org/tiny", make_model_dir())
    # The worker half finds the repo by id ...
    source = resolve_model_source("org/tiny")
    assert source.local_dir == snapshot
    # ... and the frontend half resolves its hf:// slots from the same place.
    card = from_dir(source.local_dir, display_name="org/tiny").with_paths(
        lambda _, f: f"hf://org/tiny/{f.basename}"
    )
    resolved = await resolve_metadata_files(card, cache_dir=hf_home / "mdc")
    for (_, before), (_, after) in zip(card.files(), resolved.card.files(), strict=True):
        assert _read(after.path) == _read(snapshot / before.basename)


def _read(path: str | Path) -> bytes:
    return Path(path).read_bytes()
