#!/usr/bin/env bash
# A private single-node SLURM cluster on this machine, for tests and for trying
# launch/slurm.sbatch by hand. No systemd needed: munged, slurmctld and slurmd run as
# plain daemons with their own key, socket, config, state and logs under one folder.
#
# Usage:
#   launch/slurm_cluster.sh start|stop|status [--dir DIR]
#
#   start        installs munge, slurmctld, slurmd and slurm-client (Debian packages,
#                SLURM 22.05) if missing, writes DIR/slurm.conf from `slurmd -C`, starts
#                the three daemons and waits until the node is idle. Starting a running
#                cluster only checks it. Prints the line the clients need:
#                  export SLURM_CONF=DIR/slurm.conf
#   stop         cancels every job, waits for them to end, then stops the daemons
#   status       the daemons' pids, sinfo and squeue; exit status 0 if all three run,
#                3 if not
#   --dir DIR    where everything lives (default $SLURM_CLUSTER_DIR, else
#                /tmp/jax-pipeline-slurm); logs in DIR/log/
#
# Needs root (or sudo): it installs packages and the daemons run as root. The node is
# called localhost, so jobs' SLURM_STEP_NODELIST (and JAX's coordinator) is localhost.
# The scheduler is tuned for tests: a requeued job restarts in seconds, not minutes.
#
# Example:
#   launch/slurm_cluster.sh start && export SLURM_CONF=/tmp/jax-pipeline-slurm/slurm.conf
#   sinfo; bash launch/slurm.sbatch --gpus-per-node 0 --tasks 2 --cpu-devices 4 ...
#   launch/slurm_cluster.sh stop
set -euo pipefail

usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; }
die() { echo "slurm_cluster.sh: $*" >&2; exit 1; }
bad_usage() {
  echo "slurm_cluster.sh: $*" >&2
  echo "Run launch/slurm_cluster.sh --help for usage." >&2
  exit 2
}

action=''
dir="${SLURM_CLUSTER_DIR:-/tmp/jax-pipeline-slurm}"
while (($#)); do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --dir) dir="${2:?--dir needs a value}"; shift 2 ;;
    start|stop|status) [[ -z "$action" ]] || bad_usage "give one action, not '$action' and '$1'"
                       action="$1"; shift ;;
    *) bad_usage "unknown argument '$1'" ;;
  esac
