"""`m3dm bundle keygen|build|verify|inspect` and the bad-input cases: exit codes and one-line messages."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from trainer.cli import app

runner = CliRunner()


def run(*args: str | Path) -> tuple[int, str]:
    result = runner.invoke(app, [str(a) for a in args])
    assert "Traceback" not in result.output, result.output
    return result.exit_code, result.output


@pytest.fixture
def private_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A temp folder of our own as TMPDIR, to see what a command leaves behind there."""
    scratch = tmp_path / "tmpdir"
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))
    monkeypatch.setattr(tempfile, "tempdir", None)
    return scratch


# ------------------------------------------------------------------------------------------- keygen


def test_keygen_writes_a_pair_and_refuses_to_overwrite(tmp_path: Path) -> None:
    code, out = run("bundle", "keygen", "--out", tmp_path / "k")
    assert code == 0 and "bundle_signing.key" in out and "bundle_signing.pub" in out
    assert (tmp_path / "k" / "bundle_signing.key").stat().st_mode & 0o777 == 0o600
    before = (tmp_path / "k" / "bundle_signing.key").read_bytes()
    code, out = run("bundle", "keygen", "--out", tmp_path / "k")
    assert code == 1 and "refusing to overwrite" in out and out.count("\n") == 1
    assert (tmp_path / "k" / "bundle_signing.key").read_bytes() == before


# -------------------------------------------------------------------------------------------- build


def test_build_json_summary_and_refusals(fleet_bundle: dict, tmp_path: Path) -> None:
    model, keys = fleet_bundle["model"], fleet_bundle["keys"]
    code, out = run("bundle", "build", "--model", model, "--key", keys, "--out", tmp_path / "b", "--json")
    assert code == 0, out
    summary = json.loads(out)
    assert summary["version"] == "1.0.0" and summary["banks"] == dict.fromkeys(
        ("rgb", "point", "fusion"), "fp32"
    )
    assert Path(summary["tar"]).is_file() and summary["golden"] == 0  # no --data: no golden samples
    code, out = run("bundle", "build", "--model", model, "--key", keys, "--out", tmp_path / "b")
    assert code == 1 and "bundle directory already exists" in out
    code, out = run(
        "bundle", "build", "--model", model, "--key", keys, "--out", tmp_path / "c", "--version", "1.2"
    )
    assert code == 1 and "semver" in out
    code, out = run("bundle", "build", "--model", tmp_path / "nope", "--key", keys, "--out", tmp_path / "d")
    assert code == 1 and "not a model folder" in out
    code, out = run("bundle", "build", "--model", model, "--key", tmp_path, "--out", tmp_path / "e")
    assert code == 1 and "cannot load signing key" in out
    code, out = run(
        "bundle", "build", "--model", model, "--key", keys, "--out", tmp_path / "f", "--bank-encoding", "zip"
    )
    assert code == 1 and "zip" in out
    code, _ = run("bundle", "build", "--key", keys, "--out", tmp_path / "g")
    assert code == 2  # usage: --model missing


def test_build_exports_a_model_that_was_never_exported(fleet_bundle: dict, tmp_path: Path) -> None:
    from edge.model_store import read_model_json
    from trainer.model_io import write_model_json

    model = Path(
        shutil.copytree(fleet_bundle["model"], tmp_path / "model", ignore=shutil.ignore_patterns("onnx"))
    )
    raw = read_model_json(model)
    for key in ("networks", "export", "format"):
        raw.pop(key, None)
    write_model_json(model, raw)
    code, out = run(
        "bundle", "build", "--model", model, "--key", fleet_bundle["keys"], "--out", tmp_path / "b"
    )
    assert code == 0, out
    assert (model / "onnx" / "uff.onnx").is_file() and read_model_json(model)["export"]["parity"]["uff"]["ok"]
    code, out = run("bundle", "verify", tmp_path / "b", "--key", fleet_bundle["keys"])
    assert code == 0, out


# ------------------------------------------------------------------------------------------- verify


def test_verify_ok_from_dir_and_tar_leaves_nothing_in_tmp(fleet_bundle: dict, private_tmp: Path) -> None:
    for target in (fleet_bundle["bundle"], fleet_bundle["tar"]):
        code, out = run("bundle", "verify", target, "--key", fleet_bundle["keys"])
        assert code == 0, out
        lines = out.strip().splitlines()
        assert [line.split()[0] for line in lines] == ["ok"] * 6
        assert lines[-1].startswith("ok      golden: 3 replayed on ONNX Runtime")
    assert list(private_tmp.iterdir()) == []  # the tar's extracted copy (MBs) is gone


