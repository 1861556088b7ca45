"""`m3dm deploy` commands on a real database: exit codes, one-line errors, JSON output, the audit trail."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from deploy.cli import app, parse_duration


@pytest.fixture()
def db(tmp_path: Path) -> str:
    from collector.db import make_engine, upgrade_collector

    url = f"sqlite:///{tmp_path / 'fleet.db'}"
    upgrade_collector(make_engine(url))
    return url


def invoke(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


def test_publish_status_threshold_audit(db: str, tmp_path: Path, fleet_bundle: dict) -> None:
    store = str(tmp_path / "store")
    code, out, _ = invoke(
        "publish",
        str(fleet_bundle["tar"]),
        "--db",
        db,
        "--store",
        store,
        "--key",
        str(fleet_bundle["keys"]),
        "--json",
        "--actor",
        "alice",
        "--reason",
        "v1",
    )
    assert code == 0 and json.loads(out)["bundle_id"] == fleet_bundle["bundle_id"]
    assert (tmp_path / "store" / f"{fleet_bundle['bundle_id']}.tar").is_file()

    code, out, _ = invoke(
        "set-threshold",
        "--db",
        db,
        "--stations",
        "class=ring",
        "--threshold",
        "7.5",
        "--json",
        "--actor",
        "bob",
        "--reason",
        "false rejects on line 2",
    )
    assert code == 0 and json.loads(out) == {"policy_version": 1}

    code, out, _ = invoke("status", "--db", db, "--json")
    assert code == 0 and json.loads(out) == {"stations": [], "rollouts": []}

    code, out, _ = invoke("audit", "--db", db, "--json")
    entries = [(e["actor"], e["action"], e["reason"]) for e in json.loads(out)]
    assert entries == [("alice", "publish", "v1"), ("bob", "set_policy", "false rejects on line 2")]


def test_expected_errors_are_one_line(db: str, tmp_path: Path, fleet_bundle: dict) -> None:
    from trainer.bundle import keygen

    keygen(tmp_path / "other")
    code, _, err = invoke(
        "publish",
        str(fleet_bundle["tar"]),
        "--db",
        db,
        "--store",
        str(tmp_path / "s"),
        "--key",
        str(tmp_path / "other"),
    )
    assert code == 1 and err.startswith("error: ") and "[signature]" in err and err.count("\n") == 1
    code, _, err = invoke("rollout", "--db", db, "--bundle", "feed", "--stations", "all")
    assert code == 1 and "matches 0 published bundles" in err
    code, _, err = invoke("rollback", "--db", db, "--stations", "nobody")
    assert code == 1 and "matches no known station" in err
    code, _, err = invoke("compare", "--db", db, "--active", "a", "--candidate", "b")
    assert code == 1 and "no shadow results" in err
    code, _, _ = invoke("rollout", "--db", db, "--bundle", "x", "--stations", "all", "--soak", "soon")
    assert code == 2  # usage error


@pytest.mark.parametrize(
    ("text", "seconds"), [("60s", 60.0), ("30m", 1800.0), ("1.5h", 5400.0), ("500ms", 0.5), ("2", 2.0)]
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds
