"""Frame sources: URI parsing, folder replay (bad files become error frames), rgbd back-projection, synth."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from core.errors import ConfigError, CorruptFileError, MissingFileError, ShapeError
from edge.sources import ENTRY_POINT_GROUP, open_source, parse_uri
from edge.sources.rgbd import Intrinsics, back_project


def write_pair(
    folder: Path, stem: str, hw: tuple[int, int] = (24, 24), xyz_hw: tuple[int, int] | None = None
) -> None:
    (folder / "rgb").mkdir(parents=True, exist_ok=True)
    (folder / "xyz").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(stem))
    Image.fromarray(rng.integers(0, 255, (*hw, 3), dtype=np.uint8)).save(folder / "rgb" / f"{stem}.png")
    xyz = rng.random((*(xyz_hw or hw), 3), dtype=np.float32) + 0.1
    tifffile.imwrite(folder / "xyz" / f"{stem}.tiff", xyz)


def test_parse_uri() -> None:
    assert parse_uri("folder:/data/ring?loop=1&fps=5") == ("folder", "/data/ring", {"loop": "1", "fps": "5"})
    assert parse_uri("/data/ring") == ("folder", "/data/ring", {})
    assert parse_uri("synth:ring") == ("synth", "ring", {})
    with pytest.raises(ConfigError, match="unknown scheme 'nope'"):
        open_source("nope:x")
    with pytest.raises(ConfigError, match="unknown parameter"):
        open_source("folder:/tmp?speed=3")


def test_folder_replays_test_tree_and_turns_bad_files_into_error_frames(tmp_path: Path) -> None:
    test = tmp_path / "ring" / "test"
    write_pair(test / "good", "000")
    write_pair(test / "good", "001")
    write_pair(test / "crack", "000", xyz_hw=(20, 24))  # size mismatch
    write_pair(test / "hole", "000")
    (test / "hole" / "xyz" / "000.tiff").write_bytes(b"II*\x00garbage")  # corrupt TIFF
    write_pair(test / "hole", "001")
    (test / "hole" / "rgb" / "001.png").unlink()  # xyz without rgb partner
    (tmp_path / "ring" / "train" / "good" / "rgb").mkdir(parents=True)  # not replayed

    frames = list(open_source(f"folder:{tmp_path / 'ring'}"))
    assert [f.frame_id for f in frames] == ["crack/000", "good/000", "good/001", "hole/000", "hole/001"]
    by_id = {f.frame_id: f for f in frames}
    assert by_id["good/000"].raw is not None and by_id["good/000"].error is None
    assert by_id["good/000"].raw.xyz_hwc_m.shape == (24, 24, 3)
    for frame_id, kind, name in (
        ("crack/000", ShapeError, "crack/xyz/000.tiff"),
        ("hole/000", CorruptFileError, "hole/xyz/000.tiff"),
        ("hole/001", MissingFileError, "hole/xyz/001.tiff"),
    ):
        frame = by_id[frame_id]
        assert frame.raw is None and isinstance(frame.error, kind), frame
        assert frame.source_file.endswith(name)


def test_folder_loop_and_fps(tmp_path: Path) -> None:
    write_pair(tmp_path, "a")
    write_pair(tmp_path, "b")
    source = open_source(f"folder:{tmp_path}?loop=1&fps=40")
    start = time.monotonic()
    ids = []
    for frame in source:
        ids.append(frame.frame_id)
        if len(ids) == 5:
            source.stop()
    assert ids == ["a", "b", "a#1", "b#1", "a#2"]
    assert time.monotonic() - start >= 4 / 40 - 0.01  # paced: 5 frames at 40 fps take >= 100 ms


def test_rgbd_back_projection_matches_pinhole_model() -> None:
    intr = Intrinsics(fx=100.0, fy=120.0, cx=2.0, cy=1.0, depth_scale=0.001)
    depth = np.array([[0, 500, 1000], [2000, 0, 250]], dtype=np.uint16)
    xyz = back_project(depth, intr)
    assert xyz.dtype == np.float32 and xyz.shape == (2, 3, 3)
    assert np.all(xyz[0, 0] == 0) and np.all(xyz[1, 1] == 0)  # no depth -> missing point
    z = 2.0  # pixel (u=0, v=1), 2000 mm
    np.testing.assert_allclose(xyz[1, 0], [(0 - 2.0) * z / 100.0, (1 - 1.0) * z / 120.0, z], rtol=1e-6)
    np.testing.assert_allclose(xyz[0, 2], [(2 - 2.0) * 1.0 / 100.0, (0 - 1.0) * 1.0 / 120.0, 1.0], rtol=1e-6)


def test_rgbd_plugin_is_an_entry_point_and_reads_sdk_folders(tmp_path: Path) -> None:
    from importlib.metadata import entry_points

    assert "rgbd" in {ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)}
    intr = {"fx": 50.0, "fy": 50.0, "cx": 15.5, "cy": 11.5, "depth_scale": 0.0005}
    (tmp_path / "intrinsics.json").write_text(json.dumps(intr))
    for i in range(2):
        Image.fromarray(np.full((24, 32, 3), 100 + i, np.uint8)).save(tmp_path / f"frame_{i:04d}.png")
        depth = np.full((24, 32), 1200 + i, np.uint16)
        Image.fromarray(depth).save(tmp_path / f"depth_{i:04d}.png")
    Image.fromarray(np.zeros((24, 32, 3), np.uint8)).save(tmp_path / "frame_0002.png")  # depth missing
    frames = list(open_source(f"rgbd:{tmp_path}"))
    assert [f.frame_id for f in frames] == ["0000", "0001", "0002"]
    np.testing.assert_allclose(frames[1].raw.xyz_hwc_m[..., 2], 1201 * 0.0005, rtol=1e-6)
    assert frames[1].raw.rgb_hwc_u8.shape == (24, 32, 3)
    assert isinstance(frames[2].error, MissingFileError) and frames[2].source_file.endswith("depth_0002.png")


def test_synth_source_generates_finite_stream() -> None:
    frames = list(open_source("synth:ring?seed=3&size=64&count=3&defects=0.5"))
    assert [f.frame_id for f in frames] == ["000000", "000001", "000002"]
    assert all(f.error is None and f.raw.xyz_hwc_m.shape == (64, 64, 3) for f in frames)
    again = list(open_source("synth:ring?seed=3&size=64&count=3&defects=0.5"))
    assert all(np.array_equal(a.raw.rgb_hwc_u8, b.raw.rgb_hwc_u8) for a, b in zip(frames, again, strict=True))


def test_synth_source_without_generator_says_what_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    import edge.sources.synth as synth

    monkeypatch.setattr(synth, "_GENERATOR", "m3dm_no_such_generator")
    with pytest.raises(ConfigError, match="install the 'trainer' extra"):
        open_source("synth:ring")
