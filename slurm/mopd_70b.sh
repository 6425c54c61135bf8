#!/usr/bin/env bash
#SBATCH --job-name=mopd-70b
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --time=48:00:00
#SBATCH --exclusive
#SBATCH --output=%x-%j.out
#SBATCH --requeue
#SBATCH --signal=B:USR1@900
# MOPD with a 70B student (recipes/mopd_70b.yaml; 8 nodes x 8 GPUs chosen by `mopd plan`).
#
#   sbatch slurm/mopd_70b.sh                            # submit from the repository root
#   MOPD_OVERRIDES="train.steps=10" sbatch slurm/mopd_70b.sh
#   bash slurm/mopd_70b.sh --dry-run                    # print nodes, ranks, layout, engines,
#                                                       # memory plan; launch nothing
# Another recipe/size: MOPD_RECIPE=... sbatch --nodes=N slurm/mopd_70b.sh
# Preemption and the time limit: SIGTERM, or SIGUSR1 15 min before the limit (--signal), makes
# the trainer save after its current step and exit 75; the launcher then requeues the job
# (--requeue) and the recipe's checkpoint.resume: auto continues it.
# All knobs (MOPD_*): bash slurm/launch.sh --help.
set -euo pipefail
export MOPD_RECIPE=${MOPD_RECIPE:-recipes/mopd_70b.yaml}
# Under sbatch this file runs from Slurm's spool; the repository is where sbatch was called.
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=${MOPD_REPO:-${SLURM_SUBMIT_DIR:-$HERE/..}}
export MOPD_REPO=$REPO MOPD_BATCH_SCRIPT=${MOPD_BATCH_SCRIPT:-$HERE/$(basename "${BASH_SOURCE[0]}")}
exec bash "$REPO/slurm/launch.sh" "$@"
