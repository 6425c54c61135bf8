#!/usr/bin/env bash
# Start a one-node Slurm cluster on this machine: munged, slurmctld and slurmd on localhost.
# Runs as root without systemd (CI containers, dev VMs). Idempotent: a second call with the
# daemons already up only re-checks them. Installs the Debian packages when they are missing.
#
#   tests/harness/slurm_local/start.sh            # state under $SLURM_LOCAL_DIR (default below)
#   tests/harness/slurm_local/stop.sh             # stops exactly what start.sh started
#
# Env: SLURM_LOCAL_DIR (state, logs, pid files; default /tmp/mopd-slurm-local),
#      SLURM_LOCAL_CPUS (CPUs the node advertises; default: the real count, at least 2),
#      SLURM_LOCAL_FORCE=1 (replace an /etc/slurm/slurm.conf this script did not write).
set -euo pipefail
[[ ${1:-} == -h || ${1:-} == --help ]] && { sed -n '2,11p' "$0"; exit 0; }
[[ $(id -u) == 0 ]] || { echo "start.sh: must run as root (it starts munged and slurmd)" >&2; exit 1; }

BASE=${SLURM_LOCAL_DIR:-/tmp/mopd-slurm-local}
NODE=$(hostname -s)
t0=$(date +%s)
log() { echo "[slurm_local] $*" >&2; }

# 1. Packages. Debian 12 ships Slurm 22.05; munge's postinst creates the key. The packages'
#    init scripts fail to start daemons without an init system; that is expected and harmless.
need=()
for bin in slurmctld:slurmctld slurmd:slurmd sbatch:slurm-client munged:munge; do
  command -v "${bin%%:*}" >/dev/null 2>&1 || [[ -x /usr/sbin/${bin%%:*} ]] || need+=("${bin##*:}")
done
if (( ${#need[@]} )); then
  log "installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null
  apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null
fi
export PATH=$PATH:/usr/sbin

# Never clobber a real cluster's config (checked before anything is started).
MARK="# written by mopd-megatron tests/harness/slurm_local/start.sh"
if [[ -s /etc/slurm/slurm.conf ]] && ! grep -qF "$MARK" /etc/slurm/slurm.conf \
   && [[ ${SLURM_LOCAL_FORCE:-0} != 1 ]]; then
  echo "refusing to overwrite /etc/slurm/slurm.conf written by someone else (a real cluster" \
       "config?); set SLURM_LOCAL_FORCE=1 to replace it" >&2
  exit 1
fi
# 2. slurmd finds itself by name: the short hostname must resolve.
getent hosts "$NODE" >/dev/null || echo "127.0.0.1 $NODE" >> /etc/hosts

# 3. munge (authentication between the Slurm daemons and clients), run as the munge user.
munge_ok() { munge -n 2>/dev/null | unmunge 2>/dev/null | grep -q 'STATUS: *Success'; }
if ! munge_ok; then
  [[ -s /etc/munge/munge.key ]] || mungekey --create --keyfile=/etc/munge/munge.key
  chown munge:munge /etc/munge/munge.key; chmod 0400 /etc/munge/munge.key
  install -d -o munge -g munge -m 0755 /run/munge
  install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge
  runuser -u munge -- munged
  mkdir -p "$BASE"; : > "$BASE/munged.ours"   # stop.sh stops munged only when we started it
  for _ in $(seq 100); do munge_ok && break; sleep 0.1; done
  munge_ok || { echo "munged did not come up" >&2; exit 1; }
fi

# 4. slurm.conf: no cgroups, no accounting database, daemons and jobs as root.
mkdir -p "$BASE"/{ctld,spool,log} /etc/slurm
ctld_up() { scontrol ping 2>/dev/null | grep -q 'is UP'; }
node_state() { sinfo -h -n "$NODE" -o %t 2>/dev/null | head -n1; }
if ctld_up && [[ $(node_state) == idle || $(node_state) == mix || $(node_state) == alloc ]]; then
  log "already up ($(node_state))"; exit 0
fi
real_cpus=$(nproc)
cpus=${SLURM_LOCAL_CPUS:-$(( real_cpus < 2 ? 2 : real_cpus ))}
mem_mb=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
# config_overrides lets slurmd advertise the CPUs= given here even when it differs from the
# hardware (a 2-task job on a 1-core runner would otherwise pend forever).
cat > /etc/slurm/slurm.conf <<CONF
$MARK
ClusterName=mopdlocal
SlurmctldHost=$NODE
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$BASE/ctld
SlurmdSpoolDir=$BASE/spool
SlurmctldPidFile=$BASE/slurmctld.pid
SlurmdPidFile=$BASE/slurmd.pid
SlurmctldLogFile=$BASE/log/slurmctld.log
SlurmdLogFile=$BASE/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SlurmdParameters=config_overrides
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
MinJobAge=300
MailProg=/bin/true
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
CONF

# 5. Daemons (each forks into the background and writes its pid file under $BASE).
if ! ctld_up; then
  slurmctld -c          # -c: clean start, ignore state saved by an earlier run
  for _ in $(seq 150); do ctld_up && break; sleep 0.1; done
  ctld_up || { echo "slurmctld did not answer"; tail -20 "$BASE/log/slurmctld.log"; exit 1; } >&2
fi
[[ -s $BASE/slurmd.pid ]] && kill -0 "$(cat "$BASE/slurmd.pid")" 2>/dev/null || slurmd
for _ in $(seq 300); do [[ $(node_state) == idle ]] && break; sleep 0.1; done
if [[ $(node_state) != idle ]]; then
  echo "node $NODE is '$(node_state)', not idle" >&2; tail -20 "$BASE"/log/*.log >&2; exit 1
fi
log "up in $(( $(date +%s) - t0 ))s: node $NODE, $cpus CPUs, state in $BASE"
