"""Packaging metadata and repository hygiene."""

from __future__ import annotations

import tomllib
from pathlib import Path

from packaging.requirements import Requirement

from testkit.dynamo import default_venv_dir, install_lock_path

REPO = Path(__file__).resolve().parent.parent


def _pyproject() -> dict[str, object]:
    with (REPO / "pyproject.toml").open("rb") as fh:
        project: dict[str, object] = tomllib.load(fh)["project"]
    return project


def test_license_file_matches_the_declared_license() -> None:
    with (REPO / "pyproject.toml").open("rb") as fh:
        meta = tomllib.load(fh)
    project = meta["project"]
    # PEP 639: an SPDX expression and the files, no License classifier (setuptools >= 77
    # refuses the two together).
    assert project["license"] == "Apache-2.0"
    assert project["license-files"] == ["LICENSE"]
    assert not [c for c in project["classifiers"] if c.startswith("License ::")]
    assert any(
        Requirement(r).name == "setuptools" and not Requirement(r).specifier.contains("76.9")
        for r in meta["build-system"]["requires"]
    ), meta["build-system"]["requires"]
    text = (REPO / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text


def test_classifiers_urls_and_no_unused_extra() -> None:
    project = _pyproject()
    classifiers = project["classifiers"]
    assert isinstance(classifiers, list)
    assert "Typing :: Typed" in classifiers
    assert any(c.startswith("Programming Language :: Python :: 3.11") for c in classifiers)
    urls = project["urls"]
    assert isinstance(urls, dict) and urls
    assert all(u.startswith("https://") for u in urls.values())
    # No canonical home yet; pyproject.toml says so next to the reference links.
    assert "Homepage" not in urls
    assert "no public home yet" in (REPO / "pyproject.toml").read_text()
    extras = project["optional-dependencies"]
    assert isinstance(extras, dict) and "hf" not in extras


def test_the_dynamo_install_lock_never_lands_in_the_repository(tmp_path: Path) -> None:
    for venv in (REPO / ".venv-dynamo-ci", REPO / "sub" / "peer", default_venv_dir()):
        lock = install_lock_path(venv)
        assert REPO not in lock.parents
        assert install_lock_path(venv) == lock  # stable, so concurrent installs share it
    # Elsewhere it stays beside the venv, where earlier versions put it.
    assert install_lock_path(tmp_path / "peer") == tmp_path / ".peer.lock"
    assert install_lock_path(REPO / "a") != install_lock_path(REPO / "b")


def test_no_stray_lock_file_at_the_repository_root() -> None:
    # requirements.lock is the container image's pinned dependency list, not a file lock.
    stray = [p for p in REPO.glob("*.lock") if p.name != "requirements.lock"]
    assert stray == []
    assert (REPO / "requirements.lock").read_text().strip()