done
[[ -n "$action" ]] || bad_usage "missing the action: start, stop or status"
[[ "$dir" == /* ]] || dir="$PWD/$dir"
conf="$dir/slurm.conf"
export SLURM_CONF="$conf"
# The daemons' pid files; munged's is named by its own flag, the others by slurm.conf.
declare -A pid_file=([munged]="$dir/munged.pid" [slurmctld]="$dir/slurmctld.pid"
                     [slurmd]="$dir/slurmd.pid")
daemons=(munged slurmctld slurmd)  # Start order; stop goes the other way.

as_root() {
  if ((EUID == 0)); then "$@"
  elif command -v sudo > /dev/null; then sudo "$@"
  else die "needs root (or sudo) to run: $*"; fi
}

# The pid of a daemon from its pid file, if that process is alive.
running_pid() {
  local pid
  [[ -f "${pid_file[$1]}" ]] || return 1
  pid="$(< "${pid_file[$1]}")"
  [[ "$pid" =~ ^[0-9]+$ ]] && as_root kill -0 "$pid" 2> /dev/null && echo "$pid"
}

gone() { ! as_root kill -0 "$1" 2> /dev/null; }

# Waits up to $1 seconds for the command after it to succeed.
wait_for() {
  local timeout="$1" t
  shift
  for ((t = 0; t < timeout * 5; t++)); do
    "$@" && return 0
    sleep 0.2
  done
  return 1
}

install_packages() {
  local packages=(munge slurmctld slurmd slurm-client) missing=() p
  for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2> /dev/null | grep -q 'ok installed' || missing+=("$p")
  done
  ((${#missing[@]} == 0)) && return 0
  echo "slurm_cluster.sh: installing ${missing[*]}"
  as_root apt-get update -qq
  # The lock timeout: another apt run on this machine finishes first instead of failing us.
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
    -o DPkg::Lock::Timeout=300 "${missing[@]}" > "$dir/log/apt.log" 2>&1 \
    || die "apt-get install ${missing[*]} failed; see $dir/log/apt.log"
}

# slurm.conf for one node named localhost with what `slurmd -C` reports. A node line
# that claims more (CPUs, memory) than the machine has gets the node drained.
write_conf() {
  local hardware
  hardware="$(slurmd -C | head -n 1)"
  [[ "$hardware" == NodeName=* ]] || die "unexpected 'slurmd -C' output: $hardware"
  hardware="${hardware#NodeName=* }"  # Drops the real hostname; the node is localhost.
  cat > "$conf" << EOF
# Written by launch/slurm_cluster.sh: a private single-node cluster.
ClusterName=jaxpipeline
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
# cred_expire=5: a requeued job may start again 5 s after it ended (default 120).
AuthType=auth/munge
AuthInfo=socket=$dir/munge/munge.socket,cred_expire=5
CredType=cred/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
# No cgroups (containers often lack them): processes are tracked by parentage.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
# Scheduling every 1-2 s instead of every minute: requeued and queued jobs start fast.
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=2
ReturnToService=2
KillWait=10
NodeName=localhost $hardware State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
}

queue_empty() { [[ -z "$(squeue -h -o %A 2> /dev/null)" ]]; }
node_state() { sinfo -h -n localhost -o %T 2> /dev/null; }
node_idle() { [[ "$(node_state)" =~ ^(idle|mixed|allocated|completing)$ ]]; }

start() {
  mkdir -p "$dir/munge" "$dir/state" "$dir/spool" "$dir/log"
  # munged refuses a socket directory others can write to.
  chmod 700 "$dir" "$dir/munge"
  install_packages
  if [[ ! -f "$dir/munge/munge.key" ]]; then
    mungekey --create --keyfile="$dir/munge/munge.key"
    chmod 400 "$dir/munge/munge.key"
  fi
  write_conf
  local fresh=()
  # A cluster started anew forgets old jobs, which could otherwise hold the only node.
  running_pid slurmctld > /dev/null || fresh=(-c)
  if ! running_pid munged > /dev/null; then
    as_root munged --key-file="$dir/munge/munge.key" --socket="$dir/munge/munge.socket" \
      --pid-file="${pid_file[munged]}" --log-file="$dir/log/munged.log" \
      --seed-file="$dir/munge/munged.seed" --force \
      || die "munged did not start; see $dir/log/munged.log"
  fi
  if ! running_pid slurmctld > /dev/null; then
    as_root slurmctld -f "$conf" "${fresh[@]}" \
      || die "slurmctld did not start; see $dir/log/slurmctld.log"
  fi
  wait_for 20 scontrol ping > /dev/null 2>&1 \
    || die "slurmctld does not answer; see $dir/log/slurmctld.log"
  if ! running_pid slurmd > /dev/null; then
    # -N: the node's name in slurm.conf is localhost, not this machine's hostname.
    as_root slurmd -f "$conf" -N localhost "${fresh[@]}" \
      || die "slurmd did not start; see $dir/log/slurmd.log"
  fi
  if ! wait_for 30 node_idle; then
    sinfo -R >&2 || true
    die "node localhost is '$(node_state)', not idle; see $dir/log/slurmd.log and slurmctld.log"
  fi
  echo "slurm_cluster.sh: cluster up in $dir (node localhost $(node_state)); clients need:"
  echo "export SLURM_CONF=$conf"
}

stop() {
  local name pid jobs
  if running_pid slurmctld > /dev/null; then
    # A job still running (or COMPLETING) when slurmd dies leaves orphaned tasks.
    jobs="$(squeue -h -o %A 2> /dev/null || true)"
    if [[ -n "$jobs" ]]; then
      # shellcheck disable=SC2086  # One job id per word.
      scancel $jobs || true
      wait_for 60 queue_empty \
        || echo "slurm_cluster.sh: jobs still listed after 60 s: $(squeue -h 2>&1)" >&2
    fi
  fi
  for name in slurmd slurmctld munged; do
    if pid="$(running_pid "$name")"; then
      as_root kill -TERM "$pid"
      if ! wait_for 20 gone "$pid"; then
        echo "slurm_cluster.sh: $name ($pid) ignored SIGTERM for 20 s; killing it" >&2
        as_root kill -KILL "$pid" 2> /dev/null || true
      fi
    fi
    rm -f "${pid_file[$name]}"
  done
  echo "slurm_cluster.sh: cluster in $dir stopped"
}

status() {
  local name pid down=0
  for name in "${daemons[@]}"; do
    if pid="$(running_pid "$name")"; then echo "$name: running (pid $pid)"
    else echo "$name: not running"; down=1; fi
  done
  if ((!down)); then
    sinfo
    squeue
    echo "export SLURM_CONF=$conf"
  fi
  return $((down ? 3 : 0))
}

"$action"
