#!/usr/bin/env bash
# Runs N pipeline processes with M fake CPU devices each on this machine, the way a
# multi-host job runs: same command everywhere, process 0 hosts the coordinator.
# It rehearses multi-host code paths (per-process data, global arrays, barriers,
# checkpoints written by several processes); fake devices add topology, not speed.
#
# Usage:
#   launch/local.sh --config CONFIG --workdir DIR [--num_processes N]
#       [--devices_per_process M] [--mode train|evaluate|predict] [--port PORT]
#       [--grace SECONDS] [--log_dir DIR] [--dry-run] [-- --config.key=value ...]
#
#   --num_processes N        processes to start (default 2)
#   --devices_per_process M  fake CPU devices per process (default 4)
#   --port PORT              coordinator port on 127.0.0.1 (default: a free one)
#   --grace SECONDS          after a failure, how long the others get to save and
#                            exit on SIGTERM before SIGKILL (default 30)
#   --log_dir DIR            local directory for the process logs (default DIR/logs;
#                            required when --workdir is a URL such as gs://B/run)
#   --dry-run                print the commands instead of running them
#   after --                 extra flags for pipeline.main, e.g. config overrides
#
# Logs: LOG_DIR/process_<i>.log. Waits for all; if one fails, names it, stops the
# others and exits with its status. Ctrl-C stops all (as a preemption: they save). PYTHON picks the interpreter (default: python3).
#
# Example:
#   launch/local.sh --num_processes 2 --devices_per_process 4 \
#       --config configs/fashion_mnist_cnn.py:smoke --workdir /tmp/run -- --config.seed=1
set -euo pipefail

usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; }
die() { echo "local.sh: $*" >&2; echo "Run launch/local.sh --help for usage." >&2; exit 2; }

# Prints a command as a shell would read it back.
quote() {
  local arg out=()
  for arg in "$@"; do
    if [[ "$arg" =~ ^[A-Za-z0-9_./:=@,+%-]+$ ]]; then out+=("$arg")
    else out+=("'${arg//\'/\'\\\'\'}'"); fi
  done
  echo "${out[*]}"
}

num_processes=2
devices=4
config=''
workdir=''
mode=train
port=''
grace=30
log_dir=''
dry_run=0
extra=()
while (($#)); do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --num_processes) num_processes="${2:?--num_processes needs a value}"; shift 2 ;;
    --devices_per_process) devices="${2:?--devices_per_process needs a value}"; shift 2 ;;
    --config) config="${2:?--config needs a value}"; shift 2 ;;
    --workdir) workdir="${2:?--workdir needs a value}"; shift 2 ;;
    --mode) mode="${2:?--mode needs a value}"; shift 2 ;;
    --port) port="${2:?--port needs a value}"; shift 2 ;;
    --grace) grace="${2:?--grace needs a value}"; shift 2 ;;
    --log_dir) log_dir="${2:?--log_dir needs a value}"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    --) shift; extra=("$@"); break ;;
    *) die "unknown argument '$1'" ;;
  esac
done
[[ -n "$config" ]] || die "missing --config"
[[ -n "$workdir" ]] || die "missing --workdir"
[[ "$num_processes" =~ ^[1-9][0-9]*$ ]] || die "--num_processes must be a positive integer"
[[ "$devices" =~ ^[1-9][0-9]*$ ]] || die "--devices_per_process must be a positive integer"
[[ "$grace" =~ ^[0-9]+$ ]] || die "--grace must be a whole number of seconds"
python="${PYTHON:-python3}"
if [[ -z "$port" ]]; then
  # Asking the kernel for a free port; a fixed one would collide between runs.
  port="$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
fi

if [[ -z "$log_dir" && "$workdir" == *://* ]]; then
  # mkdir would make a local ./gs:/B/run; the logs are written by this shell, not Python.
  die "--workdir $workdir is a URL: name a local --log_dir for the process logs"
fi
logs="${log_dir:-$workdir/logs}"
# Sets cmd to process $1's command line, one definition for the dry run and the run.
process_cmd() {
  cmd=(env JAX_PLATFORMS=cpu XLA_FLAGS="--xla_force_host_platform_device_count=$devices"
       "$python" -m pipeline.main --config="$config" --workdir="$workdir" --mode="$mode"
       --coordinator_address="127.0.0.1:$port" --num_processes="$num_processes"
       --process_id="$1" "${extra[@]}")
}

if ((dry_run)); then
  echo "+ $(quote mkdir -p "$logs")"
  for ((i = 0; i < num_processes; i++)); do
    process_cmd "$i"
    echo "+ $(quote "${cmd[@]}") > $(quote "$logs/process_$i.log") 2>&1 &"
  done
  echo "+ wait  # for all $num_processes; on the first failure, stop the rest"
  exit 0
fi

((BASH_VERSINFO[0] * 100 + BASH_VERSINFO[1] >= 501)) || die "needs bash 5.1 or newer (wait -p)"
mkdir -p "$logs"
pids=()
# After jax.distributed starts, SIGTERM only flags a preemption (the pipeline saves a
# checkpoint and exits at the next step), so survivors get TERM, then KILL if they
# are stuck, e.g. in a collective with the dead process.
stop_all() {
  local pid t
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for ((t = 0; t < grace; t++)); do
    # The job table, not kill -0: exited but unreaped children still answer kill -0.
    [[ -z "$(jobs -rp)" ]] && return 0
    sleep 1
  done
  for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
}
trap stop_all EXIT
trap 'exit 130' INT TERM
for ((i = 0; i < num_processes; i++)); do
  process_cmd "$i"
  "${cmd[@]}" > "$logs/process_$i.log" 2>&1 &
  pids+=("$!")
done
echo "local.sh: started $num_processes processes x $devices CPU devices; logs in $logs/"

declare -A process_of  # pid -> process index, for the ones still running.
for ((i = 0; i < num_processes; i++)); do process_of[${pids[i]}]=$i; done
while ((${#process_of[@]} > 0)); do
  # wait -n -p (bash 5.1) says which process finished, so the error can name it. Only
  # running ones are passed: bash rejects a pid it has already reaped.
  status=0
  done_pid=''
  wait -n -p done_pid "${!process_of[@]}" || status=$?
  [[ -n "$done_pid" ]] || { echo "local.sh: wait failed with status $status" >&2; exit 1; }
  i=${process_of[$done_pid]}
  unset "process_of[$done_pid]"
  if ((status != 0)); then
    echo "local.sh: process $i failed with status $status; stopping the others." >&2
    echo "---- last lines of $logs/process_$i.log ----" >&2
    tail -n 20 "$logs/process_$i.log" >&2
    exit "$status"
  fi
done
trap - EXIT
echo "local.sh: all $num_processes processes finished."
