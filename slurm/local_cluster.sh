#!/bin/bash
# A real Slurm cluster on this machine, private to one directory: for the tests, and for trying
# `nemo-btx launch` on a machine without a cluster. Needs root (apt-get, slurmd, namespaces).
#
#   slurm/local_cluster.sh start          install slurm-wlm + munge if missing; start munged,
#                                         slurmctld and slurmd; wait until the node is idle
#                                         (BTX_SLURM_INSTALL=0: never install, fail if missing;
#                                         the tests start it so: `make test` installs them)
#   slurm/local_cluster.sh start --nodes N
#                                         N compute nodes btxn1..btxnN, each a separate network
#                                         host: its slurmd (and so every job process on it) runs
#                                         in its own network namespace (address SUBNET.1X on a
#                                         private bridge; the controller is SUBNET.1), UTS
#                                         namespace (hostname btxnX) and mount namespace (a
#                                         private /etc/hosts naming the nodes), so `srun
#                                         --nodes=N` starts one task per host and torchrun's
#                                         rendezvous and gloo cross a real (veth) interface
#   slurm/local_cluster.sh status         the daemons, sinfo and squeue
#   slurm/local_cluster.sh stop           cancel its jobs, stop the daemons by their pid files,
#                                         kill what is left in the nodes' namespaces, delete the
#                                         namespaces, veth pairs and bridge it created
#   slurm/local_cluster.sh kill-node X    (N > 1) a node failure: SIGKILL every process in node
#                                         X's namespace (its slurmd, slurmstepds, job processes)
#   slurm/local_cluster.sh start-node X   start node X's slurmd again; wait until it is back
#   eval "$(slurm/local_cluster.sh env)"  point sbatch/squeue/scancel at it (SLURM_CONF)
#
# Everything lives in $BTX_SLURM_DIR (default /tmp/nemo-btx-slurm): slurm.conf, the munge key
# and socket, state, spool, logs and pid files; nothing system-wide is read or written (munged
# gets its own socket, named in slurm.conf as AuthInfo; a unix socket is a file, so slurmd in
# another network namespace reaches it too). Ports: $BTX_SLURM_PORT (slurmctld, default 16817)
# and the next one (slurmd). Each node has the machine's CPUs and no GPU, so jobs with
# --cpus-per-task=1 run side by side, one per core; with N nodes every node has all of them
# (the nodes share the machine's cores: N x oversubscribed). Accounting (sacct) is off: read
# job states from squeue/scontrol, or from files the jobs write.
#
# N > 1 creates, and `stop` deletes: a bridge btx<PORT>b with address SUBNET.1/24 (SUBNET:
# $BTX_SLURM_SUBNET, three octets, default 10.213.<PORT % 256>), and per node X a network
# namespace btx<PORT>nX joined to the bridge by a veth pair (btx<PORT>hX on this side). No
# address outside SUBNET is used and nothing outside this machine is contacted; the machine's
# /etc/hosts is untouched. The file system is shared by all nodes, as a cluster's is.
set -euo pipefail

DIR=${BTX_SLURM_DIR:-/tmp/nemo-btx-slurm}
INSTALL=${BTX_SLURM_INSTALL:-1}
PORT=${BTX_SLURM_PORT:-16817}
CONF=$DIR/slurm.conf
HOST=$(hostname -s)
export SLURM_CONF=$CONF
TAG=btx$PORT
SUBNET=${BTX_SLURM_SUBNET:-10.213.$((PORT % 256))}

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

write_config() {  # write_config NODES
  local n=$1 ncpu mem ctl=127.0.0.1 what="a one-node cluster on loopback" i
  mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log" "$DIR/munge"
  chmod 700 "$DIR/munge"
  if [ ! -s "$DIR/munge/munge.key" ]; then
    dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
    chmod 400 "$DIR/munge/munge.key"
  fi
  ncpu=$(cpus)
  mem=$(awk -v n="$n" '/MemTotal/ {print int($2 / 1024 * 0.8 / n)}' /proc/meminfo)
  if [ "$n" -gt 1 ]; then
    ctl=$SUBNET.1
    what="$n nodes, each in its own network namespace on bridge ${TAG}b ($SUBNET.0/24)"
  fi
  cat > "$CONF" <<EOF
# Written by slurm/local_cluster.sh: $what, all state in $DIR.
ClusterName=btxlocal
SlurmctldHost=$HOST($ctl)
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire also delays a requeued job's restart (default 120 s).
AuthInfo=socket=$DIR/munge/munge.socket,cred_expire=20
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.%n.log
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
# A node whose slurmd stops answering is DOWN after this long (its jobs end NODE_FAIL, and
# Slurm requeues those submitted with --requeue).
SlurmdTimeout=15
EOF
  if [ "$n" = 1 ]; then
    echo "NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$ncpu RealMemory=$mem State=UNKNOWN" >> "$CONF"
    echo "PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP" >> "$CONF"
  else
    for i in $(seq 1 "$n"); do
      echo "NodeName=btxn$i NodeAddr=$SUBNET.$((10 + i)) NodeHostname=btxn$i CPUs=$ncpu RealMemory=$mem State=UNKNOWN" >> "$CONF"
    done
    echo "PartitionName=debug Nodes=btxn[1-$n] Default=YES MaxTime=INFINITE State=UP" >> "$CONF"
  fi
  echo "$n" > "$DIR/nodes"
}

