"""Image AUROC per defect type: which defects each bank separates from good scans, and which it misses.

A class mean hides why a variant is weak: a point bank cannot see a colour-only stain, an rgb bank cannot
see a dent of the same colour, and the fused score should catch both. Each figure here is the I-AUROC of
the good test scans against the scans of one defect type, with the same image scores the class table uses.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from core.errors import ShapeError
from trainer.metrics import image_auroc

__all__ = ["GOOD", "auroc_by_defect_type", "defect_types_markdown", "scan_records"]

GOOD = "good"

# variant -> defect type -> I-AUROC (good vs that type)
ByType = Mapping[str, Mapping[str, float]]


def auroc_by_defect_type(defect_types_n: Sequence[str], image_by_variant: Mapping[str, np.ndarray]) -> dict:
    """{variant: {defect type: I-AUROC of good vs that type}}; {} when the split has no good scans.

    Args:
        defect_types_n: (N,) the folder name of each scan ("good" or a defect type).
        image_by_variant: variant -> (N,) image scores in the same order.
    """
    types_n = np.asarray(defect_types_n, dtype=object)
    is_good_n = types_n == GOOD
    if not is_good_n.any():
        return {}
    kinds = sorted({str(t) for t in types_n[~is_good_n]})
    table: dict[str, dict[str, float]] = {}
    for variant, scores_n in image_by_variant.items():
        scores_n = np.asarray(scores_n, dtype=np.float64)
        if scores_n.shape != types_n.shape:
            raise ShapeError(f"{variant}: {scores_n.size} image scores for {types_n.size} scans")
        table[variant] = {}
        for kind in kinds:
            keep_n = is_good_n | (types_n == kind)
            table[variant][kind] = image_auroc((types_n[keep_n] == kind).astype(np.int64), scores_n[keep_n])
    return table


def scan_records(
    defect_types_n: Sequence[str], stems_n: Sequence[str], image_by_variant: Mapping[str, np.ndarray]
) -> list[dict[str, Any]]:
    """One JSON-ready record per scan: its folder, file stem and image score per variant."""
    scores = {v: np.asarray(s, dtype=np.float64) for v, s in image_by_variant.items()}
    return [
        {
            "defect_type": str(kind),
            "stem": str(stem),
            "image": {v: float(s[i]) for v, s in scores.items()},
        }
        for i, (kind, stem) in enumerate(zip(defect_types_n, stems_n, strict=True))
    ]


def _cell(value: float | None) -> str:
    return "–" if value is None or np.isnan(value) else f"{value:.3f}"


def defect_types_markdown(per_class: Mapping[str, ByType]) -> str:
    """One table per class: rows = defect types, columns = variants; "" when no class has any."""
    sections = []
    for class_name, by_variant in per_class.items():
        if not by_variant:
            continue
        variants = list(by_variant)
        kinds = sorted({k for per in by_variant.values() for k in per})
        lines = [
            f"### {class_name}: I-AUROC per defect type (good vs that type)",
            "",
            "| defect type | " + " | ".join(variants) + " |",
            "|---|" + "---:|" * len(variants),
        ]
        for kind in kinds:
            lines.append(f"| {kind} | " + " | ".join(_cell(by_variant[v].get(kind)) for v in variants) + " |")
        sections.append("\n".join(lines))
    return "\n\n".join(sections) + ("\n" if sections else "")
