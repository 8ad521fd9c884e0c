#!/usr/bin/env bash
# The prepared GPU check: build the extension for the card, run the GPU tests and the benchmarks, write everything
# under $OUT. Usage (repo root, on the GPU machine):
#   bash bench/device_check.sh [part1|part2|all|final|candidates|graph|final9|probe9|bars|vae11|vae11b|train11|prof11] [SECONDS]
#     part1  generate L (+ its compiled step), train L (+ its top kernels), VAE decode, a profile of one L step
#     part2  the op benchmarks (adaln, snake), generate L batch 8, train L compiled
# Every part first builds (unless carried) and runs the GPU tests (unless SKIP_TESTS=1).
#     all    both
#     final  a short re-check: train L, VAE decode, the VAE/pipeline GPU tests, adaln, snake, generate L
#     graph  session 9: the CUDA-graph training step (L, default backends and the Triton candidates) and the
#            generate L split of the two Triton candidates, the VAE decode
#     final9 session 9's re-check of the committed defaults: train L (eager and graphed), generate L (with plain)
#     probe9 the graph paths' GPU tests (trainer resume), the VAE decode's kernels, L with captions padded to 128
#     bars   the three GPU bars in one call: VAE decode (issue 4, with its profile), generate L with the plain path
#            (issue 5), train L eager and graphed (issue 6); e.g. `bash bench/device_check.sh bars 420`
#     vae11  session 11: the VAE decode with every conv timed alone (--conv-table), the VAE and trainer GPU tests
#            (run with SKIP_TESTS=1); vae11b: the per-shape timed choice, its tests, the VAE and generate L benches
#     candidates  what session 4 prepared without a GPU: the Triton q/k RMSNorm + RoPE (its GPU tests, its bench,
#            generate L and train L with OMNI2SOUND_BACKEND=qk_norm_rope=triton against the default in the same
#            call) and the VAE decode candidates (cudnn.benchmark; channels-last convs with the Triton Snake);
#            session 5 added the Snake op bench (the CUDA forward's coalesced indexing; the Triton qk_norm_rope and
#            channels-last Snake launches with 16 warps, chosen from their sm_90a register counts offline); session 6
#            the Triton bias + GELU (bench_gelu: against eager and, per row, the whole first MLP layer) and the L
#            ablation (each low-latency item off on its own, 25-step samplings, paired ratios); session 8 runs the
#            generate / train candidates with both Triton ops (q/k norm + RoPE, now also the cross-attention's head
#            norms; bias + GELU) and profiles that training step
#     train11 session 11: the trainer's GPU tests (FSDP2 with bf16 gathered weights); run with SKIP_TESTS=1
#     prof11 session 11: a profile of an L sampling step, and generate L with the compiled step (SKIP_TESTS=1)
#     any other word (e.g. tests_only): the GPU tests alone
# SECONDS is this run's budget: each benchmark gets min(its limit, what is left) and one that would start with
# less than 20 s left is skipped (and says so), so the script ends inside the device call's limit with its files.
# Carried wheels in .whl/ (soundfile, soxr, av: absent from the GPU image) are installed to /tmp/site. When the
# extension was built by an earlier call and carried back (omni2sound/_C.cpython-312-*.so), the build is skipped.
set -u
export PYTHONUNBUFFERED=1
T_START=$(date +%s)
OUT=${OUT:-/tmp/o2s_out}
RES="$OUT/res"                       # raw JSON / logs, packed into one archive at the end (the file limit is 8)
mkdir -p "$RES"
WHAT=${1:-all}
BUDGET=${2:-540}
PY=python3
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
left() { echo $(( T_START + BUDGET - $(date +%s) )); }

if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
{ nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem --format=csv; date -u;
  $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } > "$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"

# Only the card's own architecture, to keep the build short (CI builds the full default list).
export OMNI2SOUND_CUDA_ARCHS=${OMNI2SOUND_CUDA_ARCHS:-90a-real}
if ls omni2sound/_C.cpython-312-*.so >/dev/null 2>&1; then
  echo "build: using the carried extension $(ls omni2sound/_C.cpython-312-*.so)"
  # without the install, omni2sound.kernels (installed from kernels/omni2sound_kernels/) is missing: link it in this copy
  [ -e omni2sound/kernels ] || ln -s ../kernels/omni2sound_kernels omni2sound/kernels
