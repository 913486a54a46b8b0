#!/usr/bin/env bash
# Segment a folder of images (or one huge image) with a Slurm job array: one part per array task.
#
#   sbatch --array=0-15 launch_inference_sbatch.sh            # 16 parts, after editing USER SETTINGS
#   sbatch --array=0-15%4 --export=ALL,MODEL=runs/unet,IMAGE_FOLDER=plate1,OUTPUT_FOLDER=plate1_masks \
#          launch_inference_sbatch.sh                         # at most 4 tasks at once
#   bash launch_inference_sbatch.sh                           # the whole folder as one part, no Slurm
#
# Task I of an array of N runs `inference.py --part I/N --skip_existing`: a deterministic share of the
# folder's images balanced by pixel count (sharding.py), so every task computes its share from the
# folder alone. A folder holding a single image is split into N row bands written into one shared
# <stem>.zarr instead. All tasks write into the same OUTPUT_FOLDER; every mask is written to a
# temporary name and renamed when complete, so a killed task leaves no partial mask under a final name.
#
# A task copies the model(s) to node-local scratch (SCRATCH_DIR; hundreds of tasks loading one model
# from a network file system at once would queue on it), logs to OUTPUT_FOLDER/logs/part_<I>.log as
# well as to its Slurm output file, removes its scratch copy when it ends, and records its exit code.
# The task that ends last writes OUTPUT_FOLDER/logs/summary_<array job id>.txt: the images done and
# the images not done, with the reason inference.py gave for each (sharding.py summary).
#
# Requeue-safe: --requeue and --open-mode=append below; a preempted or failed task just reruns (Slurm
# requeues it, or `scontrol requeue JOBID_TASK`, or submit the same array again): --skip_existing
# skips the images whose outputs are complete and redoes the rest. Tasks may run on any node.
#
#SBATCH --job-name=seginfer
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=4
#SBATCH --mem=16G
#SBATCH --time=04:00:00
#SBATCH --output=%x_%A_%a.out
#SBATCH --open-mode=append
#SBATCH --requeue

# ================================= USER SETTINGS =================================
# Edit the defaults here, or override any of them for one job from the environment
# (sbatch --export=ALL,NAME=value,... or NAME=value bash launch_inference_sbatch.sh).
# Relative paths are relative to the directory sbatch was run from.
: "${MODEL:=}"                      # a .keras file or training output folder; several (space-separated): an ensemble
: "${IMAGE_FOLDER:=images}"         # folder of images (TIFF, PNG, JPEG, *.zarr), or one .zarr image
: "${OUTPUT_FOLDER:=masks}"         # shared by all tasks; created if missing
: "${EXTRA_INFERENCE_ARGS:=}"       # more inference.py flags, e.g. "--tta --save_probabilities --gpu -1"
: "${SCRATCH_DIR:=${TMPDIR:-/tmp}}" # node-local disk for the model copy
: "${CODE_DIR:=}"                   # empty: the repository this script was submitted from
: "${PYTHON:=}"                     # empty: CODE_DIR/.venv/bin/python if present, else python3
# =================================================================================

set -euo pipefail

die() { echo "launch_inference_sbatch.sh: error: $*" >&2; exit 2; }
log() { echo "[launcher $(date '+%F %T')] $*"; }

# The repository: Slurm runs a copy of this script from its spool folder, so look where the
# script was submitted from (the job's Command), then the submit folder, then next to $0.
find_code_dir() {
  local candidates=() command dir
  if [ -n "${SLURM_JOB_ID:-}" ]; then
    command=$(scontrol show job "$SLURM_JOB_ID" 2>/dev/null | sed -n 's/^ *Command=//p' | head -n 1 || true)
    [ -n "$command" ] && candidates+=("$(dirname "$command")")
  fi
  candidates+=("${SLURM_SUBMIT_DIR:-$PWD}" "$(cd "$(dirname "$0")" && pwd)")
  for dir in "${candidates[@]}"; do
    if [ -f "$dir/inference.py" ] && [ -f "$dir/sharding.py" ]; then echo "$dir"; return 0; fi
  done
  return 1
}

# ---- settings check (before anything is written)
[ -n "$CODE_DIR" ] || CODE_DIR=$(find_code_dir) ||
  die "cannot find the repository (inference.py): submit from the repository root or set CODE_DIR"
CODE_DIR=$(cd "$CODE_DIR" && pwd)
if [ -z "$PYTHON" ]; then
  if [ -x "$CODE_DIR/.venv/bin/python" ]; then PYTHON=$CODE_DIR/.venv/bin/python; else PYTHON=python3; fi
fi
command -v "$PYTHON" >/dev/null || die "PYTHON=$PYTHON: not found"
[ -n "$MODEL" ] || die "MODEL is empty: set it to a .keras file or a training output folder (MODEL=runs/unet)"
read -r -a models <<< "$MODEL"
for model in "${models[@]}"; do
  [ -e "$model" ] || die "MODEL=$MODEL: $model not found (expected a .keras file or a training output folder)"
  if [ -d "$model" ] && [ ! -f "$model/model.keras" ]; then
    die "MODEL=$MODEL: $model has no model.keras (expected a .keras file or a training output folder)"
  fi
done
[ -d "$IMAGE_FOLDER" ] || die "IMAGE_FOLDER=$IMAGE_FOLDER: folder not found"

