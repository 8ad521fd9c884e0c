#!/usr/bin/env bash
# The prepared GPU check: build the extension for the card, run the GPU tests and the benchmarks, write everything
# under $OUT ($OUT/summary.md, $OUT/gpu.txt with the card, driver, clocks, torch and triton, and the raw JSON / logs
# packed into $OUT/results.tgz). Usage (repo root, on the GPU machine):
#   bash bench/device_check.sh [MODE[,MODE...]] [SECONDS]
# MODE (default `all`; several may be given, comma-separated, and run in the order listed below):
#   tests              every GPU test (`pytest -m cuda tests`, 8 workers when pytest-xdist is present)
#   tests-vae          the GPU tests of the VAE and the pipeline (test_vae, test_pipeline)
#   tests-train        the GPU tests of the trainer and the graphed step (test_train, test_graphed_step)
#   kernels            the op benchmarks under CUDA graphs: adaln, snake, qk_norm_rope, bias + GELU, AdamW,
#                      self-attention backends (SDPA kernels, flash-attn), varlen cross-attention
#   vae                the VAE decode, paper preset, 10 s, bf16 graphed against eager fp32, with its kernel profile
#   vae-compile        the same with torch.compile of the reference beside it
#   vae-convs          the same with every conv of the decode timed alone in both forms (--conv-table)
#   generate           generate L, 10 s, batch 1 and 8, against the plain eager path
#   generate-compile   generate L with the compiled step (torch.compile inside the CUDA graph)
#   generate-backends  generate L with qk_norm_rope and / or bias_gelu on Triton, and the MLP's bias + GELU in the
#                      cuBLASLt GEMM epilogue, against the defaults
#   generate-ablate    generate L with each low-latency item off on its own (paired ratios)
#   profile            a profile of one L sampling step (kernel table, GEMM FLOP/s)
#   train              train L, batch 32 x 10 s, bf16: the eager step and the CUDA-graph step
#   train-profile      the eager step with its top kernels (--profile)
#   train-backends     the graph step with qk_norm_rope and with qk_norm_rope + bias_gelu on Triton (the latter
#                      profiled), and the eager step with both (profiled)
#   train-compile      the compiled training step
#   train-pad          the graph step with captions padded to 128 tokens (the trainer's max_text_tokens)
#   train-bf16w        the graph step with fp32 weights under autocast against bf16 weight copies written by the
#                      optimiser (--bf16-weights), same run; and the GPU tests of the optimiser kernel
#   train-modgrad      the graph step (bf16 weight copies) with the modulation gradients stacked against written into
#                      one buffer, interleaved; the AdaLN chain's backward both ways (bench_adaln --modulation-grads);
#                      and the GPU tests of split_modulation (bit-identical gradients)
#   fp8                sampling L, 10 s, batch 1 and 8: bf16 against fp8 projections (per-token and per-tensor
#                      activation scales; per-token with the quantisation fused into the AdaLN and the GELU,
#                      against per-token unfused with both on Triton), step time, GEMM / quantisation / AdaLN time
#                      per step from a profile, latents' error vs bf16; the fused ops one by one against op +
#                      quantize_rows (bench_fp8 --ops); and the GPU tests of the fused quantisation
#   fp8-compile        the same with the compiled step (Inductor fuses the fp8 activation quantisation), batch 1
#   serve              serving L: clips / s of 10 s clips at batch 1, 8, 32 (graphs captured at start-up) and a
#                      mixed-duration workload through buckets against one bucket
#   synchformer        Synchformer's feature extraction, full size, batched against the per-segment loop
#   extract            feature extraction throughput with full-size random encoders (bench_extract --full)
#   speed              the H100 figure set, most wanted first, inside one budget: tests, fp8, serve, generate
#                      (optimised path only), train, vae, kernels (quick), synchformer, extract; whatever the budget
#                      cannot hold is skipped and named in the summary (run it as its own mode in a later call)
#   all                tests, kernels, vae, generate, train
#   everything         every mode above but speed
# e.g. `bash bench/device_check.sh tests 160`, `bash bench/device_check.sh vae,generate,train 420`.
# SECONDS is this run's budget (default 540): each step gets min(its limit, what is left) and one that would start
# with less than 20 s left is skipped (and says so), so the script ends inside the device call's limit with its files.
# Carried wheels in .whl/ (soundfile, soxr, av: absent from the GPU image) are installed to /tmp/site. When the
# extension was built by an earlier call and carried back (omni2sound/_C.cpython-312-*.so), the build is skipped.
# O2S_DRY_RUN=1: no build, no card, nothing run: each step's name, limit and command printed, one per line
# (`STEP<TAB>name<TAB>limit<TAB>command`), so that a test on a CPU machine can check every command before a GPU run.
set -u
DRY=${O2S_DRY_RUN:-}
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
ALL_MODES="tests tests-vae tests-train kernels vae vae-compile vae-convs generate generate-compile generate-backends"
ALL_MODES="$ALL_MODES generate-ablate profile train train-profile train-backends train-compile train-pad train-bf16w"
ALL_MODES="$ALL_MODES train-modgrad"
ALL_MODES="$ALL_MODES fp8 fp8-compile serve synchformer extract"
case ",$WHAT," in
  *,everything,*) WHAT=$(echo "$ALL_MODES" | tr ' ' ',') ;;
  *,all,*) WHAT="$WHAT,tests,kernels,vae,generate,train" ;;
  *,speed,*) WHAT="$WHAT,tests" ;;
