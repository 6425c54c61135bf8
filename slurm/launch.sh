#!/usr/bin/env bash
# Shared MOPD launcher for Slurm batch scripts (slurm/mopd_70b.sh, slurm/qwen3_8b_mopd.sh).
# Runs inside the batch step: resolves the recipe onto the allocation, then starts one srun
# step of training ranks over the training nodes (+ one step of SGLang servers on dedicated
# engine nodes when the recipe asks for them), waits, and stops exactly what it started.
#
#   usage: launch.sh [--dry-run]        (normally exec'd by a batch script; see below)
#
# Environment (all optional except where noted):
#   MOPD_RECIPE          recipe YAML, relative to the repository (set by the batch script)
#   MOPD_OVERRIDES       whitespace-separated a.b=c overrides (no spaces inside a value:
#                        write lists as [a,b])
#   MOPD_REPO            repository root (default: $SLURM_SUBMIT_DIR, else this file's parent)
#   MOPD_PYTHON          interpreter of the ranks (default: python on PATH)
#   MOPD_GPUS_PER_NODE   GPUs per node; 0 runs ranks on CPUs (default: the allocation's GPUs,
#                        else the batch script's #SBATCH --gpus-per-node)
#   MOPD_TASKS_PER_NODE  ranks per node of a CPU run (default: $SLURM_NTASKS_PER_NODE)
#   MOPD_NODES           nodes for --dry-run outside an allocation (default: #SBATCH --nodes)
#   MOPD_GPU_MEM_GB      memory of one GPU for the planner, GiB (default 80)
#   MOPD_MASTER_PORT     rendezvous port (default 20000 + job id % 20000)
#   MOPD_LOG_DIR         per-node logs (default: $MOPD_REPO/logs/slurm/<job id>)
#   MOPD_RANK_CMD        replaces the trainer command (bash -c string run by every rank;
#                        tests/test_slurm.py's rank-check job uses it; default: mopd train)
#   MOPD_BATCH_SCRIPT    the batch script whose #SBATCH header gives dry-run defaults
#
# Signals: TERM or USR1 to this script are forwarded to the training step, whose ranks save
# after their current step and exit 75; on 75 the script runs `scontrol requeue` (the batch
# scripts set --requeue and --signal=B:USR1@900) and the requeued job resumes.
set -euo pipefail

die() { echo "launch.sh: $*" >&2; exit 2; }
DRY=0
for a in "$@"; do
  case $a in
    --dry-run) DRY=1 ;;
    -h|--help) awk 'NR > 1 && !/^#/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "${BASH_SOURCE[0]}"
               exit 0 ;;
    *) die "unknown argument '$a' (only --dry-run)" ;;
  esac
done

REPO=${MOPD_REPO:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}}
cd "$REPO" || die "cannot cd to MOPD_REPO=$REPO"
[[ -d mopd_megatron ]] || die "$REPO is not the mopd-megatron repository (set MOPD_REPO)"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"   # ranks run this checkout's code
PY=${MOPD_PYTHON:-python}
RECIPE=${MOPD_RECIPE:?set MOPD_RECIPE to a recipe YAML}
read -r -a OVERRIDES <<< "${MOPD_OVERRIDES:-}"
SET_ARGS=()
for o in "${OVERRIDES[@]}"; do SET_ARGS+=(--set "$o"); done

