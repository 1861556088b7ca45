"""Reports: markdown numbers, JSON round trip and means, PNG plots and overlays."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image

from core.errors import ConfigError, ShapeError
from trainer.metrics import VariantMetrics
from trainer.report import (
    VARIANTS,
    class_means,
    plot_pro_curves,
    plot_roc_curves,
    results_from_json,
    results_to_json,
    results_to_markdown,
    write_heatmap_overlays,
    write_json,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _results() -> dict[str, dict[str, VariantMetrics]]:
    """Two classes, five variants, distinct known numbers; tire/rgb has an undefined AU-PRO@1%."""
    results = {}
    for c, name in enumerate(["bagel", "tire"]):
        results[name] = {
            v: VariantMetrics(
                i_auroc=0.5 + 0.01 * i + 0.1 * c,
                p_auroc=0.9 + 0.01 * i,
                aupro=0.8 + 0.02 * i - 0.1 * c,
                aupro_1pct=0.3 + 0.05 * i,
            )
            for i, v in enumerate(VARIANTS)
        }
    results["tire"]["rgb"] = VariantMetrics(0.6, 0.9, 0.7, float("nan"))
    return results


def test_markdown_has_one_table_per_metric_with_the_numbers():
    text = results_to_markdown(_results())
    for title in ("### I-AUROC", "### P-AUROC", "### AUPRO@30%", "### AUPRO@1%"):
        assert text.count(title) == 1
    assert "| variant | bagel | tire | mean |" in text
    # I-AUROC fusion row: bagel 0.52, tire 0.62, mean 0.57
    assert "| fusion | 0.520 | 0.620 | 0.570 |" in text
    # AUPRO@30% rgb+point+fusion: 0.88, 0.78, mean 0.83
    assert "| rgb+point+fusion | 0.880 | 0.780 | 0.830 |" in text
    # AUPRO@1% rgb: tire undefined, mean over the defined class only
    assert "| rgb | 0.300 | – | 0.300 |" in text
    i_auroc_table = text.split("### P-AUROC")[0]
    rows = [line.split(" |")[0].strip("| ") for line in i_auroc_table.splitlines() if line.startswith("| ")]
    assert rows[1:] == list(VARIANTS)  # paper order, after the header


def test_json_round_trips_and_mean_is_class_average(tmp_path):
    results = _results()
    path = write_json(tmp_path / "out" / "results.json", results, extra={"config": {"seed": 7}})
    document = json.loads(path.read_text(encoding="utf-8"))
    assert document["config"] == {"seed": 7}
    assert document["classes"]["tire"]["rgb"]["aupro_1pct"] is None
    for variant in VARIANTS:
        for metric in ("i_auroc", "p_auroc", "aupro"):
            expected = np.mean([document["classes"][c][variant][metric] for c in ("bagel", "tire")])
            assert document["mean"][variant][metric] == pytest.approx(expected, abs=1e-12)
    assert document["mean"]["rgb"]["aupro_1pct"] == pytest.approx(0.3)
    back = results_from_json(document)
    assert back.keys() == results.keys()
    for name, per_variant in results.items():
        for variant, metrics in per_variant.items():
            for got, want in zip(
                (lambda m: (m.i_auroc, m.p_auroc, m.aupro, m.aupro_1pct))(back[name][variant]),
                (metrics.i_auroc, metrics.p_auroc, metrics.aupro, metrics.aupro_1pct),
                strict=True,
            ):
                assert (math.isnan(got) and math.isnan(want)) or got == want
    assert results_to_json(back) == results_to_json(results)


def test_write_json_refuses_to_overwrite_results(tmp_path):
    with pytest.raises(ConfigError, match=r"extra keys \['mean'\] would overwrite the results"):
        write_json(tmp_path / "r.json", _results(), extra={"mean": 1})


def test_mean_of_all_nan_stays_nan():
    nan = float("nan")
    means = class_means({"a": {"rgb": VariantMetrics(nan, nan, nan, nan)}})
    assert math.isnan(means["rgb"].aupro)
    assert results_to_json({"a": {"rgb": VariantMetrics(nan, 0.5, nan, nan)}})["mean"]["rgb"]["aupro"] is None


def _case(seed: int = 0, n: int = 6, size: int = 32):
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, size, size), dtype=bool)
    masks[3:, 8:16, 10:20] = True
    labels = masks.any(axis=(1, 2)).astype(int)
    maps = (rng.random(masks.shape) + masks).astype(np.float32)
    return labels, masks, maps


def _assert_png(path, min_size=(200, 200)):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 2000
    with Image.open(path) as image:
        assert image.size[0] >= min_size[0] and image.size[1] >= min_size[1]


def test_roc_and_pro_plots_are_pngs(tmp_path):
    labels, masks, maps = _case()
    rng = np.random.default_rng(1)
    scores = {"rgb": maps.max(axis=(1, 2)), "point": rng.random(len(labels))}
    _assert_png(plot_roc_curves(tmp_path / "roc.png", labels, scores, "bagel"))
    maps_by_variant = {"rgb": maps, "point": rng.random(maps.shape)}
    _assert_png(plot_pro_curves(tmp_path / "plots" / "pro.png", masks, maps_by_variant, "bagel"))
    _assert_png(plot_pro_curves(tmp_path / "pro1.png", masks, maps_by_variant, "bagel", fpr_limit=0.01))


def test_plots_survive_undefined_metrics(tmp_path):
    labels, masks, maps = _case()
    _assert_png(plot_roc_curves(tmp_path / "roc.png", np.zeros_like(labels), {"rgb": labels}, "good only"))
    _assert_png(plot_pro_curves(tmp_path / "pro.png", np.zeros_like(masks), {"rgb": maps}, "good only"))


def _overlay_inputs(n: int = 4):
    """Images 0-2 good, 3 onwards with a defect; rgb a flat grey per image."""
    labels, masks, maps = _case(n=n)
    rgb = [np.full((*m.shape, 3), 40 * i, dtype=np.uint8) for i, m in enumerate(maps)]
    names = [f"class/test/{i:03d}.png" for i in range(n)]
    return rgb, list(maps), list(masks), names


def test_overlays_count_names_and_content(tmp_path):
    rgb, maps, masks, names = _overlay_inputs()
    paths = write_heatmap_overlays(tmp_path / "ov", rgb, maps, masks, names, threshold=1.2, max_images=2)
    assert [p.name for p in paths] == ["000_class_test_000.png", "001_class_test_001.png"]
    assert sorted(p.name for p in (tmp_path / "ov").iterdir()) == [p.name for p in paths]
    for path in paths:
        _assert_png(path, min_size=(800, 300))
    everything = write_heatmap_overlays(tmp_path / "all", rgb, maps, masks, names, max_images=8)
    assert len(everything) == 4


def test_overlays_use_one_shared_scale_and_are_reproducible(tmp_path):
    """A good image drawn alone with the class range gives the same bytes as drawn among defect images."""
    rgb, maps, masks, names = ([items[0], items[3]] for items in _overlay_inputs())
    together = write_heatmap_overlays(tmp_path / "a", rgb, maps, masks, names)
    value_range = {"vmin": float(min(m.min() for m in maps)), "vmax": float(max(m.max() for m in maps))}
    alone = write_heatmap_overlays(tmp_path / "b", rgb[:1], maps[:1], masks[:1], names[:1], **value_range)
    assert alone[0].read_bytes() == together[0].read_bytes()
    per_image = write_heatmap_overlays(tmp_path / "c", rgb[:1], maps[:1], masks[:1], names[:1])
    assert per_image[0].read_bytes() != together[0].read_bytes()


def test_overlays_reject_mismatched_inputs(tmp_path):
    rgb, maps, masks, names = _overlay_inputs()
    with pytest.raises(ShapeError, match="rgb, maps, masks and names must have equal lengths"):
        write_heatmap_overlays(tmp_path, rgb, maps, masks, names[:-1])
    maps[0] = maps[0][:-1]
    with pytest.raises(ShapeError, match=r"rgb \(32, 32, 3\), map \(31, 32\), mask \(32, 32\) differ"):
        write_heatmap_overlays(tmp_path, rgb, maps, masks, names)
