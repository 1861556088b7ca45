"""`m3dm edge lock/unlock`: the lock file is exclusive, says who/why, and a hand-made empty file counts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from edge.update_lock import LOCK_NAME, LockHeldError, is_locked, lock, lock_info, unlock


def test_lock_is_exclusive_and_unlock_releases(tmp_path: Path) -> None:
    info = lock(tmp_path, "lot 4711")
    assert is_locked(tmp_path) and lock_info(tmp_path)["reason"] == "lot 4711" == info["reason"]
    with pytest.raises(LockHeldError, match="lot 4711"):
        lock(tmp_path, "second operator")
    assert unlock(tmp_path) is True
    assert not is_locked(tmp_path) and lock_info(tmp_path) is None
    assert unlock(tmp_path) is False


def test_any_tool_may_create_the_lock_file(tmp_path: Path) -> None:
    (tmp_path / LOCK_NAME).touch()
    assert is_locked(tmp_path) and lock_info(tmp_path) == {}


def test_cli_lock_unlock_exit_codes(tmp_path: Path) -> None:
    m3dm = str(Path(sys.executable).with_name("m3dm"))

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [m3dm, "edge", *args, "--state-dir", str(tmp_path)], capture_output=True, text=True, timeout=60
        )

    assert run("lock").returncode == 0
    again = run("lock")
    assert again.returncode == 1 and again.stderr.startswith("error: updates already locked")
    assert "Traceback" not in again.stderr
    assert run("unlock").returncode == 0 and not is_locked(tmp_path)