else
  t0=$(date +%s)
  if ! $PY -m pip install --no-build-isolation --no-deps -e . > "$RES/build.log" 2>&1; then
    tail -60 "$RES/build.log"; exit 1
  fi
  echo "build: $(( $(date +%s) - t0 )) s"
  cp omni2sound/_C.cpython-312-*.so "$OUT/" 2>/dev/null   # carried to a later call: no second build
fi
$PY -c "from omni2sound import _C; print('built_with_cuda', _C.built_with_cuda(), _C.cuda_archs())"

SUMMARY="$OUT/summary.md"
: >> "$SUMMARY"
step() {  # name, limit seconds, command...: run with min(limit, time left - 10) seconds, log to $RES/name.log
  local name=$1 limit=$2; shift 2
  local rem=$(( $(left) - 10 ))
  if [ "$rem" -lt 20 ]; then echo "($name skipped: ${rem}s left)" | tee -a "$SUMMARY"; return; fi
  [ "$limit" -gt "$rem" ] && limit=$rem
  local t0=$(date +%s)
  echo "## $name (limit ${limit}s): $*" >> "$SUMMARY"
  timeout "$limit" "$@" > "$RES/$name.log" 2>&1
  local rc=$?
  # the markdown tables and the last lines go to the summary
  grep -E '^\||^#|^AudioVAE|^Training|passed|failed|error' "$RES/$name.log" | tail -60 >> "$SUMMARY"
  tail -5 "$RES/$name.log" >> "$SUMMARY"
  echo "($name: rc=$rc, $(( $(date +%s) - t0 )) s)" | tee -a "$SUMMARY"
}

if [ -z "${SKIP_TESTS:-}" ]; then
  # several workers when pytest-xdist is there: the Triton kernels' first compiles are CPU-bound; a hung test is cut
  # at 90 s and reported instead of eating the call
  XDIST=$($PY -c "import xdist" 2>/dev/null && echo "-n 8")
  step tests ${TESTS_LIMIT:-130} $PY -m pytest -q -m cuda -p no:cacheprovider tests -rf --durations=10 --timeout 90 $XDIST
fi
if [ "$WHAT" = part1 ] || [ "$WHAT" = all ]; then
  step generate_L 150 $PY bench/bench_generate.py --presets L --batches 1 --repeats 3 --device cuda --compile \
    --out "$RES/generate_L.json"
  step train_L 80 $PY bench/bench_train.py --presets L --batch 32 --seconds 10 --steps 6 --device cuda --profile \
    --out "$RES/train_L.json"
  step vae 70 $PY bench/bench_vae.py --preset paper --device cuda --dtype bfloat16 --baseline-dtype float32 \
    --out "$RES/vae.json"
  step profile_L 60 $PY bench/bench_generate.py --profile --presets L --device cuda --out "$RES/profile_L.json"
fi
if [ "$WHAT" = part2 ] || [ "$WHAT" = all ]; then
  step adaln 110 $PY bench/bench_adaln.py --quick --out "$RES/adaln.json"
  step snake 40 $PY bench/bench_snake.py --out "$RES/snake.json"
  step generate_L8 60 $PY bench/bench_generate.py --presets L --batches 8 --repeats 3 --device cuda \
    --out "$RES/generate_L8.json"
  step train_L_compile 150 $PY bench/bench_train.py --presets L --batch 32 --seconds 10 --steps 6 --device cuda \
    --compile --variants fused+compile --out "$RES/train_L_compile.json"
fi
if [ "$WHAT" = final ]; then      # a short re-check after fixes: the changed paths first, then the op benchmarks
  step train_L 60 $PY bench/bench_train.py --presets L --batch 32 --seconds 10 --steps 6 --device cuda --profile \
    --out "$RES/train_L.json"
  step vae 50 $PY bench/bench_vae.py --preset paper --device cuda --dtype bfloat16 --baseline-dtype float32 \
    --out "$RES/vae.json"
  step tests_vae_pipeline 60 $PY -m pytest -q -m cuda -p no:cacheprovider tests/test_vae.py tests/test_pipeline.py -rf
  step adaln 110 $PY bench/bench_adaln.py --quick --out "$RES/adaln.json"
  step snake 40 $PY bench/bench_snake.py --quick --out "$RES/snake.json"
  step generate_L 60 $PY bench/bench_generate.py --presets L --batches 1 --repeats 2 --device cuda \
    --out "$RES/generate_L.json"
