#!/usr/bin/env bash
# The one command a session with a GPU lease runs: the CUDA tests (tests/test_cuda.py), both
# speed benchmarks with settings that cover every target of the GPU issues, test.py in fresh
# processes, then the Markdown speed table. Step times on an H100 (2026-11-27, runs 7 to 10):
# cuda_tests 67-96 s, train 262 s (cut by its 260 s cap in the ResNet-50 config, run 9), matching
# 12 + 12 s, loader 38 s, inference 193 s (run 7; run 9 cut it at 118 s, inside the sample section),
# nms 16 s; trained_r50 (runs 8 and 10): 121-136 s training, 107 s inference, ~15 s NMS. On an H200
# (2026-11-27, H200 runs 1 and 2): cuda_tests 135 s (15 tests), inference 172 s (complete), train cut
# at 189 s by the deadline (mobilenet0.25's config about 110 s); trained_r50 111 + 13 + 100 s. The
# first call held the machine 34 s longer than its command ran (start-up included) of the 15 minutes.
# H200, 2026-11-28: cuda_tests 165 s (18 tests; 22 since, among them torch.compile of the device
# augmentation: cap 240 s), train 274 s (complete; other rows since, cap 330 s: the deadline may cut
# ResNet-50's last real rows), inference 197 s (complete); the first call held the machine 32 s longer
# than its command ran, the two calls 714 of the 900 s.
# Each step is capped (timeout --signal=INT: an interrupted benchmark still writes what it
# measured); GPU_CHECK_DEADLINE caps the whole call.
#
#   GPU_CHECK_DEADLINE=580 bash tools/gpu_check.sh   # on the GPU machine: the lease's first call (timeout_s 600)
#   GPU_CHECK_DEADLINE=<left-40> GPU_CHECK_STEPS="inference table" bash tools/gpu_check.sh   # its second call
#                                  (left: the device seconds the lease still has; timeout_s <left-20>)
#   bash tools/gpu_check.sh --smoke    # tiny CPU settings, every step's wiring: checks this script anywhere (~2 min, 2 cores)
#   GPU_CHECK_STEPS="train table" bash tools/gpu_check.sh   # only some steps (a rerun of what failed)
#
# GPU_CHECK_DEADLINE=SECONDS (from the script's start) bounds the whole call: each step's cap is cut to
# what is left before the deadline less 30 s kept for the table, and a step with under 20 s left (the
# table: 5 s) is skipped (logged; exit status 1). Set it below the device call's timeout_s: on 2026-11-27
# (run 7) the default steps of then summed to 551 s and the call's 560 s limit cut the nms step and the table.
#
# Steps (GPU_CHECK_STEPS, default "cuda_tests train table"), in this order:
#   cuda_tests   tests/test_cuda.py
#   matching     tools/benchmark_matching.py: the loss's anchor matching of 8 real batches against the
#                padded-batch baseline, mobilenet0.25 bs32@640 and ResNet-50 bs24@840 with per-image
#                anchors (into train.jsonl); not a default step since run 8 (the same in three H100 runs)
#   loader       tools/benchmark_loader.py: host time the training loop loses per batch taken from the
#                DataLoader (pinned, 14 workers), targets padded in the workers against one tensor per
#                image (into train.jsonl); not a default step since run 8 (measured in two H100 runs)
#   nms          tools/benchmark_nms.py: post-processing of a batch of 32 per NMS chunk size (into
#                inference.jsonl; the trained_r50 step runs it on the trained cascade too); not a default
#                step since run 10 (the same in runs 8 and 9; the first call's time goes to training)
#   inference    tools/benchmark_inference.py: every inference target, the sample images, new sizes;
#                not a default step since H200 run 1 (measured complete there; the first call's time
#                goes to the training rows that run lost)
#   train        tools/benchmark_train.py: fixed batches, the real pipeline
#   cli          tools/benchmark_cli.py: test.py on the sample in fresh processes per --channels_last and --pad_to
#                setting (one round) against one public-style pass
#   trained_r50  the ResNet-50 cascade trained from scratch on the sample (tools/overfit_check.py),
#                then its batch-32 variants (torch.compile included) against its fp32 path and its
#                post-processing per NMS chunk size
#   compile      torch.compile of the ResNet-50 cascade at batch 32 on random weights (22 s of
#                compilation on an H100; measured 2026-11-26, trained_r50 measures it again)
#   train_compile  train.py --compile: fixed-batch training steps bf16 against bf16+compile (and the
#                public-style step) for ResNet-50 bs24@840 and mobilenet0.25 bs32@640; not timed on a
#                GPU yet (compilation of each model: a minute or more)
#   table        tools/speed_table.py of the JSON files present
#
# Writes under $OUT (default ./bench_out): gpu_check.log (everything printed, the CUDA test report
# included), inference.jsonl, cli.jsonl, train.jsonl (one JSON line per run, appended),
# train_profile.txt (torch.profiler tables; --smoke only since run 10), inference_trained_r50.jsonl,
# inference_compile.jsonl, train_compile.jsonl, speed_table.md. Exit status: 0 when every step succeeded.
#
# Data: $RETINAFACE_SHARED with data/widerface_sample/ and weights/mobilenet0.25_Final.pth
# (default ./.gpu_shared when it exists, else ../shared). The GPU machine only receives the
# repository, so carry them (the README's GPU benchmarks section says how); without them the
# script stops with exit status 2 (--smoke falls back to synthetic inputs; the steps that need
# the sample are then skipped).
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