esac
for m in $(echo "$WHAT" | tr ',' ' '); do
  case " $ALL_MODES all everything speed " in *" $m "*) ;;
    *) echo "unknown mode: $m (one of: $ALL_MODES all everything speed)"; exit 2 ;; esac
done
want() { case ",$WHAT," in *",$1,"*) return 0 ;; esac; return 1; }
SUMMARY="$OUT/summary.md"
step() {  # name, limit seconds, command...: run with min(limit, time left - 10) seconds, log to $RES/name.log
  local name=$1 limit=$2; shift 2
  if [ -n "$DRY" ]; then printf 'STEP\t%s\t%s\t%s\n' "$name" "$limit" "$*"; return; fi
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

if [ -z "$DRY" ]; then

if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
{ nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem --format=csv; date -u;
  $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)";
  # the card as NVML reports it (nvidia-ml-py): name, driver, clocks, memory, power, temperature
  $PY -c "import json; from omni2sound.gpu_info import gpu_info; print('nvml', json.dumps(gpu_info()))"; } \
  > "$OUT/gpu.txt" 2>&1
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

: >> "$SUMMARY"
fi  # not a dry run

FP8_L="bench/bench_fp8.py --presets L --batches 1,8 --device cuda"
SERVE_L="bench/bench_serve.py --preset L --batches 1,8,32 --device cuda"
SYNC="bench/bench_synchformer.py --config full --seconds 10 --device cuda"
EXTRACT="bench/bench_extract.py --full --device cuda --clips 16"
TRAIN_L="bench/bench_train.py --presets L --batch 32 --seconds 10 --steps 6 --device cuda"
GEN_L="bench/bench_generate.py --presets L --device cuda"
VAE="bench/bench_vae.py --preset paper --device cuda --dtype bfloat16 --baseline-dtype float32"

if want tests; then
  # the Triton kernels' first compiles are CPU-bound, hence several workers; a hung test is cut at 90 s and reported
  XDIST=$($PY -c "import xdist" 2>/dev/null && echo "-n 8")
  step tests ${TESTS_LIMIT:-130} $PY -m pytest -q -m cuda -p no:cacheprovider tests -rf --durations=10 --timeout 90 $XDIST
