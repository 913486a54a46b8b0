#!/usr/bin/env bash
# Train a segmentation network (UNet or SegNet) as a Slurm batch job.
#
#   sbatch launch_train_sbatch.sh                                 # after editing USER SETTINGS
#   sbatch --export=ALL,BATCH_SIZE=16,MODEL=segnet launch_train_sbatch.sh   # per-job overrides
#   sbatch --nodes=4 launch_train_sbatch.sh                        # multi-worker (see below)
#   sbatch --gres=none --cpus-per-task=2 launch_train_sbatch.sh     # nodes without GPUs
#   bash launch_train_sbatch.sh                                    # same steps, outside Slurm
#   sbatch --export=ALL,PRETRAIN_DATABASE=data/unlabelled-x.lmdb launch_train_sbatch.sh  # pretrain
#
# A job: copies the two LMDB databases to node-local scratch (reading them over a network file
# system would starve the GPUs), snapshots the source code into the results folder, trains with
# the results folder as --output_dir while teeing the log into it, and removes the scratch copy
# when it ends, whether it succeeded, failed or was stopped.
#
# Time limits and preemption: Slurm sends SIGTERM to this batch shell 120 s before the time limit
# (--signal=B:TERM@120 below; B: = the batch shell only, so the trainer is not signalled twice).
# The shell forwards it to the trainer, which finishes its step, writes checkpoints/latest and exits
# 143. With REQUEUE=1 the job then submits its continuation (same settings, same results folder,
# starting once this job has ended) which resumes from checkpoints/latest, so a training longer
# than one time limit goes on with nothing lost; the interrupted job itself ends with code 143.
# The continuation is a new job rather than `scontrol requeue` of this one: Slurm holds a requeued
# job for about two minutes (its launch credential must expire) and truncates its output file.
# The continuation repeats the options Slurm reports back (time limit, nodes, tasks per node, CPUs
# per task, GRES, partition, account, QOS, job name, the output file's folder). Options it does not
# report (--signal, --mail-*) come from this header, or from SBATCH_* environment variables, which
# the continuation inherits: SBATCH_SIGNAL=B:TERM@300 sbatch launch_train_sbatch.sh.
#
# Several nodes (or several tasks per node): every task runs the trainer through `srun`. The
# trainer sees SLURM_STEP_NUM_TASKS > 1 and builds tf.distribute.MultiWorkerMirroredStrategy
# from tf.distribute.cluster_resolver.SlurmClusterResolver (rank 0 is the chief: it alone writes
# logs, CSVs, plots, checkpoints and the exported model). A task's towers are its GPUs; the
# gradients of all replicas of all tasks are summed by one collective all-reduce, chosen through
# tf.distribute.experimental.CommunicationOptions: NCCL when training on GPUs, RING (over gRPC) on
# CPUs. --gradient_update_location only applies to jobs with a single task: with several tasks it
# is not used (the trainer warns if it is given; config.json's "reduction" records the all-reduce).
# Every task reads its own shard of the training stream from the node-local copy of the databases.
#
# Self-supervised pretraining (docs/pretraining.md): PRETRAIN_DATABASE names an unlabelled LMDB
# (build_lmdb.py --unlabelled_only); the job then runs pretrain_unet.py on it instead of training,
# with the same scratch copy, snapshot, budget, signals and continuations (TRAIN_DATABASE,
# TEST_DATABASE and NUMBER_CLASSES are not used). Fine-tune from its folder with
# EXTRA_TRAIN_ARGS="--init_from results/<pretraining experiment>" in a later job.
#
#SBATCH --job-name=segtrain
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gres=gpu:4
#SBATCH --cpus-per-task=16
#SBATCH --time=24:00:00
#SBATCH --output=%x_%N.%j.out
#SBATCH --signal=B:TERM@120

