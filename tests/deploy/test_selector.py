"""Station selectors: ids with wildcards, KEY=VALUE tags, tag:NAME, all; malformed ones refused."""

from __future__ import annotations

import pytest

from deploy.selector import SelectorError, matches, select

FLEET = [
    ("st-1", ["class=ring", "line=1"]),
    ("st-2", ["class=ring", "line=2"]),
    ("cam-9", ["class=cap", "night"]),
]


@pytest.mark.parametrize(
    ("selector", "expected"),
    [
        ("all", ["cam-9", "st-1", "st-2"]),
        ("*", ["cam-9", "st-1", "st-2"]),
        ("class=ring", ["st-1", "st-2"]),
        ("line=2,cam-9", ["cam-9", "st-2"]),
        ("st-?", ["st-1", "st-2"]),
        ("tag:night", ["cam-9"]),
        ("class=rin", []),  # tags match whole, not as prefixes
        ("st-3", []),
    ],
)
def test_select(selector: str, expected: list[str]) -> None:
    assert select(selector, FLEET) == expected


@pytest.mark.parametrize("bad", ["", " , ", "tag:", "=ring", "class="])
def test_malformed_selectors_are_refused(bad: str) -> None:
    with pytest.raises(SelectorError, match="empty station selector|names no tag|needs KEY=VALUE"):
        matches(bad, "st-1", [])
