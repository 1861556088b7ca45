"""Deterministic synthetic structured-light scans in the MVTec 3D-AD layout (`m3dm synth`).

Four object classes of our own (ring, gland, biscuit, peg) on a tilted support plane, with geometry,
colour and combined defects and exact masks; see writer.synthesize for the data set and
render.render_sample for one scan.
"""

from pathlib import Path

from trainer.synth.defects import DEFECT_TYPES, defect_ids
from trainer.synth.render import RenderedScan, render_sample
from trainer.synth.shapes import CLASS_NAMES
from trainer.synth.writer import SynthConfig, sample_seed, synthesize

__all__ = [
    "CLASS_NAMES",
    "DEFECT_TYPES",
    "RenderedScan",
    "SynthConfig",
    "defect_ids",
    "render_sample",
    "sample_seed",
    "synthesize",
    "write_preview",
]


def write_preview(data_root: Path, out_png: Path, per_class: int = 4) -> Path:
    """The contact sheet (matplotlib, imported only here: a station's `synth:` source must not need it)."""
    from trainer.synth.preview import write_preview as write

    return write(data_root, out_png, per_class)
