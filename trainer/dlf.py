"""Decision-layer fusion fitting (spec §8): score normaliser and the linear one-class SVMs per combination.

Runs after the banks are built: the caller scores held-out normal frames with `FrameScorer.bank_scores`
and passes them here; the results are exported as `core.fusion` objects for the station.
"""

from __future__ import annotations

import numpy as np
from sklearn.linear_model import SGDOneClassSVM

from core.config import DLFConfig, ScoreConfig
from core.errors import ShapeError
from core.fusion import LinearOneClassSVM, ScoreNormaliser
from core.model import BANKS, COMBINATIONS, prepare_dlf_inputs
from trainer.errors import TrainingError

__all__ = ["fit_dlf", "fit_linear_ocsvm", "fit_score_normaliser", "sample_pixels"]


def fit_linear_ocsvm(x_nf: np.ndarray, cfg: DLFConfig) -> LinearOneClassSVM:
    """Fit sklearn SGDOneClassSVM(nu, max_iter, random_state) on (N, F) rows and export coef_ / offset_."""
    x = np.asarray(x_nf, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2 or not np.isfinite(x).all():
        raise ShapeError(f"DLF inputs must be finite (N>=2, F), got {x.shape}")
    svm = SGDOneClassSVM(nu=cfg.nu, max_iter=cfg.max_iter, random_state=cfg.seed)
    svm.fit(x)
    coef_f, offset = np.asarray(svm.coef_, dtype=np.float64).reshape(-1), float(np.asarray(svm.offset_)[0])
    # SGD on the hinge loss can diverge like any other training; a non-finite weight is never shipped.
    if not (np.isfinite(coef_f).all() and np.isfinite(offset)):
        raise TrainingError(f"DLF one-class SVM diverged on {x.shape} inputs: coef {coef_f}, offset {offset}")
    return LinearOneClassSVM(coef_f=coef_f, offset=offset)


def _check_scores(bank_image_nb: np.ndarray, bank_maps_nbhw: np.ndarray) -> None:
    n_banks = len(BANKS)
    if bank_image_nb.ndim != 2 or bank_image_nb.shape[1] != n_banks:
        raise ShapeError(f"bank image scores must be (N, {n_banks}), got {bank_image_nb.shape}")
    if bank_maps_nbhw.ndim != 4 or bank_maps_nbhw.shape[:2] != bank_image_nb.shape:
        raise ShapeError(f"bank maps must be (N, {n_banks}, H, W), got {bank_maps_nbhw.shape}")


def fit_score_normaliser(bank_image_nb: np.ndarray, bank_maps_nbhw: np.ndarray) -> ScoreNormaliser:
    """Per-bank mean/std of held-out normal image scores (N, 3) and pixel scores (N, 3, H, W).

    A bank whose held-out scores are constant gets std 1 (centred only), rather than a division by zero.
    """
    _check_scores(bank_image_nb, bank_maps_nbhw)
    image = bank_image_nb.astype(np.float64)
    pixels = bank_maps_nbhw.astype(np.float64)
    image_std = image.std(axis=0)
    pixel_std = pixels.std(axis=(0, 2, 3))
    return ScoreNormaliser(
        image_mean_b=image.mean(axis=0),
        image_std_b=np.where(image_std > 0, image_std, 1.0),
        pixel_mean_b=pixels.mean(axis=(0, 2, 3)),
        pixel_std_b=np.where(pixel_std > 0, pixel_std, 1.0),
    )


def sample_pixels(maps_nbhw: np.ndarray, per_image: int, seed: int) -> np.ndarray:
    """(N·k, B) pixel rows: k = min(per_image, H·W) pixels per image, without replacement, seeded."""
    n_images, n_banks = maps_nbhw.shape[:2]
    flat_nbp = maps_nbhw.reshape(n_images, n_banks, -1)
    n_pixels = flat_nbp.shape[2]
    take = min(per_image, n_pixels)
    rng = np.random.default_rng(seed)
    picks_nk = np.argpartition(rng.random((n_images, n_pixels)), take - 1, axis=1)[:, :take]
    rows_nkb = np.take_along_axis(flat_nbp, picks_nk[:, None, :], axis=2).transpose(0, 2, 1)
    return rows_nkb.reshape(-1, n_banks)


def fit_dlf(
    bank_image_nb: np.ndarray,
    bank_maps_nbhw: np.ndarray,
    normaliser: ScoreNormaliser | None,
    cfg: DLFConfig,
    score_cfg: ScoreConfig | None = None,
) -> dict[str, tuple[LinearOneClassSVM, LinearOneClassSVM]]:
    """Fit (image, pixel) one-class SVMs for each combination variant on held-out normal bank scores.

    Args:
        bank_image_nb: (N, 3) raw per-bank image scores [rgb, point, fusion].
        bank_maps_nbhw: (N, 3, H, W) raw per-bank maps.
        normaliser: the one FrameScorer will use (None: M3DM's raw scores with the rgb lambda).
        cfg: SVM settings and pixel rows sampled per image.
        score_cfg: supplies rgb_lambda when normaliser is None (default ScoreConfig()).

    Returns:
        variant -> (image_svm, pixel_svm) for "rgb+point" and "rgb+point+fusion".
    """
    _check_scores(bank_image_nb, bank_maps_nbhw)
    rgb_lambda = (score_cfg or ScoreConfig()).rgb_lambda
    image_nb, maps_nbhw = prepare_dlf_inputs(bank_image_nb, bank_maps_nbhw, normaliser, rgb_lambda)
    pixels_pb = sample_pixels(maps_nbhw, cfg.pixel_samples_per_image, cfg.seed)
    return {
        variant: (
            fit_linear_ocsvm(image_nb[:, list(cols)], cfg),
            fit_linear_ocsvm(pixels_pb[:, list(cols)], cfg),
        )
        for variant, cols in COMBINATIONS.items()
    }
