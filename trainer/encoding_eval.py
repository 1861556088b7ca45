"""Accuracy cost and kNN speed of each bank encoding against fp32, on the same extracted test features."""

from __future__ import annotations

import time
from typing import Any

from core.bank_codec import decode, nearest
from core.model import FrameScorer
from core.scoring import MemoryBank, nearest_neighbours, normalise_features
from trainer.bank_encode import default_pq_m, encode_bank

ENCODINGS = ("fp32", "fp16", "int8", "pq")


def _scorer_with(scorer: FrameScorer, banks: dict[str, MemoryBank]) -> FrameScorer:
    return FrameScorer(
        banks=banks, dlf=scorer.dlf, normaliser=scorer.normaliser, uff=scorer.uff, score_cfg=scorer.score_cfg
    )


def _knn_ms(encoded: dict[str, Any], scorer: FrameScorer, features: list[Any]) -> float:
    """Streaming search on the still-encoded banks (compressed in memory), ms per frame, every bank."""
    sample = features[: min(4, len(features))]
    t0 = time.perf_counter()
    for feats in sample:
        queries = {"rgb": feats.rgb_hwc, "point": feats.point_hwc}
        if "fusion" in scorer.bank_names:
            queries["fusion"] = scorer.fused_features(feats)
        for name in scorer.bank_names:
            q = normalise_features(queries[name].reshape(-1, queries[name].shape[-1]), scorer.banks[name])
            if encoded[name] is None:
                nearest_neighbours(
                    q, scorer.banks[name].feats_mc, bank_sq_norms=scorer.banks[name].sq_norms_m
                )
            else:
                nearest(encoded[name], q, k=1)
    return 1000 * (time.perf_counter() - t0) / len(sample)


def compare_encodings(info: Any, scorer: FrameScorer, scored: Any) -> dict[str, Any]:
    """Per encoding: bank bytes, kNN ms/frame, and ΔI-AUROC / ΔAUPRO of the full variant versus fp32
    (rgb+point+fusion; "rgb" for an RGB-only model)."""
    from trainer.evaluate import metrics_of, score_split

    variant = scorer.variants[-1]
    base = metrics_of(scored)[variant]
    fp32_bytes = sum(b.feats_mc.nbytes for b in scorer.banks.values())
    rows = {}
    for enc in ENCODINGS:
        encoded = {
            n: None
            if enc == "fp32"
            else encode_bank(b.feats_mc, enc, default_pq_m(b.dim) if enc == "pq" else None)
            for n, b in scorer.banks.items()
        }
        banks = {
            n: b
            if encoded[n] is None
            else MemoryBank(n, decode(encoded[n]), b.grid, b.feat_mean_c, b.feat_scale)
            for n, b in scorer.banks.items()
        }
        metrics = metrics_of(score_split(scored.split, _scorer_with(scorer, banks)))[variant]
        size = fp32_bytes if enc == "fp32" else sum(e.nbytes for e in encoded.values())
        rows[enc] = {
            "bytes": int(size),
            "compression": fp32_bytes / size,
            "knn_ms_per_frame": _knn_ms(encoded, scorer, scored.split.features),
            "i_auroc": metrics.i_auroc,
            "aupro": metrics.aupro,
            "delta_i_auroc": metrics.i_auroc - base.i_auroc,
            "delta_aupro": metrics.aupro - base.aupro,
        }
    return rows


def encodings_markdown(per_class: dict[str, dict[str, Any]]) -> str:
    lines = [
        "| class | encoding | size MB | ×smaller | kNN ms/frame | ΔI-AUROC | ΔAUPRO |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for cls, rows in per_class.items():
        for enc, r in rows.items():
            lines.append(
                f"| {cls} | {enc} | {r['bytes'] / 2**20:.2f} | {r['compression']:.1f} "
                f"| {r['knn_ms_per_frame']:.0f} | {r['delta_i_auroc']:+.4f} | {r['delta_aupro']:+.4f} |"
            )
    return "\n".join(lines) + "\n"