fi
if want speed; then   # most wanted first: a step that would start with under 20 s left is skipped and named
  step fp8_L 130 $PY $FP8_L --repeats 3 --out "$RES/fp8_L.json"
  step fp8_ops 25 $PY bench/bench_fp8.py --ops --device cuda --out "$RES/fp8_ops.json"
  step serve_L 110 $PY $SERVE_L --repeats 2 --mixed 48 --out "$RES/serve_L.json"
  step generate_L 70 $PY $GEN_L --batches 1,8 --repeats 2 --no-plain --out "$RES/generate_L.json"
  step train_L 70 $PY $TRAIN_L --graph --variants fused,fused+graph --out "$RES/train_L.json"
  step vae 60 $PY $VAE --no-compile --out "$RES/vae.json"
  step adaln 50 $PY bench/bench_adaln.py --quick --out "$RES/adaln.json"
  step snake 25 $PY bench/bench_snake.py --quick --out "$RES/snake.json"
  step qk_norm_rope 35 $PY bench/bench_qk_norm_rope.py --out "$RES/qk_norm_rope.json"
  step gelu 30 $PY bench/bench_gelu.py --no-compile --out "$RES/gelu.json"
  step attention 30 $PY bench/bench_attention.py --quick --out "$RES/attention.json"
  step synchformer 45 $PY $SYNC --out "$RES/synchformer.json"
  step extract 70 $PY $EXTRACT --json "$RES/extract.json"
fi
want tests-vae && step tests_vae 100 $PY -m pytest -q -m cuda -p no:cacheprovider tests/test_vae.py \
  tests/test_pipeline.py -rf --timeout 80
want tests-train && step tests_train 90 $PY -m pytest -q -m cuda -p no:cacheprovider tests/test_train.py \
  tests/test_graphed_step.py -rf --timeout 80
if want kernels; then
  step adaln 110 $PY bench/bench_adaln.py --quick --out "$RES/adaln.json"
  step snake 40 $PY bench/bench_snake.py --out "$RES/snake.json"
  step qk_norm_rope 60 $PY bench/bench_qk_norm_rope.py --out "$RES/qk_norm_rope.json"
  step gelu 40 $PY bench/bench_gelu.py --no-compile --out "$RES/gelu.json"
  step adamw 30 $PY bench/bench_adamw.py --out "$RES/adamw.json"
  step attention 60 $PY bench/bench_attention.py --out "$RES/attention.json"
  step cross_attention 60 $PY bench/bench_cross_attention.py --out "$RES/cross_attention.json"
fi
want vae && step vae 80 $PY $VAE --no-compile --profile --out "$RES/vae.json"
want vae-compile && step vae_compile 70 $PY $VAE --out "$RES/vae_compile.json"
want vae-convs && step vae_convs 90 $PY $VAE --no-compile --profile --conv-table --out "$RES/vae_convs.json"
want generate && step generate_L 110 $PY $GEN_L --batches 1,8 --repeats 3 --out "$RES/generate_L.json"
want generate-compile && step generate_L_compile 150 $PY $GEN_L --batches 1 --repeats 3 --compile --no-plain \
  --out "$RES/generate_L_compile.json"
if want generate-backends; then
  step generate_L_default 70 $PY $GEN_L --batches 1 --repeats 3 --no-plain --out "$RES/generate_L_default.json"
  step generate_L_triton_qk 40 env OMNI2SOUND_BACKEND=qk_norm_rope=triton $PY $GEN_L --batches 1 --repeats 3 \
    --no-plain --out "$RES/generate_L_triton_qk.json"
  step generate_L_triton_gelu 40 env OMNI2SOUND_BACKEND=bias_gelu=triton $PY $GEN_L --batches 1 --repeats 3 \
    --no-plain --out "$RES/generate_L_triton_gelu.json"
  step generate_L_triton_qk_gelu 70 env OMNI2SOUND_BACKEND=qk_norm_rope=triton,bias_gelu=triton $PY $GEN_L \
    --batches 1 --repeats 3 --no-plain --out "$RES/generate_L_triton_qk_gelu.json"
  step generate_L_cublaslt_gelu 40 env OMNI2SOUND_BACKEND=bias_gelu=cublaslt $PY $GEN_L --batches 1 --repeats 3 \
    --no-plain --out "$RES/generate_L_cublaslt_gelu.json"