fi
if [ "$WHAT" = candidates ]; then  # the evidence to change the GPU defaults (or not); the bars' benches first
  # (every GPU test ran above, unless SKIP_TESTS: session 5 changed the CUDA AdaLN kernels (pair modulations), the
  # CUDA Snake forward's indexing, the fp32 cross-attention tiles and the Triton launch widths)
  # the training pair first (issue 6's bar is the furthest off), then sampling, then the VAE decode
  # the candidates together (the op benches below time each alone): with both, an L training step moves 45.6 ms of
  # non-GEMM bytes at HBM speed instead of 89.5 (`python bench/bench_train.py --audit`, session 8)
  step train_L 60 $PY bench/bench_train.py --presets L --batch 32 --seconds 10 --steps 6 --device cuda \
    --variants fused --out "$RES/train_L.json"
  step train_L_qk 70 env OMNI2SOUND_BACKEND=qk_norm_rope=triton,bias_gelu=triton $PY bench/bench_train.py \
    --presets L --batch 32 --seconds 10 --steps 6 --device cuda --variants fused --profile \
    --out "$RES/train_L_qk.json"
  step generate_L 70 $PY bench/bench_generate.py --presets L --batches 1 --repeats 3 --device cuda --no-plain \
    --out "$RES/generate_L.json"
  step generate_L_qk 70 env OMNI2SOUND_BACKEND=qk_norm_rope=triton,bias_gelu=triton $PY bench/bench_generate.py \
    --presets L --batches 1 --repeats 3 --device cuda --no-plain --out "$RES/generate_L_qk.json"
  step vae 60 $PY bench/bench_vae.py --preset paper --device cuda --dtype bfloat16 --baseline-dtype float32 \
    --no-compile --out "$RES/vae.json"
  step bench_qk 60 $PY bench/bench_qk_norm_rope.py --out "$RES/qk.json"
  step snake 30 $PY bench/bench_snake.py --quick --out "$RES/snake.json"
  step bench_gelu 40 $PY bench/bench_gelu.py --no-compile --out "$RES/gelu.json"
  step ablate_L 60 $PY bench/bench_generate.py --ablate --presets L --device cuda --ablate-rounds 3 \
    --out "$RES/ablate_L.json"
fi
if [ "$WHAT" = graph ]; then    # session 9: the CUDA-graph training step, and the GPU defaults of the two Triton ops
  # session 9's H200 profile: an L step's kernels ran 149 ms of its 225 ms; the host's launches were the bound
  step train_L_graph 90 $PY bench/bench_train.py --presets L --batch 32 --seconds 10 --steps 6 --device cuda \
    --graph --variants fused,fused+graph --out "$RES/train_L_graph.json"
  step train_L_graph_qk 60 env OMNI2SOUND_BACKEND=qk_norm_rope=triton $PY bench/bench_train.py --presets L \
    --batch 32 --seconds 10 --steps 6 --device cuda --graph --variants fused+graph --out "$RES/train_L_graph_qk.json"
  step train_L_graph_qk_gelu 60 env OMNI2SOUND_BACKEND=qk_norm_rope=triton,bias_gelu=triton $PY \
    bench/bench_train.py --presets L --batch 32 --seconds 10 --steps 6 --device cuda --graph --variants fused+graph \
    --profile --out "$RES/train_L_graph_qk_gelu.json"
  step generate_L_qk 40 env OMNI2SOUND_BACKEND=qk_norm_rope=triton $PY bench/bench_generate.py \
    --presets L --batches 1 --repeats 3 --device cuda --no-plain --out "$RES/generate_L_qk.json"
  step generate_L_gelu 40 env OMNI2SOUND_BACKEND=bias_gelu=triton $PY bench/bench_generate.py \
    --presets L --batches 1 --repeats 3 --device cuda --no-plain --out "$RES/generate_L_gelu.json"
  step vae 60 $PY bench/bench_vae.py --preset paper --device cuda --dtype bfloat16 --baseline-dtype float32 \
    --no-compile --out "$RES/vae.json"
