"""Run every benchmark in bench/ on generated data and print the Markdown tables BENCHMARKS.md quotes.

Usage: python bench/run_all.py [--work runs/bench]. Generates a one-class 400 px data set if none is there.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--work", type=Path, default=Path("runs/bench"))
    args = parser.parse_args()
    data = args.work / "data"
    if not data.is_dir():
        from trainer.synth import SynthConfig, synthesize

        synthesize(
            data,
            SynthConfig(classes=("ring",), n_train=4, n_validation=2, n_test_good=4, n_test_per_defect=1),
        )
    for script, extra in (
        ("stage_timings.py", ["--data", str(data), "--frames", "4"]),
        ("export_parity.py", []),
    ):
        print(f"\n## {script}\n", flush=True)
        subprocess.run([sys.executable, str(HERE / script), *extra], check=True)


if __name__ == "__main__":
    main()
