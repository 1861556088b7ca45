#!/usr/bin/env bash
# Mutation testing (mutmut 3) of one area against the tests that guard it; NOT part of CI's timed run.
# Works in a scratch copy of the tracked tree so the repo never gets a mutants/ folder and edits in the
# working tree during a long run do not mix with the mutants.
#   bench/mutate.sh SOURCE_PATH[,SOURCE_PATH...] TEST_PATH [TEST_PATH...]
#   e.g. bench/mutate.sh protocol/manifest.py tests/protocol
#   MUTATE_ALSO_COPY=deploy/config bench/mutate.sh protocol/config.py tests/edge/test_config.py
# Prints `mutmut results` (survivors) and writes the summary to $OUT_DIR (default runs/mutate/<name>).
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
sources="$1"; shift
name="$(echo "$sources" | tr '/,.' '___')"
work="${MUTATE_WORK:-/tmp/m3dm-mutate}/$name"
out="${OUT_DIR:-$repo/runs/mutate/$name}"
rm -rf "$work"; mkdir -p "$work" "$out"
(cd "$repo" && git ls-files -z | xargs -0 cp --parents -t "$work")
{
  echo "[mutmut]"
  echo "source_paths="; for s in ${sources//,/ }; do echo "    $s"; done
  echo "pytest_add_cli_args_test_selection="; for t in "$@"; do echo "    $t"; done
  echo "pytest_add_cli_args="
  echo "    -p"; echo "    no:cacheprovider"; echo "    -x"; echo "    -q"
  echo "use_git_change_detection=False"
  # data files the tests read that mutmut's mutants/ copy lacks (e.g. deploy/config for protocol/config.py)
  if [ -n "${MUTATE_ALSO_COPY:-}" ]; then
    echo "also_copy="; for a in ${MUTATE_ALSO_COPY//,/ }; do echo "    $a"; done
  fi
} > "$work/setup.cfg"
cd "$work"
# One OpenMP thread: faiss's OpenMP workers spin in mutmut's forked children, and every faiss-backed mutant
# then ran into its CPU-time limit (counted as killed: an inflated score, seen on core/ann.py).
OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" "$repo/.venv/bin/mutmut" run --max-children "${MUTATE_CHILDREN:-1}" 2>&1 | tr "\r" "\n" | tail -n 3 | tee "$out/run.log"
"$repo/.venv/bin/mutmut" results --all true > "$out/results.txt" 2>&1 || true
grep -c ": killed" "$out/results.txt" || true
echo "results: $out/results.txt"
