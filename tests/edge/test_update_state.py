"""active.json: atomic replace, garbage reads as "no state", anti-rollback floor of the kept bundles."""

from __future__ import annotations

from pathlib import Path

from edge.update_state import STATE_NAME, BundleRef, UpdateState, load_state, save_state


def test_round_trip_and_floor(tmp_path: Path) -> None:
    state = UpdateState(BundleRef("b" * 32, "1.1.0", "/x/b", 5), BundleRef("a" * 32, "1.0.0", "/x/a", 3))
    save_state(tmp_path, state)
    assert load_state(tmp_path) == state
    assert state.min_counter() == 3  # back to the previous bundle is allowed, anything older is not
    assert UpdateState().min_counter() is None
    assert [p.name for p in tmp_path.iterdir()] == [STATE_NAME]  # no temporary file left behind


def test_unreadable_state_means_none(tmp_path: Path) -> None:
    (tmp_path / STATE_NAME).write_text('{"active": {"bundle_id": 1')
    assert load_state(tmp_path) == UpdateState()
    (tmp_path / STATE_NAME).write_text('{"active": {"bundle_id": "x"}}')
    assert load_state(tmp_path) == UpdateState()
    assert load_state(tmp_path / "missing") == UpdateState()