# Part I of N from the array: indices must be contiguous (--array=0-15, not 1,5,9) so that every part
# is some task's.
if [ -n "${SLURM_ARRAY_TASK_ID:-}" ]; then
  PART_COUNT=${SLURM_ARRAY_TASK_COUNT:?}
  first_task=${SLURM_ARRAY_TASK_MIN:?}
  last_task=${SLURM_ARRAY_TASK_MAX:?}
  PART_INDEX=$(( SLURM_ARRAY_TASK_ID - first_task ))
  [ $(( last_task - first_task + 1 )) -eq "$PART_COUNT" ] ||
    die "--array with gaps (tasks $first_task..$last_task, $PART_COUNT of them): use a range, e.g. --array=0-$(( PART_COUNT - 1 ))"
  RUN_ID=${SLURM_ARRAY_JOB_ID}
else
  PART_COUNT=1
  PART_INDEX=0
  RUN_ID=${SLURM_JOB_ID:-local$$}
fi

mkdir -p "$OUTPUT_FOLDER/logs"
OUTPUT_FOLDER=$(cd "$OUTPUT_FOLDER" && pwd)
IMAGE_FOLDER=$(cd "$IMAGE_FOLDER" && pwd)
LOGS=$OUTPUT_FOLDER/logs
STATUS=$LOGS/run${RUN_ID}_part${PART_INDEX}.status
rm -f "$STATUS"  # a requeued task reports anew

# Everything from here on also goes to the part's log; a requeued task appends.
# tee ignores TERM and INT: the log must stay open until inference has written its last lines.
exec > >(trap '' TERM INT; exec tee -a "$LOGS/part_${PART_INDEX}.log") 2>&1
TEE_PID=$!
log "run $RUN_ID part $PART_INDEX/$PART_COUNT on $(hostname) (restart ${SLURM_RESTART_COUNT:-0}):" \
  "$IMAGE_FOLDER -> $OUTPUT_FOLDER"

# ---- node-local scratch, removed at exit whatever the reason
SCRATCH_TASK_DIR=$SCRATCH_DIR/seginfer_${RUN_ID}_part${PART_INDEX}
inference_pid=""
# shellcheck disable=SC2317  # called by the EXIT trap
finish() {
  local status=$?
  trap - EXIT TERM INT
  rm -rf "$SCRATCH_TASK_DIR"
  log "removed scratch $SCRATCH_TASK_DIR; exit code $status"
  echo "$status" > "$STATUS.tmp" && mv "$STATUS.tmp" "$STATUS"
  # The last task to end writes the summary (two ending together both write the same one).
  local ended
  ended=$(find "$LOGS" -maxdepth 1 -name "run${RUN_ID}_part*.status" | wc -l)
  if [ "$ended" -ge "$PART_COUNT" ]; then
    "$PYTHON" "$CODE_DIR/sharding.py" summary --image_folder "$IMAGE_FOLDER" \
      --output_folder "$OUTPUT_FOLDER" --run "$RUN_ID" --parts "$PART_COUNT" \
      --inference_args="$EXTRA_INFERENCE_ARGS" || true
  fi
  exec >&- 2>&-
  wait "$TEE_PID" 2>/dev/null || true
  exit "$status"
}
trap finish EXIT
# shellcheck disable=SC2317  # called by the TERM/INT traps
stop() {
  log "received SIG$1: stopping inference (completed masks stay; the rest is redone on rerun)"
  [ -z "$inference_pid" ] || kill -s "$1" "$inference_pid" 2>/dev/null || true
  [ -z "$inference_pid" ] || wait "$inference_pid" 2>/dev/null || true
  exit 143
}
trap 'stop TERM' TERM
trap 'stop INT' INT

log "copying the model(s) to $SCRATCH_TASK_DIR"
rm -rf "$SCRATCH_TASK_DIR"
scratch_models=()
for i in "${!models[@]}"; do
  target=$SCRATCH_TASK_DIR/model$i
  mkdir -p "$target"
  if [ -d "${models[$i]}" ]; then
    # model.keras and the training config.json (normalisation, architecture) are all inference reads.
    cp "${models[$i]}/model.keras" "$target/"
    [ ! -f "${models[$i]}/config.json" ] || cp "${models[$i]}/config.json" "$target/"
    # The ONNX export cache of --engine onnxruntime (engines.py), so tasks do not each export again.
    [ ! -f "${models[$i]}/model.onnx" ] || cp "${models[$i]}/model.onnx" "$target/"
    scratch_models+=("$target")
  else
    cp "${models[$i]}" "$target/"
    [ ! -f "${models[$i]%.*}.onnx" ] || cp "${models[$i]%.*}.onnx" "$target/"
    [ ! -f "$(dirname "${models[$i]}")/config.json" ] || cp "$(dirname "${models[$i]}")/config.json" "$target/"
    scratch_models+=("$target/$(basename "${models[$i]}")")
  fi
done

# ---- inference, in the background so that a stop signal reaches it through stop()
# EXTRA_INFERENCE_ARGS is split into words on purpose: it holds several flags.
# shellcheck disable=SC2086
"$PYTHON" "$CODE_DIR/inference.py" --model "${scratch_models[@]}" --image_folder "$IMAGE_FOLDER" \
  --output_folder "$OUTPUT_FOLDER" --part "$PART_INDEX/$PART_COUNT" --skip_existing \
  $EXTRA_INFERENCE_ARGS &
inference_pid=$!
set +e
wait "$inference_pid"
code=$?
set -e
inference_pid=""
log "inference exited with code $code"
exit "$code"