def test_verify_failure_names_the_check_and_skips_the_rest(fleet_bundle: dict, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(fleet_bundle["bundle"], tmp_path / "b"))
    (copy / "banks" / "extra.npy").write_bytes(b"x")
    code, out = run("bundle", "verify", copy, "--key", fleet_bundle["keys"])
    assert code == 1
    assert "ok      signature: Ed25519 signature valid" in out
    assert "FAIL    hashes: [hashes] banks/extra.npy: file is not listed" in out
    for later in ("expiry", "rollback", "golden"):
        assert f"SKIPPED {later}:" in out
    code, out = run("bundle", "verify", copy, "--key", fleet_bundle["keys"], "--json")
    assert code == 1
    statuses = {name: c["status"] for name, c in json.loads(out)["checks"].items()}
    assert statuses == {
        "schema": "ok",
        "signature": "ok",
        "hashes": "failed",
        "expiry": "skipped",
        "rollback": "skipped",
        "golden": "skipped",
    }


def test_verify_rollback_and_wrong_key(fleet_bundle: dict, tmp_path: Path) -> None:
    from trainer.bundle import keygen

    code, out = run(
        "bundle", "verify", fleet_bundle["bundle"], "--key", fleet_bundle["keys"], "--min-counter", "2"
    )
    assert code == 1 and "FAIL    rollback: [rollback] anti_rollback_counter 1 < station minimum 2" in out
    _, other = keygen(tmp_path / "other")
    code, out = run("bundle", "verify", fleet_bundle["bundle"], "--key", other)
    assert code == 1 and "FAIL    signature" in out and "SKIPPED hashes" in out


def test_verify_of_a_truncated_tar_is_one_line_and_leaves_nothing(
    fleet_bundle: dict, tmp_path: Path, private_tmp: Path
) -> None:
    cut = tmp_path / "cut.tar"
    cut.write_bytes(fleet_bundle["tar"].read_bytes()[:20_000])
    code, out = run("bundle", "verify", cut, "--key", fleet_bundle["keys"])
    assert code == 1 and "ArchiveError" in out and out.count("\n") == 1
    assert list(private_tmp.iterdir()) == []


# ------------------------------------------------------------------------------------------ inspect


def test_inspect_dir_tar_empty_and_missing(fleet_bundle: dict, tmp_path: Path) -> None:
    code, out = run("bundle", "inspect", fleet_bundle["tar"])
    assert code == 0, out
    summary = json.loads(out)
    assert summary["bundle_id"] == fleet_bundle["bundle_id"] and summary["verified"] is False
    assert summary["golden_samples"] == 3
    (tmp_path / "empty").mkdir()
    code, out = run("bundle", "inspect", tmp_path / "empty")
    assert code == 1 and "not a bundle: manifest.json is missing" in out and "not valid JSON" not in out
    code, out = run("bundle", "inspect", tmp_path / "nothing.tar")
    assert code == 1 and "no such bundle folder or archive" in out


# -------------------------------------------------------------------------------------- bad inputs


def test_data_info_on_an_empty_or_missing_folder_is_an_error(tmp_path: Path) -> None:
    code, out = run("data", "info", tmp_path)
    assert code == 1 and f"no classes found under {tmp_path}" in out
    code, out = run("data", "info", tmp_path / "missing")
    assert code == 1 and "does not exist" in out


def test_eval_on_a_missing_data_root_names_the_root_not_the_class(tiny_model: Path, tmp_path: Path) -> None:
    code, out = run("eval", "--data", tmp_path / "no-data", "--model", tiny_model)
    assert code == 1 and f"data root {tmp_path / 'no-data'} does not exist" in out
    assert tiny_model.name not in out.replace(str(tiny_model), "")


@pytest.mark.parametrize("epochs", ["0", "-3"])
def test_uff_epochs_below_one_is_a_usage_error(tiny_dataset: Path, tmp_path: Path, epochs: str) -> None:
    code, out = run("train", "--data", tiny_dataset, "--all", "--out", tmp_path / "m", "--uff-epochs", epochs)
    assert code == 2 and "--uff-epochs" in out and "greaterthanorequalto1" in out.replace(" ", "")
    assert not (tmp_path / "m").exists()  # nothing trained, nothing saved


def test_uff_epochs_below_one_is_refused_by_the_api_too(tiny_dataset: Path, tmp_path: Path) -> None:
    from core.errors import ConfigError
    from trainer.pipeline import train_classes

    with pytest.raises(ConfigError, match=r"--uff-epochs must be >= 1, got -3"):
        train_classes(tiny_dataset, tmp_path, [], True, "m3dm-free", None, False, 0, uff_epochs=-3)
    assert not any(tmp_path.iterdir())
