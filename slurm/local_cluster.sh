#!/bin/bash
# A real one-node Slurm cluster on loopback, private to one directory: for the tests, and for
# trying `nemo-btx launch` on a machine without a cluster. Needs root (apt-get, slurmd).
#
#   slurm/local_cluster.sh start          install slurm-wlm + munge if missing; start munged,
#                                         slurmctld and slurmd; wait until the node is idle
#                                         (BTX_SLURM_INSTALL=0: never install, fail if missing;
#                                         the tests start it so: `make test` installs them)
#   slurm/local_cluster.sh status         the daemons, sinfo and squeue
#   slurm/local_cluster.sh stop           cancel its jobs, stop the daemons by their pid files
#   eval "$(slurm/local_cluster.sh env)"  point sbatch/squeue/scancel at it (SLURM_CONF)
#
# Everything lives in $BTX_SLURM_DIR (default /tmp/nemo-btx-slurm): slurm.conf, the munge key
# and socket, state, spool, logs and pid files; nothing system-wide is read or written (munged
# gets its own socket, named in slurm.conf as AuthInfo). Ports: $BTX_SLURM_PORT (slurmctld,
# default 16817) and the next one (slurmd). The node has the machine's CPUs and no GPU, so jobs
# with --cpus-per-task=1 run side by side, one per core. Accounting (sacct) is off: read job
# states from squeue/scontrol, or from files the jobs write.
set -euo pipefail

DIR=${BTX_SLURM_DIR:-/tmp/nemo-btx-slurm}
INSTALL=${BTX_SLURM_INSTALL:-1}
PORT=${BTX_SLURM_PORT:-16817}
CONF=$DIR/slurm.conf
HOST=$(hostname -s)
export SLURM_CONF=$CONF

say() { echo "local_cluster: $*" >&2; }

install() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null; then
    return
  fi
  if [ "$INSTALL" = 0 ]; then
    say "slurm-wlm and munge are not installed (BTX_SLURM_INSTALL=0: not installing them; 'make system-packages' does, as root)"
    exit 1
  fi
  if [ "$(id -u)" != 0 ]; then
    say "slurm-wlm and munge are not installed; installing them needs root (apt-get)"
    exit 1
  fi
  say "installing slurm-wlm and munge with apt-get"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
}

write_config() {
  mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log" "$DIR/munge"
  chmod 700 "$DIR/munge"
  if [ ! -s "$DIR/munge/munge.key" ]; then
    dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
    chmod 400 "$DIR/munge/munge.key"
  fi
  local ncpu mem
  ncpu=$(cpus)
  mem=$(awk '/MemTotal/ {print int($2 / 1024 * 0.8)}' /proc/meminfo)
  cat > "$CONF" <<EOF
# Written by slurm/local_cluster.sh: a one-node cluster on loopback, all state in $DIR.
ClusterName=btxlocal
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire also delays a requeued job's restart (default 120 s).
AuthInfo=socket=$DIR/munge/munge.socket,cred_expire=20
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
# No systemd or cgroups in a container: track processes by parent, no CPU binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=1
ReturnToService=2
MpiDefault=none
SwitchType=switch/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MailProg=/bin/true
InactiveLimit=0
KillWait=10
MinJobAge=600
SlurmctldTimeout=30
SlurmdTimeout=30
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$ncpu RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
}

# Online CPUs (not `nproc`: it honours OMP_NUM_THREADS).
cpus() { getconf _NPROCESSORS_ONLN; }

pid_of() {  # the pid in a pid file, if that process is alive
  local file=$1 pid
  [ -s "$file" ] || return 1
  pid=$(cat "$file")
  kill -0 "$pid" 2>/dev/null || return 1
  echo "$pid"
}

running() { pid_of "$DIR/slurmctld.pid" >/dev/null && pid_of "$DIR/slurmd.pid" >/dev/null; }

start() {
  install
  if running; then
    say "already running ($DIR)"
  else
    write_config
    if ! pid_of "$DIR/munge/munged.pid" >/dev/null; then
      munged --force --socket="$DIR/munge/munge.socket" --key-file="$DIR/munge/munge.key" \
        --pid-file="$DIR/munge/munged.pid" --log-file="$DIR/munge/munged.log" \
        --seed-file="$DIR/munge/munged.seed"
    fi
    munge --socket="$DIR/munge/munge.socket" -n | unmunge --socket="$DIR/munge/munge.socket" >/dev/null \
      || { say "munge does not work; see $DIR/munge/munged.log"; exit 1; }
    slurmctld -i -f "$CONF"
    slurmd -f "$CONF"
  fi
  local state=""
  for _ in $(seq 1 60); do
    state=$(sinfo -h -o %t 2>/dev/null || true)
    case "$state" in idle*|mix*|alloc*) break ;; esac
    sleep 0.5
  done
  case "$state" in
    idle*|mix*|alloc*) say "up: node $HOST ($(cpus) CPUs) in partition debug; export SLURM_CONF=$CONF" ;;
    *) say "the node did not come up (state '${state:-none}'); logs in $DIR/log"; exit 1 ;;
  esac
}

stop() {
  if pid_of "$DIR/slurmctld.pid" >/dev/null; then
    local jobs
    jobs=$(squeue -h -o %A 2>/dev/null | sort -u || true)
    if [ -n "$jobs" ]; then
      # shellcheck disable=SC2086
      scancel $jobs 2>/dev/null || true
      for _ in $(seq 1 30); do
        [ -z "$(squeue -h -o %A 2>/dev/null)" ] && break
        sleep 0.5
      done
    fi
  fi
  local file pid
  for file in "$DIR/slurmd.pid" "$DIR/slurmctld.pid" "$DIR/munge/munged.pid"; do
    pid=$(pid_of "$file") || { rm -f "$file"; continue; }
    kill "$pid"
    for _ in $(seq 1 40); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.25
    done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
    rm -f "$file"
  done
  say "stopped ($DIR)"
}

status() {
  local name file pid
  for name in slurmctld slurmd munged; do
    file=$DIR/$name.pid
    [ "$name" = munged ] && file=$DIR/munge/munged.pid
    if pid=$(pid_of "$file"); then echo "$name: running (pid $pid)"; else echo "$name: stopped"; fi
  done
  if running; then
    sinfo
    squeue
  fi
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  *) echo "usage: $0 start|stop|status|env   (state in \$BTX_SLURM_DIR, default /tmp/nemo-btx-slurm)" >&2; exit 2 ;;
esac
