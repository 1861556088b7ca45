"""Score drift: each station's recent OK image scores against its bundle's validation-normal quantiles.

Reference: `quantiles` are 21 values (the 0, 5, ..., 100th percentiles) of the variant's image scores on
held-out normal parts, read from the bundle manifest (`thresholds.score_quantiles[variant]`, or
`scoring.score_quantiles[variant]`) of every bundle under the collector's `--bundles` folder. Without a
reference the state is `unknown`: the collector never guesses a baseline.

Only OK results enter the window (NOK parts are the defects, not drift), so the reference is truncated at
the decision threshold the same way: the expected share of each quantile bin is its reference mass below
the threshold, renormalised. The statistics are the population-stability index over those bins and the
Kolmogorov-Smirnov distance to the truncated reference CDF. PSI above `psi_max` (or KS above `ks_max`)
raises an alarm; it clears once PSI falls below 0.8 * psi_max (hysteresis, so a stream near the bound does
not flap). Transitions are stored as events (`drift_alarm_raised` / `drift_alarm_cleared`).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from collector.metrics import CollectorMetrics
from collector.store import Store

__all__ = ["DriftConfig", "DriftStats", "drift_stats", "evaluate_drift", "load_references"]

log = logging.getLogger("m3dm.collector.drift")

_EPS = 1e-4
_CLEAR_FRACTION = 0.8
_MIN_REFERENCE_MASS = 0.05  # below this share of normal scores under the threshold the reference is useless
_STREAM_LOOKBACK_S = 86400.0


@dataclass(frozen=True)
class DriftConfig:
    window: int = 500
    min_n: int = 200
    psi_max: float = 0.25
    ks_max: float | None = None


@dataclass(frozen=True)
class DriftStats:
    psi: float
    ks: float
    n: int


def _reference_cdf(quantiles: np.ndarray, x: np.ndarray) -> np.ndarray:
    probs = np.linspace(0.0, 1.0, len(quantiles))
    return np.interp(x, quantiles, probs, left=0.0, right=1.0)


def drift_stats(scores: Any, quantiles: Any, threshold: float | None) -> DriftStats | None:
    """PSI and KS of OK `scores` vs the reference truncated at `threshold`; None if the reference is unusable.

    Bins are the reference's own quantile intervals (equal mass before truncation), so PSI needs no
    binning choice of its own.
    """
    q = np.sort(np.asarray(quantiles, dtype=np.float64))
    cut = np.inf if threshold is None else float(threshold)
    x = np.minimum(np.sort(np.asarray(scores, dtype=np.float64)), cut)
    if q.size < 3 or x.size == 0:
        return None
    mass_below = 1.0 if np.isinf(cut) else float(_reference_cdf(q, np.array([cut]))[0])
    if mass_below < _MIN_REFERENCE_MASS:
        return None
    inner = q[1:-1]
    upper = np.minimum(np.append(inner, np.inf), cut)
    cdf_upper = np.where(np.isinf(upper), 1.0, _reference_cdf(q, np.where(np.isinf(upper), 0.0, upper)))
    cdf_lower = np.concatenate([[0.0], cdf_upper[:-1]])
    expected = (cdf_upper - cdf_lower) / mass_below
    # bin i holds (inner[i-1], inner[i]]: side="left" puts a score equal to a cut point in the lower bin
    observed = np.bincount(np.searchsorted(inner, x, side="left"), minlength=inner.size + 1) / x.size
    psi = float(np.sum((observed - expected) * np.log((observed + _EPS) / (expected + _EPS))))
    ref = _reference_cdf(q, x) / mass_below
    n = x.size
    ks = float(max(np.max(np.arange(1, n + 1) / n - ref), np.max(ref - np.arange(0, n) / n)))
    return DriftStats(psi=psi, ks=ks, n=int(n))


def _decide(stats: DriftStats | None, previous: str | None, cfg: DriftConfig) -> str:
    if stats is None or stats.n < cfg.min_n:
        return "unknown"
    over = stats.psi > cfg.psi_max or (cfg.ks_max is not None and stats.ks > cfg.ks_max)
    if previous == "alarm" and not over:
        still = stats.psi > _CLEAR_FRACTION * cfg.psi_max
        still = still or (cfg.ks_max is not None and stats.ks > _CLEAR_FRACTION * cfg.ks_max)
        return "alarm" if still else "ok"
    return "alarm" if over else "ok"


def evaluate_drift(
    store: Store, cfg: DriftConfig, metrics: CollectorMetrics | None = None, now: float | None = None
) -> list[dict[str, Any]]:
    """Recompute the drift state of every stream active in the last day; returns the new states."""
    now = time.time() if now is None else now
    previous = {(d["station_id"], d["bundle_id"], d["variant"]): d["state"] for d in store.drift_states()}
    out = []
    for stream in store.active_streams(now - _STREAM_LOOKBACK_S):
        key = (stream["station_id"], stream["bundle_id"], stream["variant"])
        ref = store.drift_reference(stream["bundle_id"], stream["variant"])
        scores = store.ok_scores(*key, limit=cfg.window)
        stats, reason = None, f"no reference quantiles for bundle {stream['bundle_id']} / {stream['variant']}"
        if ref is not None:
            threshold = store.latest_threshold(*key)
            stats = drift_stats(
                scores, ref["quantiles"], threshold if threshold is not None else ref["threshold"]
            )
            reason = "reference unusable below the threshold" if stats is None else ""
            if stats is not None and stats.n < cfg.min_n:
                reason = f"{stats.n} OK scores < {cfg.min_n}"
        state = _decide(stats, previous.get(key), cfg)
        row = dict(zip(("station_id", "bundle_id", "variant"), key, strict=True))
        row.update(bundle_version=stream["bundle_version"], state=state, reason=reason, n=len(scores))
        row.update(psi=None if stats is None else stats.psi, ks=None if stats is None else stats.ks)
        changed = store.set_drift_state(row, now)
        _report(store, row, previous.get(key), changed, metrics)
        out.append(row)
    if metrics is not None:
        metrics.drift_alarms.set(sum(1 for s in store.drift_states() if s["state"] == "alarm"))
    return out


def _report(
    store: Store,
    row: dict[str, Any],
    before: str | None,
    changed: str | None,
    metrics: CollectorMetrics | None,
) -> None:
    if metrics is not None and row["psi"] is not None:
        metrics.drift_psi.labels(row["station_id"]).set(row["psi"])
    if changed is None or "alarm" not in (row["state"], before):
        return
    kind = "drift_alarm_raised" if row["state"] == "alarm" else "drift_alarm_cleared"
    detail = {"psi": f"{row['psi']:.4f}" if row["psi"] is not None else "", "variant": row["variant"]}
    detail.update(ks=f"{row['ks']:.4f}" if row["ks"] is not None else "", n=str(row["n"]))
    store.add_event(row["station_id"], kind, detail, row["bundle_id"], row["bundle_version"])
    log.warning(
        "drift: station %s bundle %s %s (psi %s, ks %s, n %d)",
        row["station_id"],
        row["bundle_version"],
        kind,
        detail["psi"],
        detail["ks"],
        row["n"],
    )


def _manifest_quantiles(data: dict[str, Any]) -> tuple[dict[str, list[float]], dict[str, float]]:
    thresholds = data.get("thresholds") or {}
    found: dict[str, list[float]] = {}
    for section in (data.get("scoring") or {}, thresholds):
        quantiles = section.get("score_quantiles") if isinstance(section, dict) else None
        if isinstance(quantiles, dict):
            found.update({str(k): [float(v) for v in vals] for k, vals in quantiles.items()})
    limits = {}
    if isinstance(thresholds, dict) and "variant" in thresholds and "image_threshold" in thresholds:
        limits[str(thresholds["variant"])] = float(thresholds["image_threshold"])
    return found, limits


def load_references(store: Store, bundles_dir: Path, seen: dict[Path, int] | None = None) -> int:
    """Read every `manifest.json` under `bundles_dir` (changed since `seen`) into the drift references.

    The collector only reads these statistics; it does not install or run bundles, so it does not verify
    signatures (stations do). Unreadable manifests are logged and skipped. Returns references stored.
    """
    seen = {} if seen is None else seen
    stored = 0
    for path in sorted(Path(bundles_dir).rglob("manifest.json")):
        try:
            mtime = path.stat().st_mtime_ns
            if seen.get(path) == mtime:
                continue
            seen[path] = mtime
            data = json.loads(path.read_text())
            bundle_id = str(data["bundle_id"])
            quantiles, limits = _manifest_quantiles(data)
        except (OSError, ValueError, KeyError, TypeError) as err:
            log.warning("drift: skipping unreadable manifest %s: %s", path, err)
            continue
        for variant, values in quantiles.items():
            if len(values) < 3 or any(b < a for a, b in zip(values, values[1:], strict=False)):
                log.warning("drift: %s: score_quantiles[%s] must be >= 3 ascending values", path, variant)
                continue
            store.set_drift_reference(bundle_id, variant, values, limits.get(variant), str(path))
            stored += 1
    return stored
