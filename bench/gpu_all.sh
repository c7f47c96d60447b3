#!/usr/bin/env bash
# On a machine with an NVIDIA GPU: the GPU tests (pytest -m gpu), then bench/gpu.py, with every
# log and result in OUTDIR. The exact commands behind docs/BENCHMARKS_gpu.md.
#
#   bash bench/gpu_all.sh OUTDIR [bench/gpu.py arguments ...]
#
# python3 -P: the installed fxprune, not the source folder of this checkout (whose layout
# maps passes/ and export/ into the package only once installed).
set -uo pipefail
out=${1:?usage: bash bench/gpu_all.sh OUTDIR [bench/gpu.py arguments ...]}
shift
mkdir -p "$out"
cd "$(dirname "$0")/.."
timeout 180 python3 -P -m pytest -m gpu -q -rs -p no:cacheprovider \
  tests/test_gpu.py tests/test_backend.py tests/test_export.py tests/test_export_pruned.py \
  2>&1 | tee "$out/pytest_gpu.log" | tail -n 25
python3 bench/gpu.py --out "$out/gpu.json" --markdown "$out/BENCHMARKS_gpu.md" \
  --plot "$out/gpu_staircase.png" "$@" 2>&1 | tee "$out/bench.log" | tail -n 60
