"""TensorRT engine cache: one engine file per (ONNX content, TensorRT version, GPU, precision, shapes).

A serialized engine is only valid for the exact TensorRT version and GPU architecture that built it, so the
cache file name carries both the ONNX content hash and a compatibility key, and a json sidecar repeats them;
an engine is loaded only when both match. Otherwise it is rebuilt, and if that fails the caller falls back to
ONNX Runtime. Pure logic: the builder is passed in, so this is tested on CPU with a fake.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

__all__ = ["CacheResult", "compatibility_key", "engine_cache_path", "file_sha256", "load_or_build"]

log = logging.getLogger("m3dm.edge")

EngineBuilder = Callable[[Path, Path], Path]  # (onnx_path, engine_path) -> engine_path; raises on failure


@dataclass(frozen=True)
class CacheResult:
    """`engine_path` is None exactly when action == "fallback" (the caller must use ONNX Runtime)."""

    engine_path: Path | None
    action: Literal["load", "build", "fallback"]


def compatibility_key(
    trt_version: str,
    compute_capability: tuple[int, int],
    precision: str,
    input_shapes: Mapping[str, Sequence[Sequence[int]]],
) -> str:
    """Readable key naming everything an engine depends on besides the ONNX bytes.

    Args:
        trt_version: e.g. "10.3.0".
        compute_capability: (major, minor), e.g. (8, 7) for Orin.
        precision: "fp16" or "fp32".
        input_shapes: input name -> profile (min, opt, max) shapes.
    """
    shapes_json = json.dumps({k: [list(s) for s in v] for k, v in sorted(input_shapes.items())})
    shapes_digest = hashlib.sha256(shapes_json.encode()).hexdigest()[:12]
    major, minor = compute_capability
    return f"trt{trt_version}-sm{major}{minor}-{precision}-{shapes_digest}"


def engine_cache_path(cache_dir: str | Path, onnx_bytes_sha256: str, key: str) -> Path:
    """`cache_dir/<first 16 hex of the ONNX sha256>-<key>.engine`."""
    return Path(cache_dir) / f"{onnx_bytes_sha256[:16]}-{key}.engine"


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _sidecar(engine_path: Path) -> Path:
    return engine_path.with_suffix(".json")


def _matches(engine_path: Path, onnx_sha256: str, key: str) -> bool:
    """True when the engine file exists and its sidecar names the same full ONNX hash and key."""
    try:
        meta = json.loads(_sidecar(engine_path).read_text())
    except (OSError, ValueError):
        return False
    return engine_path.is_file() and meta.get("onnx_sha256") == onnx_sha256 and meta.get("key") == key


def load_or_build(
    onnx_path: str | Path, cache_dir: str | Path, key: str, build: EngineBuilder
) -> CacheResult:
    """Return a cached engine matching (ONNX content, key), building it if absent or stale.

    Builds to a temporary name and renames, so a crash mid-build never leaves a loadable half engine.
    A failed build returns action "fallback" and no path; it never returns an engine built for other inputs.
    """
    onnx_path, cache_dir = Path(onnx_path), Path(cache_dir)
    onnx_sha256 = file_sha256(onnx_path)
    engine_path = engine_cache_path(cache_dir, onnx_sha256, key)
    if _matches(engine_path, onnx_sha256, key):
        return CacheResult(engine_path, "load")
    cache_dir.mkdir(parents=True, exist_ok=True)
    _sidecar(engine_path).unlink(missing_ok=True)  # a stale sidecar must never vouch for the new file
    partial_path = engine_path.with_suffix(f".partial-{os.getpid()}")
    try:
        build(onnx_path, partial_path)
        os.replace(partial_path, engine_path)
    except Exception as err:  # any builder failure (parser, out of memory, unsupported op) means "use ORT"
        log.warning("TensorRT engine build for %s failed (%s); falling back to ONNX Runtime", onnx_path, err)
        partial_path.unlink(missing_ok=True)
        return CacheResult(None, "fallback")
    _sidecar(engine_path).write_text(json.dumps({"onnx_sha256": onnx_sha256, "key": key}) + "\n")
    return CacheResult(engine_path, "build")