fi
want generate-ablate && step generate_L_ablate 60 $PY bench/bench_generate.py --ablate --presets L --device cuda \
  --ablate-rounds 3 --out "$RES/generate_L_ablate.json"
want profile && step profile_L 70 $PY bench/bench_generate.py --profile --presets L --device cuda \
  --out "$RES/profile_L.json"
want train && step train_L 70 $PY $TRAIN_L --graph --variants fused,fused+graph --out "$RES/train_L.json"
want train-profile && step train_L_profile 80 $PY $TRAIN_L --profile --out "$RES/train_L_profile.json"
if want train-backends; then
  step train_L_graph_triton_qk 60 env OMNI2SOUND_BACKEND=qk_norm_rope=triton $PY $TRAIN_L --graph \
    --variants fused+graph --out "$RES/train_L_graph_triton_qk.json"
  step train_L_graph_triton_qk_gelu 60 env OMNI2SOUND_BACKEND=qk_norm_rope=triton,bias_gelu=triton $PY $TRAIN_L \
    --graph --variants fused+graph --profile --out "$RES/train_L_graph_triton_qk_gelu.json"
  step train_L_triton_qk_gelu 70 env OMNI2SOUND_BACKEND=qk_norm_rope=triton,bias_gelu=triton $PY $TRAIN_L \
    --variants fused --profile --out "$RES/train_L_triton_qk_gelu.json"
fi
want train-compile && step train_L_compile 150 $PY $TRAIN_L --compile --variants fused+compile \
  --out "$RES/train_L_compile.json"
want train-pad && step train_L_pad128 60 $PY $TRAIN_L --graph --variants fused+graph --pad-text 128 \
  --out "$RES/train_L_pad128.json"
if want train-bf16w; then
  step tests_optimizer 60 $PY -m pytest -q -m cuda -p no:cacheprovider tests/test_optimizer.py
  step train_L_bf16w 100 $PY $TRAIN_L --graph --bf16-weights --variants fused+graph,fused+graph+bf16w \
    --out "$RES/train_L_bf16w.json"
fi
if want train-modgrad; then
  step tests_modgrad 60 $PY -m pytest -q -m cuda -p no:cacheprovider tests/test_adaln.py -k split_modulation
  step adaln_modgrad 40 $PY bench/bench_adaln.py --modulation-grads --out "$RES/adaln_modgrad.json"
  step train_L_modgrad 120 $PY $TRAIN_L --graph --bf16-weights --modulation-grads both \
    --variants fused+graph+bf16w+stack,fused+graph+bf16w,fused+graph+bf16w,fused+graph+bf16w+stack \
    --out "$RES/train_L_modgrad.json"
fi
if want fp8; then
  step tests_fp8_fused 60 $PY -m pytest -q -m cuda -p no:cacheprovider tests/test_fp8_fused.py
  step fp8_L 180 $PY $FP8_L --repeats 3 --out "$RES/fp8_L.json"
  step fp8_ops 40 $PY bench/bench_fp8.py --ops --device cuda --out "$RES/fp8_ops.json"
fi
want fp8-compile && step fp8_L_compile 240 $PY bench/bench_fp8.py --presets L --batches 1 --device cuda --compile \
  --repeats 3 --out "$RES/fp8_L_compile.json"
want serve && step serve_L 150 $PY $SERVE_L --repeats 3 --out "$RES/serve_L.json"
want synchformer && step synchformer 60 $PY $SYNC --out "$RES/synchformer.json"
want extract && step extract 90 $PY $EXTRACT --json "$RES/extract.json"
[ -n "$DRY" ] && exit 0
$PY -c "import json; from omni2sound.gpu_info import gpu_info; print('nvml at the end', json.dumps(gpu_info()))" \
  >> "$OUT/gpu.txt" 2>&1
tar czf "$OUT/results.tgz" -C "$OUT" res && rm -rf "$RES"
echo "total: $(( $(date +%s) - T_START )) s"
cat "$SUMMARY"
