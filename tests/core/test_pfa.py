"""Point feature alignment against a brute-force torch reference (M3DM's interpolation and pooling)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from core.errors import ShapeError
from core.pfa import align_point_features, interpolate_to_points, pooling_matrix, project_to_grid

SIZE, GRID = 224, 56


@pytest.fixture(scope="module")
def scene() -> dict[str, np.ndarray]:
    """An object occupying a disc of pixels, with known random group features."""
    rng = np.random.default_rng(0)
    rows, cols = np.mgrid[:SIZE, :SIZE]
    on_object = (rows - 100) ** 2 + (cols - 120) ** 2 < 70**2
    pixel_index = np.flatnonzero(on_object)
    points = np.stack([cols.ravel(), rows.ravel(), np.zeros(SIZE * SIZE)], 1)[pixel_index] * 1e-3
    points = (points + rng.normal(0, 2e-4, points.shape) + [0, 0, 0.6]).astype(np.float32)
    centers = points[rng.choice(len(points), 256, replace=False)]
    feats = rng.standard_normal((256, 96)).astype(np.float32)
    return {"points": points, "pixel_index": pixel_index, "centers": centers, "feats": feats}


def _torch_interpolate(points: np.ndarray, centers: np.ndarray, feats: np.ndarray) -> torch.Tensor:
    dist = ((torch.from_numpy(points)[:, None] - torch.from_numpy(centers)[None]) ** 2).sum(-1)
    dist, index = dist.sort(dim=1)
    weight = 1.0 / (dist[:, :3] + 1e-8)
    weight = weight / weight.sum(dim=1, keepdim=True)
    return (torch.from_numpy(feats)[index[:, :3]] * weight[..., None]).sum(dim=1)


def _torch_project(point_feats: torch.Tensor, pixel_index: np.ndarray) -> np.ndarray:
    image = torch.zeros(point_feats.shape[1], SIZE * SIZE)
    image[:, torch.from_numpy(pixel_index)] = point_feats.T
    pooled = F.adaptive_avg_pool2d(F.avg_pool2d(image.reshape(1, -1, SIZE, SIZE), 3, 1), GRID)
    return pooled[0].permute(1, 2, 0).numpy()


def test_interpolation_matches_torch(scene: dict[str, np.ndarray]) -> None:
    got = interpolate_to_points(scene["points"], scene["centers"], scene["feats"])
    want = _torch_interpolate(scene["points"], scene["centers"], scene["feats"]).numpy()
    assert got.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_projection_and_alignment_match_torch(scene: dict[str, np.ndarray]) -> None:
    point_feats = _torch_interpolate(scene["points"], scene["centers"], scene["feats"])
    want = _torch_project(point_feats, scene["pixel_index"])
    projected = project_to_grid(point_feats.numpy(), scene["pixel_index"], SIZE, GRID)
    aligned = align_point_features(
        scene["points"], scene["pixel_index"], scene["centers"], scene["feats"], SIZE, GRID
    )
    assert projected.shape == aligned.shape == (GRID, GRID, 96)
    np.testing.assert_allclose(projected, want, atol=1e-5, rtol=0)
    np.testing.assert_allclose(aligned, want, atol=1e-5, rtol=0)
    background = (want == 0).all(axis=-1)
    assert background.sum() > 500  # the corners are off the object
    assert (aligned[background] == 0).all() and (projected[background] == 0).all()


def test_pooling_windows_match_pytorch_adaptive_rule() -> None:
    matrix = pooling_matrix(SIZE, GRID)
    # Output 0 averages pooled rows 0-3, i.e. pixel rows 0-5; output 1 pooled rows 3-7 (overlap at 3).
    assert np.flatnonzero(matrix[0]).tolist() == list(range(6))
    assert np.flatnonzero(matrix[1]).tolist() == list(range(3, 10))
    np.testing.assert_allclose(matrix.sum(axis=1), 1.0)


def test_constant_features_project_to_constant_interior() -> None:
    pixel_index = np.arange(SIZE * SIZE)
    grid = project_to_grid(np.full((SIZE * SIZE, 4), 2.5, np.float32), pixel_index, SIZE, GRID)
    np.testing.assert_allclose(grid, 2.5, rtol=1e-6)


def test_bad_pixel_indices_raise() -> None:
    feats = np.ones((3, 2), np.float32)
    with pytest.raises(ShapeError, match="unique"):
        project_to_grid(feats, np.array([1, 1, 2]))
    with pytest.raises(ShapeError, match="lie in"):
        project_to_grid(feats, np.array([1, 2, SIZE * SIZE]))
    with pytest.raises(ShapeError, match=r"point_feats_nc must be \(2, C\), got \(3, 2\)"):
        project_to_grid(feats, np.array([1, 2]))


def test_alignment_defaults_are_the_224_pixel_56_cell_grid(scene: dict[str, np.ndarray]) -> None:
    args = (scene["points"], scene["pixel_index"], scene["centers"], scene["feats"])
    np.testing.assert_array_equal(align_point_features(*args), align_point_features(*args, 224, 56))
    assert align_point_features(*args).shape == (56, 56, 96)


def test_group_feature_rows_must_match_the_centres(scene: dict[str, np.ndarray]) -> None:
    short = scene["feats"][:-1]
    with pytest.raises(ShapeError, match=r"^group_feats_gc must be \(256, C\), got \(255, 96\)$"):
        interpolate_to_points(scene["points"], scene["centers"], short)
    with pytest.raises(ShapeError, match=r"^group_feats_gc must be \(256, C\), got \(255, 96\)$"):
        align_point_features(scene["points"], scene["pixel_index"], scene["centers"], short)


def test_alignment_needs_one_pixel_index_per_point(scene: dict[str, np.ndarray]) -> None:
    n = len(scene["points"])
    with pytest.raises(ShapeError, match=rf"^{n} points but {n - 1} pixel indices$"):
        align_point_features(scene["points"], scene["pixel_index"][:-1], scene["centers"], scene["feats"])


def test_pixel_indices_must_be_one_dimensional_integers() -> None:
    feats = np.ones((3, 2), np.float32)
    with pytest.raises(ShapeError, match=r"^pixel_index_n must be a 1-D integer array, got float64 \(3,\)$"):
        project_to_grid(feats, np.array([1.0, 2.0, 3.0]))
    with pytest.raises(ShapeError, match=r"^pixel_index_n must be a 1-D integer array, got int64 \(3, 1\)$"):
        project_to_grid(feats, np.array([[1], [2], [3]]))
    with pytest.raises(ShapeError, match=r"^pixel indices must be unique \(one point per pixel\)$"):
        project_to_grid(feats, np.array([1, 1, 2]))


def test_projection_defaults_are_the_224_pixel_56_cell_grid() -> None:
    pixel_index = np.array([0, 5 * SIZE + 7, SIZE * SIZE - 1])
    grid = project_to_grid(np.ones((3, 2), np.float32), pixel_index)
    np.testing.assert_array_equal(grid, project_to_grid(np.ones((3, 2), np.float32), pixel_index, 224, 56))
    assert grid.shape == (56, 56, 2) and grid.dtype == np.float32


def test_interpolation_checks_point_and_centre_shapes_and_k() -> None:
    points, centers, feats = np.zeros((5, 3)), np.eye(10, 3), np.ones((10, 2), np.float32)
    with pytest.raises(
        ShapeError, match=r"^points/centers must be \(N, 3\)/\(G, 3\), got \(5, 2\)/\(10, 3\)$"
    ):
        interpolate_to_points(points[:, :2], centers, feats)
    with pytest.raises(
        ShapeError, match=r"^points/centers must be \(N, 3\)/\(G, 3\), got \(5, 3\)/\(10, 2\)$"
    ):
        interpolate_to_points(points, centers[:, :2], feats)
    with pytest.raises(ShapeError, match=r"^points/centers must be"):
        interpolate_to_points(points[0], centers, feats)
    for k in (0, 11):
        with pytest.raises(ShapeError, match=rf"^k={k} needs 1\.\.10 centres$"):
            interpolate_to_points(points, centers, feats, k=k)
    for k in (1, 4, 10):  # 1, more than 3 (the coordinate count), and every centre are all valid
        np.testing.assert_allclose(interpolate_to_points(points, centers, feats, k=k), 1.0, rtol=1e-6)


def test_interpolation_with_k_1_copies_the_nearest_centre_and_keeps_unused_centres() -> None:
    centers = np.array([[0.0, 0, 0], [1.0, 0, 0], [0, 1.0, 0], [50.0, 50, 50]])  # the last one is nobody's
    feats = np.array([[1.0], [2.0], [3.0], [4.0]], np.float32)
    points = np.array([[0.1, 0, 0], [0.9, 0, 0], [0, 0.8, 0]])
    np.testing.assert_array_equal(interpolate_to_points(points, centers, feats, k=1)[:, 0], [1.0, 2.0, 3.0])
    three = interpolate_to_points(points, centers, feats, k=3)[:, 0]
    assert three.shape == (3,) and np.all((three > 1.0) & (three < 3.0))  # weighted between used centres