# Online CPUs (not `nproc`: it honours OMP_NUM_THREADS).
cpus() { getconf _NPROCESSORS_ONLN; }

num_nodes() { cat "$DIR/nodes" 2>/dev/null || echo 1; }

node_names() {
  local n
  n=$(num_nodes)
  if [ "$n" = 1 ]; then echo "$HOST"; else seq -f 'btxn%g' 1 "$n"; fi
}

pid_of() {  # the pid in a pid file, if that process is alive
  local file=$1 pid
  [ -s "$file" ] || return 1
  pid=$(cat "$file")
  kill -0 "$pid" 2>/dev/null || return 1
  echo "$pid"
}

running() {
  local name
  pid_of "$DIR/slurmctld.pid" >/dev/null || return 1
  for name in $(node_names); do pid_of "$DIR/slurmd.$name.pid" >/dev/null || return 1; done
}

# ---- N > 1: the nodes' network. Every name carries $TAG, so `stop` deletes exactly these.
network_up() {
  local n=$1 i ns
  if ip -o addr show | grep -q " $SUBNET\.[0-9]*/"; then
    say "$SUBNET.0/24 is in use on this machine; choose another with BTX_SLURM_SUBNET"
    exit 1
  fi
  ip link add "${TAG}b" type bridge
  ip addr add "$SUBNET.1/24" dev "${TAG}b"
  ip link set "${TAG}b" up
  { echo "127.0.0.1 localhost"; echo "$SUBNET.1 $HOST"
    for i in $(seq 1 "$n"); do echo "$SUBNET.$((10 + i)) btxn$i"; done; } > "$DIR/hosts"
  for i in $(seq 1 "$n"); do
    ns=${TAG}n$i
    ip netns add "$ns"
    ip link add "${TAG}h$i" type veth peer name "${TAG}v$i"
    ip link set "${TAG}h$i" master "${TAG}b"
    ip link set "${TAG}h$i" up
    ip link set "${TAG}v$i" netns "$ns"
    ip -n "$ns" addr add "$SUBNET.$((10 + i))/24" dev "${TAG}v$i"
    ip -n "$ns" link set "${TAG}v$i" up
    ip -n "$ns" link set lo up
  done
}

network_down() {
  command -v ip >/dev/null || return 0
  local ns pids link
  for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep -E "^${TAG}n[0-9]+$" || true); do
    pids=$(ip netns pids "$ns" 2>/dev/null || true)
    # shellcheck disable=SC2086
    if [ -n "$pids" ]; then kill -9 $pids 2>/dev/null || true; fi
    ip netns del "$ns" 2>/dev/null || true  # takes its end of the veth pair with it
  done
  for link in $(ip -o link show 2>/dev/null | awk -F': ' '{print $2}' | cut -d@ -f1 | grep -E "^${TAG}(b|h[0-9]+)$" || true); do
    ip link del "$link" 2>/dev/null || true
  done
  rm -f "$DIR/hosts"
}

start_slurmd() {  # start_slurmd NODE_NAME
  local name=$1
  mkdir -p "$DIR/spool/$name"
  if [ "$(num_nodes)" = 1 ]; then
    slurmd -f "$CONF" -N "$name"
  else
    # Its own host: network namespace (its address on the bridge), hostname, and an /etc/hosts
    # (bound over the machine's in a private mount namespace) that resolves every node's name.
    # nsenter, not `ip netns exec`: that remounts /sys, hiding the cgroup file system slurmd reads.
    nsenter --net="/run/netns/${TAG}n${name#btxn}" unshare --mount --uts --propagation private \
      sh -c 'mount --bind "$1" /etc/hosts && hostname "$2" && exec slurmd -f "$3" -N "$2"' \
      sh "$DIR/hosts" "$name" "$CONF"
  fi || { say "slurmd of node $name did not start; see $DIR/log/slurmd.$name.log"; exit 1; }
}

wait_nodes_up() {  # wait until every node named is idle, mixed or allocated
  local name state
  for name in "$@"; do
    state=""
    for _ in $(seq 1 60); do
      state=$(sinfo -h -N -n "$name" -o %t 2>/dev/null | head -n 1 || true)
      case "$state" in idle*|mix*|alloc*) break ;; esac
      sleep 0.5
    done
    case "$state" in
      idle*|mix*|alloc*) ;;
      *) say "node $name did not come up (state '${state:-none}'); logs in $DIR/log"; return 1 ;;
    esac
  done
}

