"""Tests of the seed sweep (trainer/sweep.py, `m3dm eval --seeds`): parsing, statistics over seeds, the
table, resuming from finished runs, and the CLI's refusals. The generate-train-evaluate path of one run
is the same `train_classes` / `evaluate_models` calls that tests/trainer/test_pipeline.py exercises."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from core.errors import ConfigError
from trainer.cli import app
from trainer.sweep import (
    SweepConfig,
    aggregate,
    family_of_classes,
    mean_sd,
    parse_seeds,
    run_sweep,
    sweep_markdown,
)


def _run(family: str, seed: int, full_i: float, rgb_i: float, train_s: float) -> dict:
    metrics = {"rgb": {"i_auroc": rgb_i, "p_auroc": 0.9, "aupro": None}}
    metrics["rgb+point+fusion"] = {"i_auroc": full_i, "p_auroc": 0.95, "aupro": 0.8 + seed / 100}
    return {
        "family": family,
        "seed": seed,
        "preset": "m3dm-free",
        "classes_run": ["tread"],
        "mean": metrics,
        "classes": {"tread": metrics},
        "train_seconds": train_s,
        "synth_seconds": 1.0,
    }


def test_parse_seeds_lists_and_ranges() -> None:
    assert parse_seeds("0,1,2") == (0, 1, 2)
    assert parse_seeds("3-5") == (3, 4, 5)
    assert parse_seeds("7") == (7,)
    with pytest.raises(ConfigError, match="--seeds wants integers"):
        parse_seeds("a,b")


def test_mean_sd_is_the_sample_sd_over_defined_values() -> None:
    mean, sd, n = mean_sd([0.8, 0.9, 1.0, None, math.nan])
    assert n == 3 and mean == pytest.approx(0.9) and sd == pytest.approx(0.1)
    mean, sd, n = mean_sd([0.7])
    assert (mean, n) == (0.7, 1) and math.isnan(sd)
    assert mean_sd([None])[2] == 0


def test_aggregate_and_markdown() -> None:
    runs = [_run("b", 0, 0.90, 0.60, 10.0), _run("b", 1, 1.00, 0.70, 14.0), _run("b", 2, 0.95, 0.80, 12.0)]
    agg = aggregate(runs)
    full = agg["variants"]["rgb+point+fusion"]
    assert full["i_auroc"]["mean"] == pytest.approx(0.95) and full["i_auroc"]["sd"] == pytest.approx(0.05)
    assert full["aupro"]["mean"] == pytest.approx(0.81) and full["aupro"]["n"] == 3
    assert agg["variants"]["rgb"]["aupro"] == {"mean": None, "sd": None, "n": 0}
    assert list(agg["variants"]) == ["rgb", "rgb+point+fusion"]  # the paper's order, present ones only
    assert agg["train_seconds"]["mean"] == pytest.approx(12.0) and agg["seeds"] == [0, 1, 2]
    text = sweep_markdown({"preset": "m3dm-free", "families": {"b": agg}})
    assert "| rgb+point+fusion | 0.950 ± 0.050 | 0.950 ± 0.000 | 0.810 ± 0.010 |" in text
    assert "| rgb | 0.700 ± 0.100 | 0.900 ± 0.000 | – |" in text
    assert "Family b, preset m3dm-free, seeds 0,1,2 (classes: tread)" in text
    assert "12.000 ± 2.000 s" in text
    assert agg["per_defect_type_i_auroc"] == {}  # these runs carry no breakdown: no table, no error


def test_per_defect_type_statistics_over_seeds() -> None:
    runs = []
    for seed, stain in enumerate((0.4, 0.6, 0.5)):
        run = _run("b", seed, 0.9, 0.7, 10.0)
        run["i_auroc_by_defect_type"] = {
            "tread": {"rgb": {"stain": stain, "hole": 1.0}, "rgb+point+fusion": {"stain": 0.9, "hole": 1.0}}
        }
        runs.append(run)
    runs.append(_run("b", 3, 0.9, 0.7, 10.0))  # resumed from before the breakdown existed: adds nothing
    agg = aggregate(runs)
    stain = agg["per_defect_type_i_auroc"]["tread"]["stain"]
    assert stain["rgb"]["mean"] == pytest.approx(0.5) and stain["rgb"]["sd"] == pytest.approx(0.1)
    assert stain["rgb"]["n"] == 3
    text = sweep_markdown({"preset": "m3dm-free", "families": {"b": agg}})
    assert "| tread: defect type | rgb | rgb+point+fusion |" in text
    assert "| stain | 0.500 ± 0.100 | 0.900 ± 0.000 |" in text


def test_run_sweep_resumes_from_finished_runs(tmp_path: Path) -> None:
    """Finished (family, seed) runs are read back, not regenerated: an interrupted sweep resumes."""
    for seed, full in ((0, 0.9), (1, 0.8)):
        run_dir = tmp_path / "family-b" / f"seed-{seed}"
        run_dir.mkdir(parents=True)
        (run_dir / "sweep_run.json").write_text(json.dumps(_run("b", seed, full, 0.5, 3.0)))
    cfg = SweepConfig(seeds=(0, 1), families=("b",), classes={"b": ("tread",)})
    summary = run_sweep(tmp_path, cfg)
    full = summary["families"]["b"]["variants"]["rgb+point+fusion"]["i_auroc"]
    assert full["mean"] == pytest.approx(0.85) and full["n"] == 2
    assert not (tmp_path / "family-b" / "seed-0" / "data").exists()
    assert json.loads((tmp_path / "sweep.json").read_text())["families"]["b"]["seeds"] == [0, 1]
    assert (tmp_path / "sweep.md").read_text() == summary["markdown"]


def test_config_and_class_errors() -> None:
    with pytest.raises(ConfigError, match="seeds must be distinct"):
        SweepConfig(seeds=(1, 1))
    with pytest.raises(ConfigError, match="families must be distinct names"):
        SweepConfig(families=("c",))
    assert family_of_classes(["ring", "tread", "flange"]) == {"a": ("ring",), "b": ("tread", "flange")}
    with pytest.raises(ConfigError, match="unknown class 'bagel'"):
        family_of_classes(["bagel"])


def test_cli_seeds_refuses_given_data_and_eval_still_needs_data(tmp_path: Path) -> None:
    both = CliRunner().invoke(app, ["eval", "--seeds", "0", "--data", str(tmp_path)])
    assert both.exit_code == 2 and "--seeds generates its own data" in both.output
    neither = CliRunner().invoke(app, ["eval", "--model", str(tmp_path)])
    assert neither.exit_code == 2 and "give --data" in neither.output
