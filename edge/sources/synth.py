"""`synth:CLASS[?seed=N&fps=N&size=N&count=N&defects=F]`: live generated structured-light scans.

Each frame is rendered on the fly by the trainer's generator (`trainer.synth.render_sample`): normal
parts, and a fraction `defects` (default 0.2) with a random defect of the class. `count` (default 0 =
endless) makes the source finite, which `--once` needs. The same seed gives the same stream.

The generator lives in the trainer package, which a station install does not need: it is imported here
by name, only when this source is opened, and a missing dependency is reported as a clear ConfigError
(install the `trainer` extra, or replay a folder written by `m3dm synth` with `folder:` instead).
"""

from __future__ import annotations

import importlib
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

from core.errors import ConfigError, InputError
from core.scan import RawScan
from edge.sources import Frame, Pacer, check_params, float_param, int_param

_GENERATOR = "trainer.synth"  # by name: edge never imports the trainer at module level


def load_generator() -> Any:
    """The trainer's synth package, or a ConfigError saying what is missing."""
    try:
        return importlib.import_module(_GENERATOR)
    except ImportError as err:
        raise ConfigError(
            f"synth: source needs the scan generator from the trainer package, which cannot be imported "
            f"here ({err}); install the 'trainer' extra, or write scans with `m3dm synth` and replay them "
            f"with folder:PATH"
        ) from None


class SynthSource:
    """Renders scans of one class at `fps` (0 = as fast as rendering allows)."""

    def __init__(
        self, class_name: str, seed: int, fps: float, size_px: int, count: int, defect_rate: float
    ) -> None:
        gen = load_generator()
        if class_name not in gen.CLASS_NAMES:
            raise ConfigError(f"synth: unknown class {class_name!r}; known: {', '.join(gen.CLASS_NAMES)}")
        if not 0.0 <= defect_rate <= 1.0:
            raise ConfigError(f"synth: defects must lie in [0, 1], got {defect_rate}")
        self.gen, self.class_name, self.seed = gen, class_name, seed
        self.fps, self.size_px, self.count, self.defect_rate = fps, size_px, count, defect_rate
        self.defects = sorted(gen.DEFECT_TYPES[class_name])
        self.live = fps > 0
        self._stopped = threading.Event()

    def stop(self) -> None:
        self._stopped.set()

    def _frame(self, index: int, rng: np.random.Generator) -> Frame:
        defect = None
        if self.defects and rng.random() < self.defect_rate:
            defect = self.defects[int(rng.integers(len(self.defects)))]
        name = f"synth/{self.class_name}/{defect or 'good'}/{index:06d}"
        capture_ts, start = time.time(), time.perf_counter()
        try:
            scan = self.gen.render_sample(
                self.class_name,
                self.gen.sample_seed(self.seed, self.class_name, "live", defect or "good", index),
                defect,
                self.size_px,
                self.size_px,
            )
            raw = RawScan(scan.rgb_hwc_u8, scan.xyz_hwc_m, source=name)
            return Frame(f"{index:06d}", capture_ts, raw, None, name, (time.perf_counter() - start) * 1e3)
        except Exception as err:  # a generator failure is this frame's error, never the station's
            return Frame(f"{index:06d}", capture_ts, None, InputError(f"render failed: {err}", name), name)

    def __iter__(self) -> Iterator[Frame]:
        pacer = Pacer(self.fps, self._stopped)
        rng = np.random.default_rng(self.seed)
        index = 0
        while (self.count <= 0 or index < self.count) and pacer.wait():
            yield self._frame(index, rng)
            index += 1


def open_synth(rest: str, params: dict[str, str]) -> SynthSource:
    uri = f"synth:{rest}"
    check_params(params, ("seed", "fps", "size", "count", "defects"), uri)
    return SynthSource(
        rest,
        int_param(params, "seed", 0, uri),
        float_param(params, "fps", 0.0, uri),
        int_param(params, "size", 400, uri),
        int_param(params, "count", 0, uri),
        float_param(params, "defects", 0.2, uri),
    )
