"""FPS and kNN against brute-force references; grouping shapes and determinism."""

from __future__ import annotations

import numpy as np
import pytest

from core.errors import ShapeError
from core.grouping import farthest_point_sample, group_points, knn_indices


def _cloud(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.random((n, 3)) * [0.1, 0.08, 0.02] + [0.0, 0.0, 0.5]).astype(np.float32)


def _fps_reference(points: np.ndarray, n_samples: int) -> list[int]:
    chosen = [0]
    min_dist = [float("inf")] * len(points)
    for _ in range(n_samples - 1):
        last = points[chosen[-1]]
        for i, p in enumerate(points):
            d = float(((p - last) ** 2).sum(dtype=np.float32))
            min_dist[i] = min(min_dist[i], d)
        chosen.append(int(np.argmax(min_dist)))
    return chosen


def test_fps_matches_brute_force_loop() -> None:
    points = _cloud(300)
    assert farthest_point_sample(points, 40).tolist() == _fps_reference(points, 40)


def test_fps_starts_at_zero_and_is_int64_unique() -> None:
    indices = farthest_point_sample(_cloud(2000), 256)
    assert indices.dtype == np.int64 and indices[0] == 0
    assert len(np.unique(indices)) == 256


def test_fps_picks_extremes_first() -> None:
    points = np.array([[0, 0, 1], [0.1, 0, 1], [1, 0, 1], [0.5, 0, 1]], dtype=np.float32)
    assert farthest_point_sample(points, 3).tolist() == [0, 2, 3]


def test_fps_repeats_cyclically_when_too_few_points() -> None:
    points = _cloud(5)
    order = farthest_point_sample(points, 5)
    assert farthest_point_sample(points, 12).tolist() == np.resize(order, 12).tolist()


def test_knn_matches_brute_force() -> None:
    points = _cloud(3000)
    centers = points[farthest_point_sample(points, 50)]
    index_gk = knn_indices(points, centers, 32)
    dist = ((points[None].astype(np.float64) - centers[:, None]) ** 2).sum(-1)
    reference = np.argsort(dist, axis=1, kind="stable")[:, :32]
    assert index_gk.shape == (50, 32) and index_gk.dtype == np.int64
    for got, want in zip(index_gk, reference, strict=True):
        assert set(got.tolist()) == set(want.tolist())
    assert (dist[np.arange(50)[:, None], index_gk] == 0).sum() >= 50  # centre itself included


def test_group_points_local_coordinates() -> None:
    points = _cloud(4000, seed=3)
    neighborhood, centers = group_points(points, num_groups=64, group_size=16)
    assert neighborhood.shape == (64, 16, 3) and centers.shape == (64, 3)
    assert neighborhood.dtype == np.float32 and centers.dtype == np.float32
    np.testing.assert_array_equal(neighborhood[:, 0], 0.0)  # nearest neighbour of a centre is itself
    np.testing.assert_array_equal(centers[0], points[0])
    again = group_points(points, num_groups=64, group_size=16)
    assert np.array_equal(again[0], neighborhood) and np.array_equal(again[1], centers)


def test_group_points_small_cloud_fills_groups() -> None:
    neighborhood, centers = group_points(_cloud(10), num_groups=16, group_size=32)
    assert neighborhood.shape == (16, 32, 3) and centers.shape == (16, 3)


@pytest.mark.parametrize(
    "bad", [np.zeros((0, 3)), np.zeros((5, 2)), np.array([[0.0, np.nan, 1.0]])], ids=["empty", "2d", "nan"]
)
def test_bad_clouds_raise_shape_error(bad: np.ndarray) -> None:
    with pytest.raises(ShapeError, match="points must be a non-empty|points contain NaN or inf"):
        group_points(bad, num_groups=4, group_size=2)


def test_fps_distances_come_from_float32_coordinates() -> None:
    # Far from the origin: 998.99998 and 1001 both round to a float32 exactly 1 m from 1000, so the two
    # candidates tie and the lower index wins; float64 arithmetic would see point 2 as 2e-5 m farther.
    points = np.array([[1000.0, 0, 0], [1001.0, 0, 0], [999.0 - 2e-5, 0, 0]], dtype=np.float64)
    assert np.float32(points[2, 0]) == np.float32(999.0)
    assert farthest_point_sample(points, 2).tolist() == [0, 1]


def test_fps_start_index_and_sample_count_bounds() -> None:
    points = _cloud(6)
    assert farthest_point_sample(points, 1).tolist() == [0]
    assert farthest_point_sample(points, 3, start_index=5)[0] == 5
    for n_samples, start in ((0, 0), (-1, 0), (3, 6), (3, -1)):
        with pytest.raises(ShapeError, match=r"^need n_samples > 0 and 0 <= start_index < 6$"):
            farthest_point_sample(points, n_samples, start)


def test_knn_bounds_and_the_centre_check_names_the_centres() -> None:
    points = _cloud(20)
    assert knn_indices(points, points[:2], 1).tolist() == [[0], [1]]
    for k in (0, -2):
        with pytest.raises(ShapeError, match=rf"^k must be positive, got {k}$"):
            knn_indices(points, points[:2], k)
    with pytest.raises(ShapeError, match=r"^centers must be a non-empty \(N, 3\) array, got shape \(2, 2\)$"):
        knn_indices(points, np.zeros((2, 2)), 3)
    with pytest.raises(ShapeError, match="^centers contain NaN or inf$"):
        knn_indices(points, np.array([[0.0, np.inf, 0.0]]), 3)


def test_group_points_defaults_are_the_point_mae_sizes() -> None:
    neighborhood, centers = group_points(_cloud(1500, seed=1))
    assert neighborhood.shape == (1024, 128, 3) and centers.shape == (1024, 3)
