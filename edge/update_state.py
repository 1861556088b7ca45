"""Which bundle a station runs, durable across restarts: `STATE_DIR/active.json`, replaced atomically.

    {"active": {"bundle_id", "version", "path", "counter"}, "previous": {...} | null}

Written to a temporary file, fsynced, then renamed over the old one (and the folder fsynced), so a crash
at any moment leaves either the old or the new state, never a torn one. A station started with
`--state-dir` loads the active bundle from here, falling back to its `--bundle` only when there is none.
The anti-rollback floor is the lowest counter of the bundles kept (active and previous): the registry can
move a station between those two, but never back to anything older.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = ["STATE_NAME", "BundleRef", "UpdateState", "load_state", "save_state"]

STATE_NAME = "active.json"


@dataclass(frozen=True)
class BundleRef:
    bundle_id: str
    version: str
    path: str
    counter: int


@dataclass(frozen=True)
class UpdateState:
    active: BundleRef | None = None
    previous: BundleRef | None = None

    def min_counter(self) -> int | None:
        kept = [b.counter for b in (self.active, self.previous) if b is not None]
        return min(kept) if kept else None

    def to_dict(self) -> dict[str, Any]:
        return {
            k: None if v is None else asdict(v)
            for k, v in (("active", self.active), ("previous", self.previous))
        }


def _ref(data: Any) -> BundleRef | None:
    if not isinstance(data, dict):
        return None
    try:
        return BundleRef(
            str(data["bundle_id"]), str(data["version"]), str(data["path"]), int(data["counter"])
        )
    except (KeyError, TypeError, ValueError):
        return None


def load_state(state_dir: Path) -> UpdateState:
    """The stored state; an absent or unreadable file means "no state" (the station's --bundle applies)."""
    try:
        data = json.loads((Path(state_dir) / STATE_NAME).read_text())
    except (OSError, json.JSONDecodeError):
        return UpdateState()
    if not isinstance(data, dict):
        return UpdateState()
    return UpdateState(_ref(data.get("active")), _ref(data.get("previous")))


def save_state(state_dir: Path, state: UpdateState) -> None:
    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    target = state_dir / STATE_NAME
    tmp = target.with_name(f".{STATE_NAME}.{os.getpid()}.tmp")
    with tmp.open("w") as handle:
        json.dump(state.to_dict(), handle, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, target)
    fd = os.open(state_dir, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