fi
if [ "$WHAT" = final9 ]; then   # session 9's re-check of the committed defaults (qk_norm_rope: Triton on a GPU)
  step train_L 70 $PY bench/bench_train.py --presets L --batch 32 --seconds 10 --steps 6 --device cuda \
    --graph --variants fused,fused+graph --out "$RES/train_L.json"
  step generate_L 60 $PY bench/bench_generate.py --presets L --batches 1 --repeats 3 --device cuda \
    --out "$RES/generate_L.json"
fi
if [ "$WHAT" = probe9 ]; then   # session 9's last call: the graph paths' GPU tests, the decode's kernels, padding
  step tests_graph 60 $PY -m pytest -q -m cuda -p no:cacheprovider tests/test_train.py tests/test_graphed_step.py \
    tests/test_vae.py -rf --timeout 60
  step vae_profile 70 $PY bench/bench_vae.py --preset paper --device cuda --dtype bfloat16 --baseline-dtype float32 \
    --no-compile --profile --out "$RES/vae.json"
  step train_L_pad 60 $PY bench/bench_train.py --presets L --batch 32 --seconds 10 --steps 6 --device cuda --graph \
    --variants fused+graph --pad-text 128 --out "$RES/train_L_pad128.json"
fi
if [ "$WHAT" = bars ]; then     # the three GPU bars in one short call: issue 4 first (its conv_out GEMM, session 9,
  # has never run on a GPU: compare the rows fused_graph and fused_graph_cudnn_out_conv), then issues 5 and 6
  step vae 80 $PY bench/bench_vae.py --preset paper --device cuda --dtype bfloat16 --baseline-dtype float32 \
    --no-compile --profile --out "$RES/vae.json"
  step generate_L 110 $PY bench/bench_generate.py --presets L --batches 1,8 --repeats 3 --device cuda \
    --out "$RES/generate_L.json"
  step train_L 70 $PY bench/bench_train.py --presets L --batch 32 --seconds 10 --steps 6 --device cuda \
    --graph --variants fused,fused+graph --out "$RES/train_L.json"
fi
if [ "$WHAT" = vae11 ]; then    # session 11: the dilated convs as space-to-batch (the 2 legacy cuDNN launches of
  # the bars call), each conv of the decode timed alone, and the GPU tests of what changed (VAE, trainer's FSDP2)
  step tests_vae_train 90 $PY -m pytest -q -m cuda -p no:cacheprovider tests/test_vae.py tests/test_train.py -rf \
    --timeout 80
  step vae 90 $PY bench/bench_vae.py --preset paper --device cuda --dtype bfloat16 --baseline-dtype float32 \
    --no-compile --profile --conv-table --out "$RES/vae.json"
fi
if [ "$WHAT" = vae11b ]; then   # session 11, last call: the per-shape choice of the dilated convs' form (timed),
  # its GPU tests and the pipeline's, the VAE decode, and generate L with the committed code
  step tests_vae_pipe 100 $PY -m pytest -q -m cuda -p no:cacheprovider tests/test_vae.py tests/test_pipeline.py -rf \
    --timeout 80
  step vae 60 $PY bench/bench_vae.py --preset paper --device cuda --dtype bfloat16 --baseline-dtype float32 \
    --no-compile --profile --out "$RES/vae.json"
  step generate_L 60 $PY bench/bench_generate.py --presets L --batches 1 --repeats 3 --device cuda \
    --out "$RES/generate_L.json"
fi
if [ "$WHAT" = train11 ]; then   # session 11: FSDP2 with bf16 gathered weights (MixedPrecisionPolicy) on one GPU
  step tests_train 90 $PY -m pytest -q -m cuda -p no:cacheprovider tests/test_train.py -rf --timeout 80
fi
if [ "$WHAT" = prof11 ]; then    # session 11: where an L sampling step's kernel time goes now (for the next
  # session's work on sampling), and whether the compiled step still pays on top of the graphs (session 3, H100: yes)
  step profile_L 70 $PY bench/bench_generate.py --profile --presets L --device cuda --out "$RES/profile_L.json"
  step generate_L_compile 150 $PY bench/bench_generate.py --presets L --batches 1 --repeats 3 --device cuda --compile \
    --no-plain --out "$RES/generate_L_compile.json"
fi
tar czf "$OUT/results.tgz" -C "$OUT" res && rm -rf "$RES"
echo "total: $(( $(date +%s) - T_START )) s"
cat "$SUMMARY"
