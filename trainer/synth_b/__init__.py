"""Family B: an independent generator of scans in the MVTec 3D-AD layout, for evaluation only.

Written separately from trainer/synth (it imports nothing of it): other objects and materials (rubber
tread, woven fabric, open-cell foam, machined metal), another sensor (fringe projection from one side,
Bayer colour camera), non-square frames in several sizes per class, and the real data set's file quirks.
Use it to check that a setting chosen on family A (`m3dm synth`) holds elsewhere; choose on
`validation_defects/`, report on test/. Backs `m3dm synth --family b`.
"""

from trainer.synth_b.defects import DEFECT_TYPES, MODALITY
from trainer.synth_b.objects import CLASS_NAMES
from trainer.synth_b.render import ScanB, frames_for, render_scan
from trainer.synth_b.writer import VALIDATION_DEFECTS, SynthBConfig, synthesize_b

__all__ = [
    "CLASS_NAMES",
    "DEFECT_TYPES",
    "MODALITY",
    "VALIDATION_DEFECTS",
    "ScanB",
    "SynthBConfig",
    "frames_for",
    "render_scan",
    "synthesize_b",
]
