"""The `m3dm` command line: help everywhere, exit codes, one-line reasons, --json on stdout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from trainer.cli import app

runner = CliRunner()


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["synth"],
        ["data", "info"],
        ["train"],
        ["eval"],
        ["export"],
        ["bundle", "build"],
        ["bundle", "verify"],
        ["demo"],
    ],
)
def test_every_command_has_help(args: list[str]) -> None:
    result = runner.invoke(app, [*args, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_data_info_json(tiny_dataset: Path) -> None:
    result = runner.invoke(app, ["data", "info", str(tiny_dataset), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    (cls,) = summary
    assert summary[cls]["train"]["good"] == 6 and summary[cls]["validation"]["good"] == 4


def test_train_with_missing_weights_fails_with_one_line(tiny_dataset: Path, tmp_path: Path) -> None:
    result = runner.invoke(
        app,
        [
            "train",
            "--data",
            str(tiny_dataset),
            "--all",
            "--preset",
            "m3dm",
            "--weights-dir",
            str(tmp_path),
            "--out",
            str(tmp_path / "m"),
        ],
    )
    assert result.exit_code == 1
    assert "dino_vitbase8_pretrain.pth" in result.output and "Traceback" not in result.output


def test_unknown_class_is_a_clear_error(tiny_dataset: Path, tmp_path: Path) -> None:
    result = runner.invoke(
        app, ["train", "--data", str(tiny_dataset), "--class", "nope", "--out", str(tmp_path)]
    )
    assert result.exit_code == 1 and "unknown class" in result.output


def test_eval_json_has_mean_and_per_class_variants(
    tiny_dataset: Path, tiny_model: Path, tmp_path: Path
) -> None:
    result = runner.invoke(
        app,
        ["eval", "--data", str(tiny_dataset), "--model", str(tiny_model), "--out", str(tmp_path), "--json"],
    )
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    for section in (payload["mean"], payload["classes"][tiny_model.name]):
        assert set(section) == {"rgb", "point", "fusion", "rgb+point", "rgb+point+fusion"}
        assert {"i_auroc", "p_auroc", "aupro"} <= set(section["rgb+point+fusion"])


def test_synth_preview_writes_a_contact_sheet(tmp_path: Path) -> None:
    out = tmp_path / "data"
    result = runner.invoke(
        app,
        [
            "synth",
            "--out",
            str(out),
            "--size",
            "96",
            "--n-train",
            "1",
            "--n-validation",
            "1",
            "--n-test-good",
            "1",
            "--n-test-per-defect",
            "1",
            "--class",
            "ring",
            "--workers",
            "1",
            "--preview",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert Path(summary["preview"]).stat().st_size > 5_000
    assert sorted(p.name for p in (out / "ring" / "test").iterdir()) == [
        "crack",
        "cut",
        "dent",
        "good",
        "stain",
    ]
