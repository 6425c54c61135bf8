#!/usr/bin/env bash
# Stop the local cluster started by start.sh: cancel its jobs, shut the Slurm daemons down and
# stop munged, each by its own pid file (never by process name: other work shares the machine).
# Env: SLURM_LOCAL_DIR as for start.sh.
set -uo pipefail
[[ ${1:-} == -h || ${1:-} == --help ]] && { sed -n '2,4p' "$0"; exit 0; }
BASE=${SLURM_LOCAL_DIR:-/tmp/mopd-slurm-local}
export PATH=$PATH:/usr/sbin

if scontrol ping 2>/dev/null | grep -q 'is UP'; then
  scancel --state=PENDING,RUNNING 2>/dev/null || true
  scontrol shutdown 2>/dev/null || true      # slurmctld stops itself and every slurmd
fi

stop_pid() {   # $1 pid file: wait for a graceful exit, then TERM, then KILL
  local f=$1 pid
  [[ -s $f ]] || return 0
  pid=$(cat "$f")
  for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null
    for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null
  fi
  rm -f "$f"
}
stop_pid "$BASE/slurmd.pid"
stop_pid "$BASE/slurmctld.pid"
if [[ -e $BASE/munged.ours && -s /run/munge/munged.pid ]]; then
  rm -f "$BASE/munged.ours"
  pid=$(cat /run/munge/munged.pid)
  kill -TERM "$pid" 2>/dev/null
  for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
fi
echo "[slurm_local] stopped" >&2
