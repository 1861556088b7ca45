"""tune_malloc: freed large blocks go back to the OS, from every thread (what keeps station RSS down)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# Frees one 48 MiB block (glibc raises its mmap threshold to 32 MiB then), then in 4 threads allocates
# and frees 8 MiB blocks: untuned they come from per-thread heaps that keep the pages; tuned, each is an
# mmap that goes back on free. Prints whether mallopt took the settings and the RSS growth in MiB.
PROBE = """
import sys, threading
import numpy as np
sys.path.insert(0, {repo!r})
from edge.memory import tune_malloc

tuned = tune_malloc() if sys.argv[1] == "tuned" else None

def rss_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024

big = np.ones(48 << 18, np.float32); del big
base = rss_mib()

def work():
    keep = []
    for _ in range(6):
        a = np.ones(2 << 20, np.float32)
        keep.append(a[:1].copy())
        del a

threads = [threading.Thread(target=work) for _ in range(4)]
for t in threads: t.start()
for t in threads: t.join()
print(tuned, rss_mib() - base)
"""


def probe(mode: str) -> tuple[str, float]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE.format(repo=str(REPO)), mode],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.split()
    return out[0], float(out[1])


def test_tuned_process_returns_freed_blocks_from_every_thread() -> None:
    tuned, growth_mib = probe("tuned")
    assert tuned == "True"
    assert growth_mib < 8, f"RSS grew {growth_mib:.1f} MiB after freeing every block"


def test_untuned_process_keeps_them_so_the_probe_can_fail() -> None:
    tuned, growth_mib = probe("default")
    assert tuned == "None"
    assert growth_mib >= 8, f"glibc defaults returned the blocks too ({growth_mib:.1f} MiB kept)"
