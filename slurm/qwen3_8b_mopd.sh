#!/usr/bin/env bash
#SBATCH --job-name=mopd-qwen3-8b
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --time=24:00:00
#SBATCH --exclusive
#SBATCH --output=%x-%j.out
#SBATCH --requeue
#SBATCH --signal=B:USR1@900
# MOPD with a Qwen3-8B student on one 8-GPU node (recipes/qwen3_8b_mopd.yaml).
#
#   sbatch slurm/qwen3_8b_mopd.sh                         # submit from the repository root
#   MOPD_OVERRIDES="train.steps=10" sbatch slurm/qwen3_8b_mopd.sh
#   bash slurm/qwen3_8b_mopd.sh --dry-run                 # print nodes, ranks, layout, engines,
#                                                       # memory plan; launch nothing
# Another recipe/size: MOPD_RECIPE=... sbatch --nodes=N slurm/qwen3_8b_mopd.sh
# Preemption and the time limit: SIGTERM, or SIGUSR1 15 min before the limit (--signal), makes
# the trainer save after its current step and exit 75; the launcher then requeues the job
# (--requeue) and the recipe's checkpoint.resume: auto continues it.
# All knobs (MOPD_*): bash slurm/launch.sh --help.
set -euo pipefail
export MOPD_RECIPE=${MOPD_RECIPE:-recipes/qwen3_8b_mopd.yaml}
# Under sbatch this file runs from Slurm's spool; the repository is where sbatch was called.
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=${MOPD_REPO:-${SLURM_SUBMIT_DIR:-$HERE/..}}
export MOPD_REPO=$REPO MOPD_BATCH_SCRIPT=${MOPD_BATCH_SCRIPT:-$HERE/$(basename "${BASH_SOURCE[0]}")}
exec bash "$REPO/slurm/launch.sh" "$@"
