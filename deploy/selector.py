"""Station selectors: which stations a rollout, rollback or policy targets.

A selector is comma-separated terms; a station matches if ANY term matches:
  all | *          every known station
  KEY=VALUE        a station tagged exactly `KEY=VALUE` (e.g. `class=ring`, `line=3`)
  tag:NAME         a station carrying the tag NAME
  anything else    a station id, shell-style wildcards allowed (`st-0?`, `hall2-*`)
"""

from __future__ import annotations

from collections.abc import Iterable
from fnmatch import fnmatchcase

__all__ = ["SelectorError", "matches", "parse_selector", "select"]


class SelectorError(ValueError):
    """An empty or malformed selector."""


def parse_selector(text: str) -> tuple[str, ...]:
    terms = tuple(t.strip() for t in text.split(",") if t.strip())
    if not terms:
        raise SelectorError(f"empty station selector {text!r}")
    for term in terms:
        if term.startswith("tag:") and len(term) == 4:
            raise SelectorError(f"selector term {term!r} names no tag")
        if "=" in term and (term.startswith("=") or term.endswith("=")):
            raise SelectorError(f"selector term {term!r} needs KEY=VALUE")
    return terms


def _term_matches(term: str, station_id: str, tags: Iterable[str]) -> bool:
    if term in ("all", "*"):
        return True
    if term.startswith("tag:"):
        return term[4:] in tags
    if "=" in term:
        return term in tags
    return fnmatchcase(station_id, term)


def matches(selector: str, station_id: str, tags: Iterable[str]) -> bool:
    tags = tuple(tags)
    return any(_term_matches(term, station_id, tags) for term in parse_selector(selector))


def select(selector: str, stations: Iterable[tuple[str, Iterable[str]]]) -> list[str]:
    """Ids of the (station_id, tags) pairs that match, sorted (a rollout's order is reproducible)."""
    return sorted(sid for sid, tags in stations if matches(selector, sid, tags))
