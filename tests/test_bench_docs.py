"""The scenario descriptions that ``python -m bench all`` writes into docs/benchmarks.md."""

from __future__ import annotations

import pytest

from bench.__main__ import SCENARIOS, _module, scenario_description


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_a_scenario_description_is_its_docstring_without_the_whole_title_paragraph(
    name: str,
) -> None:
    doc = _module(name).__doc__ or ""
    title, _, body = doc.partition("\n\n")
    description = scenario_description(_module(name))
    assert description == body.strip()
    # Not a dangling tail of a title that spans two lines (":235 revoked in a burst.").
    assert description[:1].isupper(), description[:60]
    assert title.strip().splitlines()[-1] not in description
