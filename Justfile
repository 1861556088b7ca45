# M3DM-Fleet task runner. `just --list` shows the recipes.

venv := ".venv"
py := venv + "/bin/python"

# Install everything (apt, .venv, CPU torch, all extras)
install:
    bash .ci/install

# The main job on an embedded default: synth scans -> train m3dm-free -> evaluate -> signed bundle
demo out="runs/demo":
    {{venv}}/bin/m3dm demo --out {{out}}

# CPU test suite (GPU tests are deselected)
test:
    {{py}} -m pytest -q -m "not gpu"

# Tests that need an NVIDIA GPU and TensorRT
test-gpu:
    {{py}} -m pytest -q -m gpu

# ruff + import-linter layering contracts
lint:
    {{venv}}/bin/ruff check .
    {{venv}}/bin/ruff format --check .
    {{venv}}/bin/lint-imports

fmt:
    {{venv}}/bin/ruff format .
    {{venv}}/bin/ruff check --fix .

# Heavy measurements (not part of the timed test suite); results go to BENCHMARKS.md by hand
bench:
    {{py}} bench/run_all.py

# Reliability suite in full: faults, attacks, bad input, >= 100k fuzz cases per parser, 16 x 20 fps x 5 min
# fleet load (under 30 min; figures in test-artifacts/, quoted in RELIABILITY.md). `just reliability --quick`
reliability *args:
    {{py}} bench/reliability.py {{args}}
