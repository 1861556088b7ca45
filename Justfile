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

# Mutation testing (mutmut) of the modules issue 16 names, each against the fast tests that guard it;
# minutes to hours on 2 cores, NOT part of CI. Results: runs/mutate/<module>/results.txt; see TESTING.md.
mutate:
    bench/mutate.sh protocol/manifest.py tests/protocol/test_manifest.py
    bench/mutate.sh protocol/frames.py,protocol/messages.py,protocol/errors.py tests/protocol/test_frames.py tests/protocol/test_messages.py tests/protocol/test_errors.py tests/protocol/test_manifest.py
    MUTATE_ALSO_COPY=deploy/config bench/mutate.sh protocol/config.py tests/edge/test_config.py tests/protocol/test_config.py
    bench/mutate.sh edge/bundle.py tests/edge/test_bundle.py
    bench/mutate.sh core/fusion.py tests/core/test_fusion.py tests/core/test_model.py
    bench/mutate.sh core/plane.py tests/core/test_plane.py
    bench/mutate.sh core/model.py tests/core/test_model.py
    bench/mutate.sh core/scoring.py tests/core/test_scoring.py
    bench/mutate.sh core/bank_codec.py tests/core/test_bank_codec.py
    bench/mutate.sh core/grouping.py,core/pfa.py tests/core/test_grouping.py tests/core/test_pfa.py
    bench/mutate.sh core/preprocess.py tests/core/test_preprocess.py
    bench/mutate.sh core/ann.py tests/core/test_ann.py
    bench/mutate.sh core/config.py,core/errors.py,core/features.py tests/core/test_config.py tests/core/test_errors.py tests/core/test_features.py tests/core/test_preprocess.py tests/core/test_grouping.py
    bench/mutate.sh core/mvtec3d.py tests/core/test_mvtec3d.py
    bench/mutate.sh core/free_features.py,core/free_points.py,core/free_rgb.py tests/core/test_free_features.py
    bench/mutate.sh edge/station_model.py tests/edge/test_station_model_fast.py
    bench/mutate.sh protocol/curve.py tests/protocol/test_curve.py tests/protocol/test_curve_keys.py
