"""`m3dm synth --corrupt`: each bad case raises its typed error naming the file, as a station reads it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

import core.errors
from core.config import PreprocessConfig
from core.mvtec3d import SampleRef, list_samples, load_scan
from core.preprocess import prepare_scan
from trainer.cli import app
from trainer.synth.corrupt import CASES, EXPECTED_NAME, plan_cases, write_corrupt_set

runner = CliRunner()


@pytest.fixture(scope="module")
def corrupt_set(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("corrupt")
    result = runner.invoke(
        app, ["synth", "--corrupt", "--out", str(out), "--size", "224", "--n-test-good", "3", "--json"]
    )
    assert result.exit_code == 0, result.output
    expected = json.loads((out / EXPECTED_NAME).read_text())
    assert json.loads(result.stdout[result.stdout.index("{") :]) == expected
    return out, expected


def _read_and_prepare(root: Path, entry: dict) -> None:
    """What a station does with one rgb/xyz pair: read both files, then preprocess."""
    ref = SampleRef(
        root, "ring", "test", "good", entry["stem"], root / entry["rgb"], root / entry["xyz"], None
    )
    prepare_scan(load_scan(ref), PreprocessConfig())


def test_every_case_is_present_once_among_good_scans(corrupt_set: tuple[Path, dict]) -> None:
    _, expected = corrupt_set
    cases = [e["case"] for e in expected["cases"]]
    assert sorted(c for c in cases if c != "good") == sorted(CASES)
    assert cases[0] == cases[-1] == "good" and cases.count("good") == 3
    assert expected["counts"] == {"good": 3, "bad": len(CASES)}


@pytest.mark.parametrize("case", ["good", *CASES])
def test_case_raises_its_typed_error_naming_the_file(corrupt_set: tuple[Path, dict], case: str) -> None:
    root, expected = corrupt_set
    entries = [e for e in expected["cases"] if e["case"] == case]
    assert entries
    for entry in entries:
        if entry["error"] is None:
            _read_and_prepare(root, entry)  # good scans prepare cleanly
            continue
        error_cls = getattr(core.errors, entry["error"])
        with pytest.raises(error_cls, match=f"^{re.escape(str(root))}/") as info:
            _read_and_prepare(root, entry)
        assert type(info.value) is error_cls, f"{case}: {type(info.value).__name__}, wanted {entry['error']}"
        named = {str(root / entry["file"])} | ({str(root / entry["partner"])} if entry["partner"] else set())
        assert info.value.path in named, f"{case}: error names {info.value.path}, wanted one of {named}"


def test_listing_the_folder_names_the_orphan_of_a_missing_pair(corrupt_set: tuple[Path, dict]) -> None:
    root, expected = corrupt_set
    orphans = {str(root / e["file"]) for e in expected["cases"] if e["case"].startswith("missing_")}
    with pytest.raises(core.errors.MissingFileError, match="rgb file has no xyz partner") as info:
        list_samples(root, "ring", "test")
    assert info.value.path in orphans


def test_same_seed_same_bytes(tmp_path: Path) -> None:
    first = write_corrupt_set(tmp_path / "a", seed=3, size_px=64, n_good=2)
    second = write_corrupt_set(tmp_path / "b", seed=3, size_px=64, n_good=2)
    assert first == second
    for entry in first["cases"]:
        for kind in ("rgb", "xyz"):
            a, b = tmp_path / "a" / entry[kind], tmp_path / "b" / entry[kind]
            assert a.exists() == b.exists()
            assert not a.exists() or a.read_bytes() == b.read_bytes()


def test_plan_needs_two_good_scans_and_spreads_bad_ones() -> None:
    with pytest.raises(core.errors.ConfigError, match="needs at least 2 good scans"):
        plan_cases(1)
    order = plan_cases(4)
    assert order[0] == order[-1] == "good"
    assert order.count("good") == 4 and sorted(c for c in order if c != "good") == sorted(CASES)
    assert "good" in order[2:-2]  # not all bunched at the ends


def test_refuses_to_overwrite_without_the_flag(tmp_path: Path) -> None:
    write_corrupt_set(tmp_path, size_px=64, n_good=2)
    result = runner.invoke(app, ["synth", "--corrupt", "--out", str(tmp_path), "--size", "64"])
    assert result.exit_code == 1
    assert "already holds data" in result.output