# ================================= USER SETTINGS =================================
# Edit the defaults here, or override any of them for one job from the environment
# (sbatch --export=ALL,NAME=value,... or NAME=value bash launch_train_sbatch.sh).
# Relative paths are relative to the directory sbatch was run from.
: "${TRAIN_DATABASE:=data/train.lmdb}"  # LMDB folders made by build_lmdb.py
: "${TEST_DATABASE:=data/test.lmdb}"
: "${PRETRAIN_DATABASE:=}"              # an unlabelled LMDB: pretrain (pretrain_unet.py) instead of training
: "${OUTPUT_ROOT:=results}"             # each experiment gets a folder under it
: "${EXPERIMENT_NAME:=}"                # empty: <model>_<date>-<time>_job<id>; an existing folder resumes
: "${MODEL:=unet}"                      # a model of models/__init__.py: unet | segnet
: "${BATCH_SIZE:=8}"                    # per tower (GPU); the effective batch is x towers x tasks
: "${TEST_EVERY_N_STEPS:=}"             # empty: one test pass per pass over the training data
: "${NUMBER_CLASSES:=2}"
: "${TILE_SIZE:=256}"
: "${GPUS_PER_NODE:=${SLURM_GPUS_ON_NODE:-0}}"  # default: what --gres gave the job; 0 = train on CPUs
: "${TIME_BUDGET:=}"                    # --time_budget (45m, 2h, 1d); empty: in a job, its time left minus
                                        # TIME_BUDGET_MARGIN (not when resuming, nor with --max_steps,
                                        # --max_epochs or --time_budget in EXTRA_TRAIN_ARGS); none: no budget
: "${TIME_BUDGET_MARGIN:=5}"            # minutes of the time left kept for start-up, the SIGTERM and cleanup
: "${EXTRA_TRAIN_ARGS:=}"               # more trainer flags, e.g. "--learning_rate 3e-4 --loss ce+dice"
: "${SCRATCH_DIR:=${TMPDIR:-/tmp}}"     # node-local disk for the database copies
: "${REQUEUE:=0}"                       # 1: resubmit after a time limit / preemption and resume
: "${MAX_RESUBMISSIONS:=20}"            # stop resubmitting after this many continuations
: "${CODE_DIR:=}"                       # empty: the repository this script was submitted from
: "${PYTHON:=}"                         # empty: CODE_DIR/.venv/bin/python if present, else python3
# =================================================================================
: "${RESUBMISSION:=0}"                  # set by the job itself: how many continuations came before

set -euo pipefail

die() { echo "launch_train_sbatch.sh: error: $*" >&2; exit 2; }
log() { echo "[launcher $(date '+%F %T')] $*"; }

# The repository: Slurm runs a copy of this script from its spool folder, so look where the
# script was submitted from (the job's Command), then the submit folder, then next to $0.
find_code_dir() {
  local candidates=() command
  if [ -n "${SLURM_JOB_ID:-}" ]; then
    command=$(scontrol show job "$SLURM_JOB_ID" 2>/dev/null | sed -n 's/^ *Command=//p' || true)
    [ -n "$command" ] && candidates+=("$(dirname "$command")")
  fi
  candidates+=("${SLURM_SUBMIT_DIR:-$PWD}" "$(cd "$(dirname "$0")" && pwd)")
  local dir
  for dir in "${candidates[@]}"; do
    if [ -f "$dir/train_unet.py" ]; then echo "$dir"; return 0; fi
  done
  return 1
}

