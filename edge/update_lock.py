"""Operator hold on updates: while `updates.lock` exists in the station's state folder, no bundle is swapped.

Like balena's update lock: the file is created with O_EXCL (two operators cannot both "take" it), holds who
took it, when and why, and is removed by `unlock`. While it is held the station still checks in, reports
`locked`, and downloads and verifies an offered bundle, but applies nothing (the registry records the
update as deferred). Any tool may create the file itself (`touch STATE_DIR/updates.lock`).
"""

from __future__ import annotations

import getpass
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

__all__ = ["LOCK_NAME", "LockHeldError", "is_locked", "lock", "lock_info", "unlock"]

LOCK_NAME = "updates.lock"


class LockHeldError(RuntimeError):
    """`lock` on a folder whose lock is already held."""


def lock_path(state_dir: Path) -> Path:
    return Path(state_dir) / LOCK_NAME


def is_locked(state_dir: Path) -> bool:
    return lock_path(state_dir).exists()


def lock_info(state_dir: Path) -> dict[str, Any] | None:
    """What the lock file says (empty dict for a hand-made empty file), None when unlocked."""
    path = lock_path(state_dir)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as err:
        return {"error": str(err)}
    try:
        info = json.loads(text) if text.strip() else {}
    except json.JSONDecodeError:
        info = {"note": text.strip()[:200]}
    return info if isinstance(info, dict) else {}


def lock(state_dir: Path, reason: str = "") -> dict[str, Any]:
    path = lock_path(state_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    info = {"by": f"{user}@{socket.gethostname()}", "ts": time.time(), "reason": reason}
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        raise LockHeldError(f"updates already locked: {lock_info(state_dir)}") from None
    with os.fdopen(fd, "w") as handle:
        json.dump(info, handle)
    return info


def unlock(state_dir: Path) -> bool:
    """Remove the lock; False if there was none."""
    try:
        lock_path(state_dir).unlink()
    except FileNotFoundError:
        return False
    return True