start() {
  local n=1 name b
  while [ $# -gt 0 ]; do
    case "$1" in
      --nodes) n=${2:-}; shift 2 || shift ;;
      --nodes=*) n=${1#--nodes=}; shift ;;
      *) say "start: unknown option $1"; exit 2 ;;
    esac
  done
  case "$n" in ''|*[!0-9]*|0) say "--nodes must be a number from 1 to 9"; exit 2 ;; esac
  [ "$n" -le 9 ] || { say "--nodes must be a number from 1 to 9"; exit 2; }
  install
  if running; then
    [ "$(num_nodes)" = "$n" ] || { say "already running with $(num_nodes) node(s) ($DIR): stop it first"; exit 1; }
    say "already running ($DIR)"
  else
    if [ "$n" -gt 1 ]; then
      for b in ip unshare nsenter; do
        command -v "$b" >/dev/null || { say "--nodes $n needs '$b' (iproute2, util-linux)"; exit 1; }
      done
      [ "$(id -u)" = 0 ] || { say "--nodes $n needs root (network namespaces)"; exit 1; }
    fi
    mkdir -p "$DIR"
    network_down  # whatever a killed earlier cluster of this port left
    write_config "$n"
    if [ "$n" -gt 1 ]; then network_up "$n"; fi
    if ! pid_of "$DIR/munge/munged.pid" >/dev/null; then
      munged --force --socket="$DIR/munge/munge.socket" --key-file="$DIR/munge/munge.key" \
        --pid-file="$DIR/munge/munged.pid" --log-file="$DIR/munge/munged.log" \
        --seed-file="$DIR/munge/munged.seed"
    fi
    munge --socket="$DIR/munge/munge.socket" -n | unmunge --socket="$DIR/munge/munge.socket" >/dev/null \
      || { say "munge does not work; see $DIR/munge/munged.log"; exit 1; }
    slurmctld -i -f "$CONF"
    for name in $(node_names); do start_slurmd "$name"; done
  fi
  # shellcheck disable=SC2046
  wait_nodes_up $(node_names) || exit 1
  say "up: $(num_nodes) node(s) ($(node_names | paste -sd' '), $(cpus) CPUs each) in partition debug; export SLURM_CONF=$CONF"
}

node_arg() {  # node_arg X -> btxnX of a running multi-node cluster
  local i=$1
  [ "$(num_nodes)" -gt 1 ] || { say "a one-node cluster has no node to fail or restart (start --nodes N)"; exit 2; }
  case "$i" in ''|*[!0-9]*) say "a node number is expected, got '$i'"; exit 2 ;; esac
  { [ "$i" -ge 1 ] && [ "$i" -le "$(num_nodes)" ]; } || { say "no node $i (1..$(num_nodes))"; exit 2; }
  echo "btxn$i"
}

kill_node() {
  local name pids
  name=$(node_arg "$1")
  pids=$(ip netns pids "${TAG}n$1" 2>/dev/null || true)
  # shellcheck disable=SC2086
  if [ -n "$pids" ]; then kill -9 $pids 2>/dev/null || true; fi
  rm -f "$DIR/slurmd.$name.pid"
  say "killed node $name: $(echo $pids | wc -w) process(es) in its namespace (slurmd, steps, tasks)"
}

start_node() {
  local name
  name=$(node_arg "$1")
  pid_of "$DIR/slurmd.$name.pid" >/dev/null || start_slurmd "$name"
  # A node marked DOWN (not responding) returns once its slurmd registers (ReturnToService=2).
  wait_nodes_up "$name" || exit 1
  say "node $name is up"
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
  local file pid name files=()
  for name in $(node_names); do files+=("$DIR/slurmd.$name.pid"); done
  for file in "${files[@]}" "$DIR/slurmctld.pid" "$DIR/munge/munged.pid"; do
    pid=$(pid_of "$file") || { rm -f "$file"; continue; }
    kill "$pid"
    for _ in $(seq 1 40); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.25
    done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
    rm -f "$file"
  done
  network_down
  say "stopped ($DIR)"
}

status() {
  local name file pid
  for name in slurmctld $(node_names | sed 's/^/slurmd./') munged; do
    file=$DIR/$name.pid
    [ "$name" = munged ] && file=$DIR/munge/munged.pid
    if pid=$(pid_of "$file"); then echo "$name: running (pid $pid)"; else echo "$name: stopped"; fi
  done
  if running; then
    sinfo -N
    squeue
  fi
}

case "${1:-}" in
  start) shift; start "$@" ;;
  stop) stop ;;
  status) status ;;
  kill-node) kill_node "${2:-}" ;;
  start-node) start_node "${2:-}" ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  *) echo "usage: $0 start [--nodes N] | status | stop | kill-node X | start-node X | env   (state in \$BTX_SLURM_DIR, default /tmp/nemo-btx-slurm)" >&2; exit 2 ;;
esac
