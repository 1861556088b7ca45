"""The thin `m3dm` dispatcher: every role's commands, and no role imported before its command runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from m3dm.cli import COMMANDS


def _m3dm(*args: str, code: str | None = None) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-c", code] if code else [sys.executable, "-m", "m3dm", *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120)


def test_help_lists_every_role_without_importing_any() -> None:
    probe = (
        "import sys; from m3dm.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
        "roles = ('trainer', 'edge', 'collector', 'deploy', 'torch', 'sklearn')\n"
        "print([m for m in sys.modules if m.split('.')[0] in roles])"
    )
    done = _m3dm(code=probe)
    assert done.returncode == 0, done.stderr
    *help_lines, imported = done.stdout.strip().splitlines()
    assert imported == "[]"
    for name in COMMANDS:
        assert any(line.strip().startswith(name) for line in help_lines), name


@pytest.mark.parametrize("role", ["edge", "collector", "deploy", "keys"])
def test_each_role_has_its_own_help(role: str) -> None:
    done = _m3dm(role, "--help")
    assert done.returncode == 0 and "Usage" in done.stdout, done.stderr


def test_station_commands_do_not_import_the_trainer() -> None:
    probe = (
        "import sys\nfrom m3dm.cli import main\n"
        "try:\n    main(['edge', 'run', '--help'])\nexcept SystemExit:\n    pass\n"
        "print([m for m in sys.modules if m.split('.')[0] in ('trainer', 'torch', 'sklearn')])"
    )
    done = _m3dm(code=probe)
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stderr


def test_unknown_command_is_a_usage_error() -> None:
    done = _m3dm("frobnicate")
    assert done.returncode == 2 and "no such command 'frobnicate'" in done.stderr


def test_keys_gen_writes_a_pair_and_refuses_to_overwrite(tmp_path: Path) -> None:
    done = _m3dm("keys", "gen", "--out", str(tmp_path), "--name", "station-7", "--json")
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout)
    assert Path(info["public"]).name == "station-7.key" and len(info["fingerprint"]) == 16
    assert (Path(info["secret"]).stat().st_mode & 0o777) == 0o600
    again = _m3dm("keys", "gen", "--out", str(tmp_path), "--name", "station-7")
    assert again.returncode == 1 and "refusing to overwrite" in again.stderr
    shown = _m3dm("keys", "show", info["public"])
    assert shown.stdout.strip() == info["fingerprint"]