DEFAULT_STEPS="cuda_tests train table"
KNOWN_STEPS=" cuda_tests nms inference train matching loader cli trained_r50 train_compile compile table "
SMOKE=false
case "$#:${1:-}" in
  0:) ;;
  1:--smoke) SMOKE=true; DEFAULT_STEPS+=" inference nms matching loader cli" ;;  # the smoke run checks the other steps' wiring too
  1:-h|1:--help) sed -n '2,/^set -uo pipefail/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
  *) echo "gpu_check.sh: unknown arguments: $* (only --smoke; steps go in GPU_CHECK_STEPS)" >&2; exit 2 ;;
esac
STEPS=" ${GPU_CHECK_STEPS:-$DEFAULT_STEPS} "
for name in $STEPS; do
  if [[ "$KNOWN_STEPS" != *" $name "* ]]; then
    echo "gpu_check.sh: unknown step '$name' in GPU_CHECK_STEPS (steps:$KNOWN_STEPS)" >&2
    exit 2
  fi
done
DEADLINE="${GPU_CHECK_DEADLINE:-}"
TABLE_RESERVE=30  # seconds kept for the table (and the step killed by the deadline) before the deadline
if [ -n "$DEADLINE" ]; then
  # 10#: 0540 is 540 (bash arithmetic would read it as octal 352, and 090 as an error)
  if ! [[ "$DEADLINE" =~ ^[0-9]+$ ]] || (( 10#$DEADLINE < 60 )); then
    echo "gpu_check.sh: GPU_CHECK_DEADLINE must be a whole number of seconds, at least 60 (got '$DEADLINE')" >&2
    exit 2
  fi
  DEADLINE=$((10#$DEADLINE))
fi
if $SMOKE; then
  INFERENCE_ARGS=(--device cpu --threads 1 --models mobilenet0.25 --batch_sizes 1 --iters 1 --warmup 0
                  --sample_limit 1 --sample_iters 1 --sample_warmup 0)
  TRAIN_ARGS=(--device cpu --threads 1 --configs mobilenet0.25:2:96 --iters 1 --warmup 1 --workers 1 --profile
              --profile_steps 1 --augment_on workers,device+compile)
  COMPILE_ARGS=(--device cpu --threads 1 --models mobilenet0.25 --batch_sizes 1 --iters 1 --warmup 0)
  TRAINED_R50_ARGS=(--device cpu --network resnet18 --cascade true --copies 2 --batch_size 4 --im_size 64 --iters 2
                    --eval_every 2)
  TRAINED_R50_INFERENCE_ARGS=(--device cpu --threads 1 --models resnet50_cascade --batch_sizes 1 --iters 1 --warmup 0
                              --size 128x96)
  CLI_ARGS=(--device cpu --rounds 1 --layouts auto --extra "")  # one test.py process: the wiring
  # compiled variants are skipped on the CPU (a note in the JSON): this checks the step's wiring
  TRAIN_COMPILE_ARGS=(--device cpu --threads 1 --configs mobilenet0.25:2:96 --variants public,fp32,fp32+compile --iters 1
                      --warmup 1)
  NMS_ARGS=(--device cpu --threads 1 --batch 2 --size 160x120 --iters 1 --warmup 0)
  LOADER_ARGS=(--batch_size 4 --batches 3 --workers 1 --im_size 96 --rounds 1)
  MATCHING_ARGS=(--device cpu --threads 1 --batch 2 --size 96 --batches 2 --iters 1)
  MATCHING_CASCADE_ARGS=("${MATCHING_ARGS[@]}" --per_image_anchors)
  TESTS_LIMIT=120; INFERENCE_LIMIT=120; TRAIN_LIMIT=120; COMPILE_LIMIT=120; CLI_LIMIT=120; TRAINED_R50_LIMIT=120
  TRAIN_COMPILE_LIMIT=120
else
  # the targets: ResNet-50 cascade bs32 and bs1, mobilenet0.25 bs32 at 640x480, the sample images;
  # training mobilenet0.25 bs32@640 and ResNet-50 bs24@840, fixed batches and the real pipeline
  # (bf16 left out since run 8: it fails the fidelity rule on mobilenet0.25 in every run, and on random
  # ResNet-50 weights it says nothing; trained_r50 times it on trained weights)
  INFERENCE_ARGS=(--device cuda --batch_sizes 1,32 --variants ref,fp16,tf32+graph,fp16+graph --iters 20
                  --sample_variants ref,fp16,fp16+graph --sample_iters 5)
  # bf16+cuda_graphs: train.py's default on these GPUs (--cuda_graphs auto); fp16+cuda_graphs:
  # train.py --amp_dtype fp16 (cuDNN's BatchNorm instead of PyTorch's, README Training), the fastest
  # fixed batches of the 2026-11-28 lease. Real pipeline in fp16 (the fastest fixed batches are the
  # yardstick), each batch prepared when its step starts (train.py) and with only its copies made
  # during the step before (+copy_ahead); augmentation modes: device+compile first (train.py
  # --compile_augment true, new since the 2026-11-28 lease), then the workers (train.py's default),
  # then the device's eager kernels: a deadline cuts ResNet-50's last rows. Rows of about 5 s
  # (mobilenet0.25) and 12.5 s (ResNet-50) each, fixed rows 18-35 s, loader passes 4-5 s (2026-11-28).
  # Not here: the bf16 real rows and +ahead (side stream for the whole preparation; both measured in
  # the 2026-11-28 lease), eager fp16 rows, whole-step graph headroom, busy-core and batches-in-turn
  # rows, the profile (measured in runs 1-9)
  TRAIN_ARGS=(--device cuda --configs mobilenet0.25:32:640,resnet50:24:840
              --variants public,fp16+cuda_graphs,bf16+cuda_graphs
              --real_variants fp16+cuda_graphs,fp16+cuda_graphs+copy_ahead --augment_on device+compile,workers,device
              --busy_processes 0 --fixed_batches 0 --iters 30 --warmup 3)
  # the ResNet-50 cascade target is bf16 at batch 32: compiled against the same variant uncompiled
  COMPILE_ARGS=(--device cuda --models resnet50_cascade --batch_sizes 32 --variants bf16+graph,bf16+compile+graph)
  # trained_r50: the ResNet-50 cascade from scratch on the sample listed 40 times, 1000 steps of 16 at 640
  # (on the H100: sample hard AP 0.962 after 1000 steps, 112 s; 0.974 after 1500)
  TRAINED_R50_ARGS=(--device cuda --network resnet50 --cascade true --copies 40 --batch_size 16 --im_size 640
                    --iters 1000 --eval_every 500 --lr 1e-2 --warmup_iters 50 --workers 8)
  TRAINED_R50_INFERENCE_ARGS=(--device cuda --models resnet50_cascade --batch_sizes 32
                              --variants ref,tf32+graph,fp16+graph,bf16+graph,fp16+compile+graph,bf16+compile+graph)
  # post-processing of one batch of 32 at 640x480 per NMS chunk size (thresholds 0.5 and 0.02)
  NMS_ARGS=(--device cuda)
  # 16 batches of 32 at 640 per round, 3 rounds per collate (pinned, as train.py on CUDA)
  LOADER_ARGS=(--workers 14 --rounds 3)
  # matching of 8 real batches against the padded baseline: mobilenet0.25's bs32@640 (the priors)
  # and ResNet-50's bs24@840 with per-image anchors (stage 2 of the refine cascade)
  MATCHING_ARGS=(--device cuda --iters 5)
  MATCHING_CASCADE_ARGS=(--device cuda --iters 5 --batch 24 --size 840 --per_image_anchors)
  # 5 fresh processes: the public-style pass, then auto/true/false/--pad_to (run 5: the first two took ~55 s)
  CLI_ARGS=(--device cuda --rounds 1 --timeout 60)
  # train.py --compile on the two training targets: fixed batches only (no real pipeline, no
  # busy-core or several-batch rows); the public-style step gives the same-run ratio
  TRAIN_COMPILE_ARGS=(--device cuda --configs resnet50:24:840,mobilenet0.25:32:640 --variants public,bf16,bf16+compile
                      --real_variants "" --busy_processes 0 --fixed_batches 0 --iters 30 --warmup 3)
  TRAIN_COMPILE_LIMIT=240
  TESTS_LIMIT=240; INFERENCE_LIMIT=240; TRAIN_LIMIT=330; COMPILE_LIMIT=150; CLI_LIMIT=180; TRAINED_R50_LIMIT=240
fi

status=0
started=$SECONDS
log() { echo "$@" | tee -a "$LOG"; }
step() {  # step NAME LIMIT_SECONDS COMMAND...
  local name=$1 limit=$2 kill_after=30
  shift 2
  if [ -n "$DEADLINE" ]; then  # SECONDS: since the script started
    local left=$((DEADLINE - SECONDS - TABLE_RESERVE)) floor=20
    [ "$name" = table ] && { left=$((DEADLINE - SECONDS)); floor=5; }  # the table takes about a second
    if [ "$left" -lt "$floor" ]; then
      log "== $name: skipped, ${left} s left before GPU_CHECK_DEADLINE=$DEADLINE (after ${SECONDS} s)"
      status=1
      return
    fi
    kill_after=15  # within TABLE_RESERVE
    if [ "$left" -lt "$limit" ]; then
      log "== $name: cap cut from $limit to $left s by GPU_CHECK_DEADLINE=$DEADLINE"
      limit=$left
    fi
  fi
  log "== $(date -u +%FT%TZ) $name: $*"
  local t0=$SECONDS
  timeout --signal=INT --kill-after="$kill_after" "$limit" "$@" 2>&1 | tee -a "$LOG"
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
HAVE_SHARED=true
if ! { [ -d "$SAMPLE" ] && [ -f "$WEIGHTS" ]; }; then
  HAVE_SHARED=false
  if $SMOKE; then
    log "== WARNING: no $SAMPLE or $WEIGHTS: synthetic inputs only"
  else  # without them most CUDA tests skip and the benchmarks measure noise: not worth a lease
    log "== ERROR: no $SAMPLE or $WEIGHTS: carry .gpu_shared (README, GPU benchmarks) or set RETINAFACE_SHARED"
    exit 2
  fi
fi
if ! $SMOKE && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  log "== ERROR: CUDA is not available to $PY: the steps would measure nothing (--smoke checks the script on a CPU)"
  exit 2
fi
$SMOKE || export REQUIRE_SHARED=1  # a missing shared file fails a CUDA test instead of skipping it
SHM_FREE_KB=$(df -Pk /dev/shm 2>/dev/null | awk 'NR==2 {print $4}')
log "== cpu cores: $(nproc); /dev/shm (DataLoader workers): ${SHM_FREE_KB:-?} KiB free"
# the real-data training measurement keeps up to workers x 6 batches in shared memory (4 ahead, 2 more
# kept by each worker: about 4.3 GB with 14 workers at ResNet-50 bs24@840): fewer workers where
# /dev/shm is small (the H100 machine had 128 GiB)
if ! $SMOKE && [ -n "${SHM_FREE_KB:-}" ] && [ "$SHM_FREE_KB" -lt 6291456 ]; then
  TRAIN_ARGS+=(--workers 4)
  TRAINED_R50_ARGS+=(--workers 4)
  LOADER_ARGS+=(--workers 4)
  log "== /dev/shm under 6 GiB: training with --workers 4"
fi

wanted() { [[ "$STEPS" == *" $1 "* ]]; }
needs_shared() {  # needs_shared STEP: whether STEP can run (the sample and the weights are there)
  $HAVE_SHARED && return 0
  log "== $1: skipped (no sample data or weights)"
  return 1
}
log "== steps:$STEPS${DEADLINE:+(deadline $DEADLINE s)}"

# tests/test_cuda.py skips itself without CUDA (the smoke run); a failure here does not stop the benchmarks
wanted cuda_tests && step cuda_tests "$TESTS_LIMIT" "$PY" -m pytest tests/test_cuda.py -q -p no:cacheprovider -rs --durations=12
# post-processing per NMS chunk size (published mobilenet0.25), into inference.jsonl (8 files come back)
wanted nms && needs_shared nms && step nms 90 "$PY" tools/benchmark_nms.py "${NMS_ARGS[@]}" \
  --sample_images "$SAMPLE/val/images" --weights "$WEIGHTS" --out "$OUT/inference.jsonl"
wanted inference && step inference "$INFERENCE_LIMIT" "$PY" tools/benchmark_inference.py "${INFERENCE_ARGS[@]}" \
  --sample_images "$SAMPLE/val/images" --sample_weights "$WEIGHTS" --out "$OUT/inference.jsonl"
# training after inference when both run (run 9 measured every training row of both configs but
# one, and the deadline then cut inference's sample section); a deadline cuts the last step, and the
# benchmark writes what it measured when interrupted: the ResNet-50 config's last rows go first
wanted train && step train "$TRAIN_LIMIT" "$PY" tools/benchmark_train.py "${TRAIN_ARGS[@]}" \
  --dataset "$SAMPLE" --split val --profile_out "$OUT/train_profile.txt" --out "$OUT/train.jsonl"
if wanted matching && needs_shared matching; then
  step matching 60 "$PY" tools/benchmark_matching.py "${MATCHING_ARGS[@]}" --dataset "$SAMPLE" --out "$OUT/train.jsonl"
  step matching_cascade 60 "$PY" tools/benchmark_matching.py "${MATCHING_CASCADE_ARGS[@]}" --dataset "$SAMPLE" \
    --out "$OUT/train.jsonl"
fi
wanted loader && needs_shared loader && step loader 90 "$PY" tools/benchmark_loader.py "${LOADER_ARGS[@]}" \
  --dataset "$SAMPLE" --split val --out "$OUT/train.jsonl"
# the product's own command line in fresh processes, as a user meets a data set: test.py on the
# sample (every size new to the process) per --channels_last setting against one public-style pass
wanted cli && needs_shared cli && step cli "$CLI_LIMIT" "$PY" tools/benchmark_cli.py "${CLI_ARGS[@]}" \
  --dataset "$SAMPLE" --weights "$WEIGHTS" --out "$OUT/cli.jsonl"
# trained_r50: fidelity of the ResNet-50 cascade's fast paths needs trained weights, which the
# project does not have; random ones amplify rounding (tools/precision_check.py --sensitivity). The
# cascade is trained here from scratch on the sample (the AP curve goes to the log; the weights are
# saved after every segment, so a run cut short still leaves the latest), then its inference
# variants are timed and compared with its fp32 path.
if wanted trained_r50 && needs_shared trained_r50; then
  TRAINED=$(mktemp -d)
  step trained_r50_train "$TRAINED_R50_LIMIT" "$PY" tools/overfit_check.py "${TRAINED_R50_ARGS[@]}" \
    --dataset "$SAMPLE" --gt_dir "$SAMPLE/ground_truth" --min_hard_ap 0 --save "$TRAINED/resnet50_cascade.pth"
  if [ -f "$TRAINED/resnet50_cascade.pth" ]; then
    # NMS first (~15 s): in run 10 the inference step took the deadline and the NMS step was skipped
    step trained_r50_nms 90 "$PY" tools/benchmark_nms.py "${NMS_ARGS[@]}" --model resnet50_cascade \
      --weights "$TRAINED/resnet50_cascade.pth" --sample_images "$SAMPLE/val/images" \
      --out "$OUT/inference_trained_r50.jsonl"
    step trained_r50_inference "$TRAINED_R50_LIMIT" "$PY" tools/benchmark_inference.py "${TRAINED_R50_INFERENCE_ARGS[@]}" \
      --weights "resnet50_cascade=$TRAINED/resnet50_cascade.pth" --sample_images "$SAMPLE/val/images" \
      --sample_weights "" --out "$OUT/inference_trained_r50.jsonl"
  else
    log "== trained_r50_inference: skipped (training left no weights)"; status=1
  fi
  rm -rf "$TRAINED"
fi
wanted train_compile && step train_compile "$TRAIN_COMPILE_LIMIT" "$PY" tools/benchmark_train.py \
  "${TRAIN_COMPILE_ARGS[@]}" --dataset "$SAMPLE" --split val --out "$OUT/train_compile.jsonl"
# torch.compile of the headline case (ResNet-50 cascade, batch 32, bf16)
wanted compile && step compile "$COMPILE_LIMIT" "$PY" tools/benchmark_inference.py "${COMPILE_ARGS[@]}" \
  --sample_images "$SAMPLE/val/images" --sample_weights "" --out "$OUT/inference_compile.jsonl"

files=()
for f in "$OUT/inference.jsonl" "$OUT/inference_compile.jsonl" "$OUT/inference_trained_r50.jsonl" "$OUT/cli.jsonl" \
         "$OUT/train.jsonl" "$OUT/train_compile.jsonl"; do
  [ -s "$f" ] && files+=("$f")
done
if ! wanted table; then
  :
elif [ ${#files[@]} -gt 0 ]; then
  step table 60 "$PY" tools/speed_table.py "${files[@]}" --out "$OUT/speed_table.md"
else
  log "== no benchmark output to tabulate"; status=1
fi
log "== gpu_check done in $((SECONDS - started)) s, status $status; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
exit $status
