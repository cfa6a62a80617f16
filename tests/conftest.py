from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from discovery_mdc._sample import write_sample_model


@pytest.fixture
def make_model_dir(tmp_path: Path) -> Callable[..., Path]:
    """Factory: ``make_model_dir(name="m", **write_sample_model_kwargs)`` -> a model dir."""

    def make(name: str = "sample-model", **kwargs: Any) -> Path:
        return write_sample_model(tmp_path / "models" / name, **kwargs)

    return make