# --- resources: the allocation when inside one, else the batch script's header ---------------
HEADER=${MOPD_BATCH_SCRIPT:-}
header() { [[ -n $HEADER && -r $HEADER ]] && grep -oP "^#SBATCH --$1=\K\S+" "$HEADER" | head -n1; }
gpus_of() { local v=${1:-}; v=${v##*:}; echo "${v:-}"; }   # "h100:8" -> 8
NODES=${SLURM_JOB_NUM_NODES:-${MOPD_NODES:-$(header nodes || true)}}
NODES=${NODES:-1}
GPN=${MOPD_GPUS_PER_NODE:-$(gpus_of "${SLURM_GPUS_PER_NODE:-}")}
GPN=${GPN:-$(header gpus-per-node || true)}
GPN=${GPN:-0}
TPN=${MOPD_TASKS_PER_NODE:-${SLURM_NTASKS_PER_NODE:-$(header ntasks-per-node || true)}}
TPN=${TPN%%(*}                                   # Slurm may write "2(x3)"
TPN=${TPN:-1}
if [[ -n ${SLURM_JOB_NODELIST:-} ]]; then
  HOSTS=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | paste -sd, -)
else
  HOSTS=""
  [[ $DRY == 1 ]] || die "not inside a Slurm allocation (submit with sbatch, or use --dry-run)"
fi

RESOLVE=("$PY" -m mopd_megatron.launch.slurm --recipe "$RECIPE" "${SET_ARGS[@]}" --nodes "$NODES"
         --gpus-per-node "$GPN" --tasks-per-node "$TPN" --hosts "$HOSTS"
         --gpu-mem-gb "${MOPD_GPU_MEM_GB:-80}" --python "$PY")
if [[ $DRY == 1 ]]; then
  exec "${RESOLVE[@]}" --dry-run
fi
RESOLVED=$("${RESOLVE[@]}" --emit-shell) || exit $?
eval "$RESOLVED"

export MASTER_ADDR=${MOPD_TRAIN_HOSTS%%,*}
export MASTER_PORT=${MOPD_MASTER_PORT:-$(( 20000 + SLURM_JOB_ID % 20000 ))}
LOG_DIR=${MOPD_LOG_DIR:-$REPO/logs/slurm/$SLURM_JOB_ID}
mkdir -p "$LOG_DIR"
echo "[launch] job $SLURM_JOB_ID: $MOPD_WORLD_SIZE ranks on $MOPD_TRAIN_NNODES node(s)" \
     "[$MOPD_TRAIN_HOSTS] x $MOPD_RANKS_PER_NODE, $MOPD_LAYOUT, master $MASTER_ADDR:$MASTER_PORT," \
     "logs $LOG_DIR"

if [[ -n ${MOPD_RANK_CMD:-} ]]; then
  RANK_CMD=(bash -c "$MOPD_RANK_CMD")
else
  # USR1 ignored until the trainer installs its handler (its default action kills): a USR1
  # that arrives while a rank is still starting is lost, not fatal.
  RANK_CMD=(bash -c 'trap "" USR1; exec "$@"' mopd-rank
            "$PY" -m mopd_megatron.cli train --recipe "$RECIPE" "${SET_ARGS[@]}")
  for o in $MOPD_ENGINE_OVERRIDES; do RANK_CMD+=(--set "$o"); done
fi
GPU_ARGS=()
(( GPN > 0 )) && GPU_ARGS=(--gpus-per-node="$GPN")   # CPU nodes reject any GPU request

# --- start, wait, stop: every step runs in its own process group (set -m) -------------------
set -m
STEPS=()
stop_steps() {
  local pg
  for pg in "${STEPS[@]}"; do kill -TERM -- "-$pg" 2>/dev/null || true; done   # srun forwards
  for _ in $(seq 50); do
    local alive=0
    for pg in "${STEPS[@]}"; do kill -0 -- "-$pg" 2>/dev/null && alive=1; done
    (( alive )) || break
    sleep 0.2
  done
  for pg in "${STEPS[@]}"; do kill -KILL -- "-$pg" 2>/dev/null || true; done
  STEPS=()
}
# SIGTERM (scancel, preemption) or SIGUSR1 (#SBATCH --signal=B:USR1@<s> before the time
# limit) on this script: ask the training step to save and stop (trainer/preemption.py), and
# wait for it; Slurm's own KillWait bounds the wait. Before the step runs: stop at once.
TRAIN=""
on_signal() {
  if [[ -z $TRAIN ]]; then
    echo "[launch] signal $1: stopping steps" >&2; stop_steps; exit 143
  fi
  echo "[launch] signal $1: asking the training step to save and stop" >&2
  kill -"$1" -- "-$TRAIN" 2>/dev/null || true   # srun forwards it to every rank
}
trap 'on_signal TERM' TERM
trap 'on_signal INT' INT
trap 'on_signal USR1' USR1
trap 'stop_steps' EXIT

if (( MOPD_ENGINE_NNODES > 0 )); then
  srun --nodes="$MOPD_ENGINE_NNODES" --nodelist="$MOPD_ENGINE_HOSTS" \
       --ntasks-per-node="$MOPD_ENGINES_PER_NODE" "${GPU_ARGS[@]}" \
       --output="$LOG_DIR/engine-%N.log" --label bash -c "$MOPD_ENGINE_CMD" &
  STEPS+=($!)
fi
srun --nodes="$MOPD_TRAIN_NNODES" --nodelist="$MOPD_TRAIN_HOSTS" \
     --ntasks-per-node="$MOPD_RANKS_PER_NODE" --ntasks="$MOPD_WORLD_SIZE" "${GPU_ARGS[@]}" \
     --kill-on-bad-exit=1 --output="$LOG_DIR/train-%N.log" --label "${RANK_CMD[@]}" &
TRAIN=$!
STEPS+=("$TRAIN")
rc=0
while :; do   # a trapped signal interrupts wait; the step may still be saving
  wait "$TRAIN" && rc=0 || rc=$?
  kill -0 "$TRAIN" 2>/dev/null || break
done
echo "[launch] training step exited with $rc" >&2
if (( rc == 75 )); then
  # The trainer saved a committed checkpoint after a signal (exit 75 = requeue me). Requeue
  # ends this job now and runs the batch script again (with #SBATCH --requeue, or where the
  # cluster allows requeue by default); checkpoint.resume: auto continues from the checkpoint.
  stop_steps
  echo "[launch] requeueing job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0})" >&2
  scontrol requeue "$SLURM_JOB_ID" || echo "[launch] requeue refused: resubmit the job;" \
    "it resumes from the last checkpoint" >&2
fi
exit "$rc"
