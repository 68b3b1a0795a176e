#!/usr/bin/env bash
# The one command a session with a GPU lease runs ONCE: the CUDA tests (tests/test_cuda.py), both
# speed benchmarks with their default GPU settings, then the Markdown speed table. About 5-7
# minutes on an H100/H200; each step is capped (timeout --signal=INT: an interrupted benchmark
# still writes what it measured), so the whole run stays under ~9 minutes.
#
#   bash tools/gpu_check.sh            # on the GPU machine
#   bash tools/gpu_check.sh --smoke    # tiny CPU settings: checks this script anywhere (~30 s)
#
# Writes under $OUT (default ./bench_out): gpu_check.log (everything printed, the CUDA test report
# included), inference.jsonl,
# train.jsonl (one JSON line per run, appended), train_profile.txt (torch.profiler tables),
# inference_compile.jsonl (ResNet-50 cascade with torch.compile, only when time is left),
# speed_table.md (tools/speed_table.py of this run). Exit status: 0 when every step succeeded.
#
# Data: $RETINAFACE_SHARED with data/widerface_sample/ and weights/mobilenet0.25_Final.pth
# (default ./.gpu_shared when it exists, else ../shared). The GPU machine only receives the
# repository, so carry them (the README's GPU benchmarks section says how); without them the benchmarks fall back to
# synthetic inputs and skip the sample-image and real-data-pipeline measurements.
set -uo pipefail
cd "$(dirname "$0")/.."

OUT="${OUT:-./bench_out}"
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
PY="${PYTHON:-python3}"
if [ -z "${RETINAFACE_SHARED:-}" ]; then
  if [ -d .gpu_shared ]; then RETINAFACE_SHARED=.gpu_shared; else RETINAFACE_SHARED=../shared; fi
fi
export RETINAFACE_SHARED PYTHONUNBUFFERED=1
SAMPLE="$RETINAFACE_SHARED/data/widerface_sample"
WEIGHTS="$RETINAFACE_SHARED/weights/mobilenet0.25_Final.pth"

if [ "${1:-}" = "--smoke" ]; then
  INFERENCE_ARGS=(--device cpu --threads 1 --models mobilenet0.25 --batch_sizes 1 --iters 1 --warmup 0
                  --sample_limit 1 --sample_iters 1 --sample_warmup 0)
  TRAIN_ARGS=(--device cpu --threads 1 --configs mobilenet0.25:2:96 --iters 1 --warmup 1 --workers 1 --profile
              --profile_steps 1)
  COMPILE_ARGS=()
  TESTS_LIMIT=120; INFERENCE_LIMIT=120; TRAIN_LIMIT=120; BUDGET=0  # no compile step (measured on CUDA only)
else
  INFERENCE_ARGS=(--device cuda)
  TRAIN_ARGS=(--device cuda --profile)
  COMPILE_ARGS=(--device cuda --models resnet50_cascade --batch_sizes 1,32 --variants fp16+graph,fp16+compile+graph)
  TESTS_LIMIT=120; INFERENCE_LIMIT=220; TRAIN_LIMIT=200; BUDGET=540
fi

status=0
started=$SECONDS
log() { echo "$@" | tee -a "$LOG"; }
step() {  # step NAME LIMIT_SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
  log "== $(date -u +%FT%TZ) $name: $*"
  local t0=$SECONDS
  timeout --signal=INT --kill-after=30 "$limit" "$@" 2>&1 | tee -a "$LOG"
  local rc=$?
  log "== $name: exit $rc after $((SECONDS - t0)) s"
  [ "$rc" -eq 0 ] || status=1
}

log "== gpu_check $(date -u +%FT%TZ) in $(pwd), OUT=$OUT, RETINAFACE_SHARED=$RETINAFACE_SHARED"
log "== commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,temperature.gpu --format=csv 2>&1 | tee -a "$LOG"
fi
"$PY" -c "import sys, torch, torchvision, numpy, cv2; print('python', sys.version.split()[0], 'torch', torch.__version__,
'torchvision', torchvision.__version__, 'numpy', numpy.__version__, 'cv2', cv2.__version__,
'cuda', torch.cuda.is_available() and torch.cuda.get_device_name(0))" 2>&1 | tee -a "$LOG"
[ -d "$SAMPLE" ] && [ -f "$WEIGHTS" ] || log "== WARNING: no $SAMPLE or $WEIGHTS: synthetic inputs only"
log "== cpu cores: $(nproc); /dev/shm (DataLoader workers): $(df -h /dev/shm 2>/dev/null | awk 'NR==2 {print $4 " free"}')"

# tests/test_cuda.py skips itself without CUDA (the smoke run); a failure here does not stop the benchmarks
step cuda_tests "$TESTS_LIMIT" "$PY" -m pytest tests/test_cuda.py -q -p no:cacheprovider -rs
step inference "$INFERENCE_LIMIT" "$PY" tools/benchmark_inference.py "${INFERENCE_ARGS[@]}" \
  --sample_images "$SAMPLE/val/images" --sample_weights "$WEIGHTS" --out "$OUT/inference.jsonl"
step train "$TRAIN_LIMIT" "$PY" tools/benchmark_train.py "${TRAIN_ARGS[@]}" \
  --dataset "$SAMPLE" --split val --profile_out "$OUT/train_profile.txt" --out "$OUT/train.jsonl"

# torch.compile of the headline case, only with the time left under the ~9-minute budget
# (compiling the ResNet-50 cascade takes about a minute per input shape)
left=$((BUDGET - (SECONDS - started) - 30))
if [ "$BUDGET" -eq 0 ]; then
  log "== compile step skipped (smoke run)"
elif [ "$left" -ge 120 ]; then
  step compile "$left" "$PY" tools/benchmark_inference.py "${COMPILE_ARGS[@]}" \
    --sample_images "$SAMPLE/val/images" --sample_weights "" --out "$OUT/inference_compile.jsonl"
else
  log "== compile step skipped: ${left} s left of the ${BUDGET} s budget"
fi

files=()
for f in "$OUT/inference.jsonl" "$OUT/inference_compile.jsonl" "$OUT/train.jsonl"; do
  [ -s "$f" ] && files+=("$f")
done
if [ ${#files[@]} -gt 0 ]; then
  step table 60 "$PY" tools/speed_table.py "${files[@]}" --out "$OUT/speed_table.md"
else
  log "== no benchmark output to tabulate"; status=1
fi
log "== gpu_check done in $((SECONDS - started)) s, status $status; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
exit $status