# Slurm's time format ([D-]HH:MM:SS, [D-]HH[:MM], MM:SS or MM) as whole minutes; nothing for
# UNLIMITED, NOT_SET and the like.
slurm_minutes() {
  local text=$1 days=0 h=0 m=0 s=0 parts
  [[ $text =~ ^[0-9] ]] || return 0
  IFS=: read -r -a parts <<<"${text#*-}"
  if [[ $text == *-* ]]; then
    days=${text%%-*}; h=${parts[0]}; m=${parts[1]:-0}; s=${parts[2]:-0}
  elif [ "${#parts[@]}" -eq 3 ]; then
    h=${parts[0]}; m=${parts[1]}; s=${parts[2]}
  else
    m=${parts[0]}; s=${parts[1]:-0}
  fi
  echo $(( ((10#$days * 24 + 10#$h) * 60) + 10#$m + 10#$s / 60 ))
}

# Run a command once on every node of the job (scratch is node-local), or here outside Slurm.
on_each_node() {
  if [ "$NNODES" -gt 1 ]; then
    srun --nodes="$NNODES" --ntasks="$NNODES" --ntasks-per-node=1 "$@"
  else
    "$@"
  fi
}

# ---- settings check and resolution
SCRIPT=$(realpath "$0")   # the copy of this script that runs (Slurm's spool copy in a job)
[ -n "$CODE_DIR" ] || CODE_DIR=$(find_code_dir) ||
  die "cannot find the repository (train_unet.py): submit from the repository root or set CODE_DIR"
CODE_DIR=$(cd "$CODE_DIR" && pwd)
if [ -z "$PYTHON" ]; then
  if [ -x "$CODE_DIR/.venv/bin/python" ]; then PYTHON=$CODE_DIR/.venv/bin/python; else PYTHON=python3; fi
fi
command -v "$PYTHON" >/dev/null || die "PYTHON=$PYTHON: not found"
# The model names come from the registry, models.MODEL_NAMES. It is read from the source rather than
# imported: importing models loads TensorFlow, which takes seconds.
# shellcheck disable=SC2016
registered=$("$PYTHON" -c '
import ast, sys
for node in ast.parse(open(sys.argv[1]).read()).body:
    if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "MODEL_NAMES":
        print(" ".join(ast.literal_eval(node.value)))
' "$CODE_DIR/models/__init__.py") || registered=""
[ -n "$registered" ] || die "cannot read MODEL_NAMES from $CODE_DIR/models/__init__.py with PYTHON=$PYTHON"
[[ " $registered " == *" $MODEL "* ]] || die "MODEL=$MODEL: expected ${registered// / or }"
if [ -n "$PRETRAIN_DATABASE" ]; then
  [ "$MODEL" = unet ] || die "MODEL=$MODEL: pretraining (PRETRAIN_DATABASE) is for the UNet only"
  PROGRAM=pretrain_unet.py
  DATABASES=(PRETRAIN_DATABASE)
else
  PROGRAM=train_$MODEL.py
  DATABASES=(TRAIN_DATABASE TEST_DATABASE)
fi
for name in BATCH_SIZE NUMBER_CLASSES TILE_SIZE GPUS_PER_NODE REQUEUE MAX_RESUBMISSIONS RESUBMISSION \
    TIME_BUDGET_MARGIN; do
  [[ ${!name} =~ ^[0-9]+$ ]] || die "$name=${!name}: expected a whole number"
done
[ -z "$TEST_EVERY_N_STEPS" ] || [[ $TEST_EVERY_N_STEPS =~ ^[0-9]+$ ]] ||
  die "TEST_EVERY_N_STEPS=$TEST_EVERY_N_STEPS: expected a whole number or nothing"
[ "$REQUEUE" -le 1 ] || die "REQUEUE=$REQUEUE: expected 0 or 1"
[ -z "$TIME_BUDGET" ] || [ "$TIME_BUDGET" = none ] || [[ $TIME_BUDGET =~ ^([0-9]+(\.[0-9]+)?[smhd])+$ ]] ||
  die "TIME_BUDGET=$TIME_BUDGET: expected a duration like 90s, 45m, 2h, 1d or 1h30m, none, or nothing"
for name in "${DATABASES[@]}"; do
  [ -f "${!name}/data.mdb" ] || die "$name=${!name}: not an LMDB database (expected a folder holding data.mdb)"
  printf -v "$name" '%s' "$(cd "${!name}" && pwd)"
done

JOB_ID=${SLURM_JOB_ID:-local$$}
NNODES=${SLURM_JOB_NUM_NODES:-1}
NTASKS=${SLURM_NTASKS:-1}
TASKS_PER_NODE=$(( (NTASKS + NNODES - 1) / NNODES ))
if [ "$GPUS_PER_NODE" -gt 0 ] && [ $(( GPUS_PER_NODE % TASKS_PER_NODE )) -ne 0 ]; then
  die "GPUS_PER_NODE=$GPUS_PER_NODE cannot be shared equally by $TASKS_PER_NODE tasks per node"
fi
[ -n "$EXPERIMENT_NAME" ] || EXPERIMENT_NAME=${PRETRAIN_DATABASE:+pretrain_}${MODEL}_$(date +%Y%m%d-%H%M%S)_job${JOB_ID}
mkdir -p "$OUTPUT_ROOT"
OUTPUT_ROOT=$(cd "$OUTPUT_ROOT" && pwd)
OUT=$OUTPUT_ROOT/$EXPERIMENT_NAME
mkdir -p "$OUT"

# Everything from here on also goes to the results folder. A requeued or resubmitted job appends.
# tee ignores TERM and INT: when Slurm or Ctrl-C signals every process of the job, the log must
# stay open until the trainer has written its last lines.
exec > >(trap '' TERM INT; exec tee -a "$OUT/train.log") 2>&1
TEE_PID=$!
log "job $JOB_ID (continuation $RESUBMISSION) on $(hostname): $NNODES node(s)," \
  "$NTASKS task(s), $GPUS_PER_NODE GPU(s) per node; results in $OUT"

# ---- node-local scratch, removed at exit whatever the reason
SCRATCH_JOB_DIR=$SCRATCH_DIR/segtrain_job${JOB_ID}
# shellcheck disable=SC2317  # called by the EXIT trap
cleanup() {
  local status=$?
  trap - EXIT TERM INT
  if [ "$NNODES" -gt 1 ]; then
    # srun may be refused while Slurm tears the job down: never let the cleanup hang.
    timeout 120 srun --nodes="$NNODES" --ntasks="$NNODES" --ntasks-per-node=1 rm -rf "$SCRATCH_JOB_DIR" || true
  fi
  rm -rf "$SCRATCH_JOB_DIR"
  log "removed scratch $SCRATCH_JOB_DIR; exit code $status"
  # Let tee write the last lines before the job's processes are reaped.
  exec >&- 2>&-
  wait "$TEE_PID" 2>/dev/null || true
  exit "$status"
}
trap cleanup EXIT
# Until the trainer runs, a stop signal just ends the job (through cleanup); see forward() below.
train_pid=""
stop_signal=""
# shellcheck disable=SC2317  # called by the TERM/INT traps
forward() {
  stop_signal=$1
  log "received SIG$1: asking the trainer to checkpoint and stop"
  if [ -z "$train_pid" ]; then
    exit 143
  elif [ "${#launcher[@]}" -gt 0 ]; then
    # A signalled srun cancels its step at once; scancel --signal reaches the tasks themselves
    # (every step of this job, not the batch shell) and lets them finish their checkpoint.
    scancel --signal="$1" "$SLURM_JOB_ID" || true
  else
    kill -s "$1" "$train_pid" 2>/dev/null || true
  fi
}
trap 'forward TERM' TERM
trap 'forward INT' INT
log "copying databases to $SCRATCH_JOB_DIR"
# The paths travel as arguments of one small script, so any characters in them are safe.
# shellcheck disable=SC2016
if [ -n "$PRETRAIN_DATABASE" ]; then
  on_each_node bash -c 'rm -rf "$1" && mkdir -p "$1" && cp -r "$2" "$1/pretrain_db"' \
    copy "$SCRATCH_JOB_DIR" "$PRETRAIN_DATABASE"
else
  on_each_node bash -c 'rm -rf "$1" && mkdir -p "$1" && cp -r "$2" "$1/train_db" && cp -r "$3" "$1/test_db"' \
    copy "$SCRATCH_JOB_DIR" "$TRAIN_DATABASE" "$TEST_DATABASE"
fi

# ---- source snapshot (once per experiment: continuations keep the code the training began with)
if [ ! -d "$OUT/source" ]; then
  mkdir -p "$OUT/source.tmp"
  cp "$CODE_DIR"/*.py "$OUT/source.tmp/"
  [ -d "$CODE_DIR/models" ] && cp -r "$CODE_DIR/models" "$OUT/source.tmp/"
  cp "$SCRIPT" "$OUT/source.tmp/launch_train_sbatch.sh"
  find "$OUT/source.tmp" -name __pycache__ -type d -prune -exec rm -rf {} +
  mv "$OUT/source.tmp" "$OUT/source"
fi

# ---- the trainer's command line
if [ -n "$PRETRAIN_DATABASE" ]; then
  args=(--database "$SCRATCH_JOB_DIR/pretrain_db")
else
  args=(--train_database "$SCRATCH_JOB_DIR/train_db" --test_database "$SCRATCH_JOB_DIR/test_db"
    --number_classes "$NUMBER_CLASSES")
fi
args+=(--output_dir "$OUT" --batch_size "$BATCH_SIZE" --tile_size "$TILE_SIZE")
[ -z "$TEST_EVERY_N_STEPS" ] || args+=(--test_every_n_steps "$TEST_EVERY_N_STEPS")
if [ "$GPUS_PER_NODE" -eq 0 ]; then args+=(--gpus none); else args+=(--gpus all); fi
# A kill between the two renames of a checkpoint save leaves it as .latest.<host>-<pid>.old (the
# trainer's find_checkpoint falls back to it; .latest.old is the name of older versions).
if [ -d "$OUT/checkpoints/latest" ] || compgen -G "$OUT/checkpoints/.latest.*old" >/dev/null; then
  log "resuming from $OUT/checkpoints/latest (train_loss.csv ends at step" \
    "$(tail -n 1 "$OUT/train_loss.csv" 2>/dev/null | cut -d, -f1))"
  args+=(--restore_checkpoint_filepath "$OUT")
fi
# The run length: a time budget, by default the job's time left (after the database copy) minus a
# margin. A resumed run keeps the plan its checkpoint holds, so it is never given one.
if [[ " ${args[*]} " != *" --restore_checkpoint_filepath "* ]] && [ "$TIME_BUDGET" != none ]; then
  if [ -z "$TIME_BUDGET" ] && [ -n "${SLURM_JOB_ID:-}" ] &&
      ! [[ " $EXTRA_TRAIN_ARGS" =~ \ --(max_steps|max_epochs|time_budget)([\ =]|$) ]]; then
    left=$(slurm_minutes "$(squeue -h -j "$SLURM_JOB_ID" -o %L 2>/dev/null || true)")
    if [ -n "$left" ] && [ "$left" -gt "$TIME_BUDGET_MARGIN" ]; then
      TIME_BUDGET=$(( left - TIME_BUDGET_MARGIN ))m
      log "time budget $TIME_BUDGET: the job's $left min left minus TIME_BUDGET_MARGIN=$TIME_BUDGET_MARGIN"
    fi
  fi
  [ -z "$TIME_BUDGET" ] || args+=(--time_budget "$TIME_BUDGET")
fi
read -r -a extra <<<"$EXTRA_TRAIN_ARGS"
args+=("${extra[@]}")

launcher=()
if [ "$NTASKS" -gt 1 ]; then
  # One trainer per task. --kill-on-bad-exit ends the step as soon as one worker fails instead of
  # leaving the others blocked in a collective. Since Slurm 22.05 srun no longer inherits
  # --cpus-per-task from the job, so pass it on.
  launcher=(srun --kill-on-bad-exit=1 --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}")
  # Several tasks on a node with GPUs: give each its own GPUs (Slurm sets CUDA_VISIBLE_DEVICES).
  if [ "$GPUS_PER_NODE" -gt 0 ] && [ "$TASKS_PER_NODE" -gt 1 ]; then
    launcher+=(--gpus-per-task=$(( GPUS_PER_NODE / TASKS_PER_NODE )))
  fi
fi

# ---- train; forward SIGTERM / SIGINT so the trainer checkpoints before it is killed
export PYTHONUNBUFFERED=1
cd "$CODE_DIR"
log "running: ${launcher[*]:+${launcher[*]} }$PYTHON $PROGRAM ${args[*]}"
"${launcher[@]}" "$PYTHON" "$PROGRAM" "${args[@]}" &
train_pid=$!
# `wait` returns early when a trapped signal arrives; keep waiting for the trainer's own status.
status=0
wait "$train_pid" || status=$?
while kill -0 "$train_pid" 2>/dev/null; do
  wait "$train_pid" || true
done
# The trainer's own status (bash keeps it): a wait cut short by a trapped signal returns 128 + that
# signal, also when the trainer ended just after it.
status=0
wait "$train_pid" || status=$?
log "trainer exited with code $status${stop_signal:+ after SIG$stop_signal}"

# ---- continuation after a time limit or preemption
if [ "$status" -eq 143 ] && [ "$REQUEUE" -eq 1 ]; then
  if [ -z "${SLURM_JOB_ID:-}" ]; then
    log "REQUEUE=1 outside Slurm: nothing to resubmit; resume with the same EXPERIMENT_NAME"
  elif [ "$RESUBMISSION" -ge "$MAX_RESUBMISSIONS" ]; then
    log "not resubmitting: MAX_RESUBMISSIONS=$MAX_RESUBMISSIONS continuations already ran"
  else
    record=$(scontrol show job -o "$SLURM_JOB_ID")
    field() { tr ' ' '\n' <<<"$record" | sed -n "s/^$1=//p" | head -n 1; }
    options=(--dependency="afterany:$SLURM_JOB_ID" --chdir="${SLURM_SUBMIT_DIR:-$PWD}"
      --job-name="$SLURM_JOB_NAME" --time="$(field TimeLimit)" --nodes="$NNODES"
      --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" --partition="$SLURM_JOB_PARTITION")
    [ -z "${SLURM_NTASKS_PER_NODE:-}" ] || options+=(--ntasks-per-node="$SLURM_NTASKS_PER_NODE")
    [ -z "${SLURM_JOB_ACCOUNT:-}" ] || options+=(--account="$SLURM_JOB_ACCOUNT")
    [ -z "${SLURM_JOB_QOS:-}" ] || options+=(--qos="$SLURM_JOB_QOS")
    # TresPerNode reads gres:gpu:4 (Slurm 22) or gres/gpu:4 (later); none when no GRES was asked.
    gres=$(field TresPerNode | sed -E 's#(^|,)gres[:/]#\1#g')
    options+=(--gres="${gres:-none}")
    # The output file goes to the same folder, named as in the header.
    output_dir=$(dirname "$(field StdOut)")
    options+=(--output="$output_dir/%x_%N.%j.out")
    # The continuation inherits this environment (--export=ALL), so it gets the resolved settings.
    export TRAIN_DATABASE TEST_DATABASE PRETRAIN_DATABASE OUTPUT_ROOT EXPERIMENT_NAME MODEL BATCH_SIZE TEST_EVERY_N_STEPS
    export NUMBER_CLASSES TILE_SIZE GPUS_PER_NODE EXTRA_TRAIN_ARGS SCRATCH_DIR REQUEUE MAX_RESUBMISSIONS
    export CODE_DIR PYTHON
    export RESUBMISSION=$(( RESUBMISSION + 1 ))
    if next=$(sbatch --parsable --export=ALL "${options[@]}" "$SCRIPT"); then
      log "resubmitted as job ${next%%;*} (continuation $RESUBMISSION), resuming from $OUT"
    else
      log "resubmission failed: resume by hand with EXPERIMENT_NAME=$EXPERIMENT_NAME"
    fi
  fi
fi
exit "$status"
