#!/usr/bin/env bash
# The one prepared GPU check: build the extension for the card, run the GPU tests and the benchmarks,
# write everything under $OUT. Usage (repo root, on the GPU machine):
#   bash bench/device_check.sh [tests|bench|all]
# Carried wheels in .whl/ (soundfile, soxr, av: absent from the GPU image) are installed to /tmp/site.
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/o2s_out}
mkdir -p "$OUT"
WHAT=${1:-all}
PY=python3

if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
{ nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem --format=csv; date -u;
  $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } > "$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"

# Only the card's own architecture, to keep the build short (CI builds the full default list).
export OMNI2SOUND_CUDA_ARCHS=${OMNI2SOUND_CUDA_ARCHS:-90a-real}
t0=$(date +%s)
if ! $PY -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1; then
  tail -60 "$OUT/build.log"; exit 1
fi
echo "build: $(( $(date +%s) - t0 )) s"
$PY -c "from omni2sound import _C; print('built_with_cuda', _C.built_with_cuda(), _C.cuda_archs())"

if [ "$WHAT" = tests ] || [ "$WHAT" = all ]; then
  t0=$(date +%s)
  timeout 240 $PY -m pytest -q -m cuda -p no:cacheprovider tests -rf --durations=10 2>&1 | tee "$OUT/tests.log" | tail -40
  echo "gpu tests: $(( $(date +%s) - t0 )) s"
fi

if [ "$WHAT" = bench ] || [ "$WHAT" = all ]; then
  : > "$OUT/bench.md"
  run_bench() {  # name, timeout, args...
    local name=$1 limit=$2; shift 2
    [ -f "bench/$name.py" ] || { echo "(no bench/$name.py)" >> "$OUT/bench.md"; return; }
    echo "## $name $*" >> "$OUT/bench.md"
    local t0=$(date +%s)
    timeout "$limit" $PY "bench/$name.py" "$@" >> "$OUT/bench.md" 2>> "$OUT/bench_err.log" \
      || echo "(bench $name failed or timed out: rc=$?)" >> "$OUT/bench.md"
    echo "($name took $(( $(date +%s) - t0 )) s)" >> "$OUT/bench.md"
  }
  run_bench bench_adaln 120
  run_bench bench_cross_attention 120
  run_bench bench_snake 60
  run_bench bench_vae 90
  run_bench bench_generate 150 --presets L --batches 1,8 --repeats 3 --device cuda
  run_bench bench_train 120 --presets L --batch 32 --device cuda
  tail -c 12000 "$OUT/bench.md"
fi
