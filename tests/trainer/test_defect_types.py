"""Tests of the per-defect-type image AUROC (trainer/defect_types.py) that `m3dm eval` reports."""

from __future__ import annotations

import numpy as np
import pytest

from core.errors import ShapeError
from trainer.defect_types import auroc_by_defect_type, defect_types_markdown, scan_records
from trainer.metrics import image_auroc


def test_each_type_is_good_against_that_type_only() -> None:
    types = ["good", "good", "good", "dent", "dent", "stain", "stain"]
    # rgb sees the stains but not the dents, point the reverse
    rgb = np.array([0.1, 0.2, 0.3, 0.15, 0.25, 0.9, 0.8])
    point = np.array([0.1, 0.2, 0.3, 0.9, 0.7, 0.05, 0.2])
    table = auroc_by_defect_type(types, {"rgb": rgb, "point": point})
    assert table["rgb"]["stain"] == 1.0 and table["point"]["dent"] == 1.0
    assert table["rgb"]["dent"] == pytest.approx(image_auroc(np.array([0, 0, 0, 1, 1]), rgb[:5]))
    # stain 0.05 beats no good scan; 0.2 beats 0.1 and ties 0.2 (half a win): 1.5 wins of 6 pairs
    assert table["point"]["stain"] == pytest.approx(0.25)


def test_pooled_auroc_is_the_count_weighted_mean_of_the_types() -> None:
    rng = np.random.default_rng(3)
    types = ["good"] * 12 + ["hole"] * 5 + ["crack"] * 3 + ["bump"] * 7
    scores = rng.normal(size=len(types)) + np.array([t != "good" for t in types]) * 0.7
    table = auroc_by_defect_type(types, {"full": scores})["full"]
    counts = {"hole": 5, "crack": 3, "bump": 7}
    pooled = image_auroc(np.array([t != "good" for t in types], np.int64), scores)
    assert sum(counts[k] * table[k] for k in counts) / 15 == pytest.approx(pooled)


def test_no_good_scans_gives_no_table_and_mismatched_scores_are_refused() -> None:
    assert auroc_by_defect_type(["dent", "hole"], {"rgb": np.array([1.0, 2.0])}) == {}
    assert defect_types_markdown({"tread": {}}) == ""
    with pytest.raises(ShapeError, match="2 image scores for 3 scans"):
        auroc_by_defect_type(["good", "dent", "dent"], {"rgb": np.array([1.0, 2.0])})


def test_markdown_and_scan_records() -> None:
    table = auroc_by_defect_type(["good", "dent", "stain"], {"rgb": np.array([0.0, 1.0, -1.0])})
    text = defect_types_markdown({"flange": table})
    assert "### flange: I-AUROC per defect type" in text
    assert "| dent | 1.000 |" in text and "| stain | 0.000 |" in text
    records = scan_records(["good", "dent"], ["000", "001"], {"rgb": np.array([0.5, 2.0])})
    assert records == [
        {"defect_type": "good", "stem": "000", "image": {"rgb": 0.5}},
        {"defect_type": "dent", "stem": "001", "image": {"rgb": 2.0}},
    ]
