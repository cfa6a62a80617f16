"""The public API stays curated: nothing leaks, modules are private, errors keep their bases.

The one test of every public namespace (``discovery_mdc`` and each subpackage)."""

from __future__ import annotations

import importlib
import importlib.resources
import pkgutil
from types import ModuleType

import pytest

from discovery_mdc import errors

SUBPACKAGES = ("card", "etcd", "worker", "cache", "frontend", "cli")


def _public(module: ModuleType) -> set[str]:
    return {
        name
        for name, value in vars(module).items()
        if not name.startswith("_") and not isinstance(value, ModuleType)
    } - {"annotations"}


@pytest.mark.parametrize("name", ["discovery_mdc", *(f"discovery_mdc.{p}" for p in SUBPACKAGES)])
def test_all_lists_exactly_the_public_names(name: str) -> None:
    module = importlib.import_module(name)
    assert sorted(module.__all__) == sorted(set(module.__all__))
    private = [n for n in module.__all__ if n.startswith("_") and n != "__version__"]
    assert not private, f"{name}.__all__ names {private}"
    for exported in module.__all__:
        assert hasattr(module, exported), f"{name}.__all__ names missing {exported}"
    assert _public(module) <= set(module.__all__) | {"__version__"}, (
        f"{name} leaks {_public(module) - set(module.__all__)}"
    )


def test_every_module_below_the_subpackages_is_private() -> None:
    for sub in SUBPACKAGES:
        package = importlib.import_module(f"discovery_mdc.{sub}")
        for info in pkgutil.iter_modules(package.__path__):
            assert info.name.startswith("_"), f"discovery_mdc.{sub}.{info.name} is not private"


def test_every_error_is_a_discovery_error_with_the_stdlib_base_a_caller_catches() -> None:
    for name in errors.__all__:
        assert issubclass(getattr(errors, name), errors.DiscoveryError), name
    assert issubclass(errors.CardDecodeError, ValueError)
    assert issubclass(errors.ChecksumMismatchError, ValueError)
    assert issubclass(errors.EtcdConnectionError, ConnectionError)
    assert issubclass(errors.HfOfflineError, ConnectionError)
    assert issubclass(errors.ModelDirError, FileNotFoundError)
    assert issubclass(errors.LockTimeoutError, TimeoutError)
    assert issubclass(errors.EtcdAuthError, PermissionError)
    mismatch = errors.ChecksumMismatchError("http://h/x", "blake3:aa", "blake3:bb")
    assert "http://h/x" in str(mismatch) and "blake3:aa" in str(mismatch)
    assert errors.EtcdCompactedError(42).compact_revision == 42


def test_package_ships_py_typed() -> None:
    assert importlib.resources.files("discovery_mdc").joinpath("py.typed").is_file()
