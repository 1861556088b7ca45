"""glibc allocator settings for a station process: freed activations go back to the OS, not into heaps.

With ONNX Runtime's arena off (edge/runners/ort.py) every activation is a plain malloc. glibc's defaults
then keep much of it: the mmap threshold rises to the size of each large block freed (up to 32 MiB), so
later tensors come from the heap, and every pipeline thread gets its own heap (8 x cores arenas), each
holding its own freed pages. Measured on the official-size preset, one frame at a time: peak RSS 1523 ->
1293 MB and settled RSS 1016 -> 797 MB with the settings below (BENCHMARKS.md, station section).

The threshold is 2 MiB, not lower: every block above it is a fresh mmap whose pages fault in on first
touch. At 256 KiB the hand-made descriptors of `m3dm-free` (400 px, many 0.3-2 MB numpy temporaries a frame)
ran 1.5x slower (read+preprocess 25 -> 17 ms, rgb 34 -> 22 ms, point 47 -> 29 ms per frame, idle, 2 cores),
while the official-size station's peak RSS rose only 1311 -> 1369 MB (target 1.5 GB; 4 MiB: 1456 MB).

The trim threshold is 16 MiB, not 1 MiB: below the mmap threshold every temporary lives in the heap, and
trimming its top after each frame gave those pages back only to fault them in again on the next frame
(m3dm-free read+preprocess+descriptors per frame, 4 passes over 7 scans, idle: 1 MiB 55-87 ms, glibc's
default 48-57 ms, 16 MiB 41-50 ms, 64 MiB 41-47 ms). The heap top a frame leaves is at most 16 MiB per arena.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from dataclasses import dataclass

__all__ = ["MallocSettings", "tune_malloc"]

log = logging.getLogger("m3dm.edge.memory")

# mallopt parameter numbers, from glibc's malloc.h
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8


@dataclass(frozen=True)
class MallocSettings:
    """mmap_threshold_b: blocks at least this big are mmapped (and unmapped on free); setting it also
    stops glibc's dynamic threshold. trim_threshold_b: free heap top above this goes back to the OS.
    arena_max: heaps shared by all threads (glibc's default is 8 per core)."""

    mmap_threshold_b: int = 2 * 1024 * 1024
    trim_threshold_b: int = 16 * 1024 * 1024
    arena_max: int = 2


def tune_malloc(settings: MallocSettings | None = None) -> bool:
    """Apply `settings` with mallopt; True if glibc took all three, False elsewhere (musl, macOS).

    Call it before the pipeline's threads start: arena_max binds only heaps created afterwards.
    """
    settings = settings or MallocSettings()
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):  # no libc by that name, or a libc without mallopt
        log.debug("mallopt not available; allocator left at its defaults")
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    pairs = (
        (_M_MMAP_THRESHOLD, settings.mmap_threshold_b),
        (_M_TRIM_THRESHOLD, settings.trim_threshold_b),
        (_M_ARENA_MAX, settings.arena_max),
    )
    applied = all(mallopt(param, value) == 1 for param, value in pairs)  # mallopt returns 1 on success
    if not applied:
        log.warning("glibc refused a malloc setting (%s); station RSS may run higher", settings)
    return applied
