#!/usr/bin/env bash
# Trains on a Cloud TPU VM slice: create it, install this project on every worker, run
# the same pipeline command on all workers, stream worker 0's log, delete the slice.
# JAX finds the other workers itself (jax.distributed auto-detects a TPU VM), so the
# command carries no coordinator flags.
#
# Usage:
#   launch/tpu_vm.sh --name NAME --zone ZONE --accelerator TYPE --config CONFIG
#       --workdir gs://BUCKET/DIR [--version RUNTIME] [--project PROJECT]
#       [--spot | --queued] [--mode train|evaluate|predict] [--repo GIT_URL [--ref REF]]
#       [--python VERSION] [--reuse] [--keep] [--dry-run] [-- --config.key=value ...]
#
#   --name NAME          TPU VM name (also the queued resource name with --queued)
#   --zone ZONE          e.g. us-central2-b
#   --accelerator TYPE   e.g. v4-16 (2 workers), v5litepod-8, v6e-16
#   --config CONFIG      config file, optionally :variant, relative to the repo root
#   --workdir gs://...   checkpoints and logs; must be on GCS so that every worker and
#                        a rerun see the same files
#   --version RUNTIME    TPU software version (default tpu-ubuntu2204-base)
#   --project PROJECT    gcloud project (default: gcloud's configured one)
#   --spot               Spot capacity: cheaper, can be preempted at any time
#   --queued             create through a queued resource: waits for capacity
#   --mode MODE          pipeline.main --mode (default train)
#   --repo URL --ref REF clone this git URL at REF on the workers (default: copy this
#                        checkout, uncommitted changes included)
#   --python VERSION     Python for the workers' virtualenv, made by uv (default 3.11)
#   --reuse              the TPU exists already (e.g. kept with --keep): skip creation
#   --keep               do not delete the TPU at the end (it is deleted by default,
#                        also on failure or Ctrl-C, so it does not bill idle)
#   --dry-run            print every command instead of running it
#   after --             extra flags for pipeline.main, e.g. config overrides
#
# Resume after a preemption or failure: rerun the same command. Training restores the
# latest checkpoint in --workdir.
#
# Example:
#   launch/tpu_vm.sh --name rn50 --zone us-central2-b --accelerator v4-16 \
#       --config configs/imagenet_resnet50.py --workdir gs://my-bucket/rn50 --spot \
#       -- --config.num_epochs=90
set -euo pipefail

usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; }
die() { echo "tpu_vm.sh: $*" >&2; echo "Run launch/tpu_vm.sh --help for usage." >&2; exit 2; }

# Prints a command as a shell would read it back.
quote() {
  local arg out=()
  for arg in "$@"; do
    if [[ "$arg" =~ ^[A-Za-z0-9_./:=@,+%-]+$ ]]; then out+=("$arg")
    else out+=("'${arg//\'/\'\\\'\'}'"); fi
  done
  echo "${out[*]}"
}

# Runs a command, or prints it under --dry-run.
run() {
  if ((dry_run)); then echo "+ $(quote "$@")"; else "$@"; fi
}

name=''
zone=''
accelerator=''
config=''
workdir=''
version=tpu-ubuntu2204-base
project=''
spot=0
queued=0
mode=train
repo_url=''
ref=''
python_version=3.11
reuse=0
keep=0
dry_run=0
extra=()
while (($#)); do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --name) name="${2:?--name needs a value}"; shift 2 ;;
    --zone) zone="${2:?--zone needs a value}"; shift 2 ;;
    --accelerator) accelerator="${2:?--accelerator needs a value}"; shift 2 ;;
    --config) config="${2:?--config needs a value}"; shift 2 ;;
    --workdir) workdir="${2:?--workdir needs a value}"; shift 2 ;;
    --version) version="${2:?--version needs a value}"; shift 2 ;;
    --project) project="${2:?--project needs a value}"; shift 2 ;;
    --spot) spot=1; shift ;;
    --queued) queued=1; shift ;;
    --mode) mode="${2:?--mode needs a value}"; shift 2 ;;
    --repo) repo_url="${2:?--repo needs a value}"; shift 2 ;;
    --ref) ref="${2:?--ref needs a value}"; shift 2 ;;
    --python) python_version="${2:?--python needs a value}"; shift 2 ;;
    --reuse) reuse=1; shift ;;
    --keep) keep=1; shift ;;
    --dry-run) dry_run=1; shift ;;
    --) shift; extra=("$@"); break ;;
    *) die "unknown argument '$1'" ;;
  esac
done
missing=()
for var in name zone accelerator config workdir; do
  [[ -n "${!var}" ]] || missing+=("--$var")
done
((${#missing[@]} == 0)) || die "missing ${missing[*]}"
[[ "$workdir" == gs://* ]] || die "--workdir must be a gs:// path: each worker has its own disk"
[[ -z "$ref" || -n "$repo_url" ]] || die "--ref needs --repo"
((dry_run)) || command -v gcloud > /dev/null || die "gcloud not found; install the Google Cloud CLI"

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
gflags=(--zone="$zone")
[[ -z "$project" ]] || gflags+=(--project="$project")
ssh=(gcloud compute tpus tpu-vm ssh "$name" "${gflags[@]}")
remote_dir=jax-pipeline  # Relative to the home directory, where ssh commands start.

create() {
  local capacity=()
  ((spot)) && capacity=(--spot)
  if ((queued)); then
    run gcloud compute tpus queued-resources create "$name" --node-id="$name" \
      --accelerator-type="$accelerator" --runtime-version="$version" "${gflags[@]}" \
      "${capacity[@]}"
  else
    run gcloud compute tpus tpu-vm create "$name" --accelerator-type="$accelerator" \
      --version="$version" "${gflags[@]}" "${capacity[@]}"
  fi
}

# A queued resource is granted when capacity frees up; the VM exists only then.
wait_until_active() {
  local describe=(gcloud compute tpus queued-resources describe "$name" "${gflags[@]}"
                  --format='value(state.state)')
  echo "tpu_vm.sh: waiting for queued resource $name to become ACTIVE"
  if ((dry_run)); then
    echo "+ $(quote "${describe[@]}")  # every 60 s until ACTIVE"
    return
  fi
  local state
  while true; do
    state="$("${describe[@]}")"
    case "$state" in
      ACTIVE) return ;;
      FAILED|SUSPENDED) die "queued resource $name is $state" ;;
      *) echo "  state $state"; sleep 60 ;;
    esac
  done
}

delete() {
  if ((queued)); then
    # --force also deletes the TPU VM the queued resource holds.
    run gcloud compute tpus queued-resources delete "$name" "${gflags[@]}" --force --quiet
  else
    run gcloud compute tpus tpu-vm delete "$name" "${gflags[@]}" --quiet
  fi
}

# Puts the code on every worker: a clone of --repo, or a tarball of this checkout.
ship_code() {
  if [[ -n "$repo_url" ]]; then
    local clone
    clone="rm -rf $remote_dir && git clone $(quote "$repo_url") $remote_dir"
    [[ -z "$ref" ]] || clone+=" && git -C $remote_dir checkout $(quote "$ref")"
    run "${ssh[@]}" --worker=all --command="$clone"
  else
    local tarball
    tarball="${TMPDIR:-/tmp}/jax-pipeline-$name.tar.gz"
    run tar -czf "$tarball" -C "$repo_root" --exclude=.git --exclude=.venv \
      --exclude=__pycache__ .
    run gcloud compute tpus tpu-vm scp "$tarball" "$name:jax-pipeline.tar.gz" \
      "${gflags[@]}" --worker=all
    run "${ssh[@]}" --worker=all --command="rm -rf $remote_dir && mkdir -p $remote_dir \
&& tar -xzf jax-pipeline.tar.gz -C $remote_dir"
  fi
}

# A virtualenv with the pinned requirements, this package, and the TPU build of the
# same jax version (the pins name the CPU one).
install_cmd="set -e; cd $remote_dir; \
command -v uv > /dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh; \
export PATH=\$HOME/.local/bin:\$PATH; \
uv venv --allow-existing --python $python_version .venv; . .venv/bin/activate; \
uv pip install -c requirements.lock -e .; \
uv pip install -c requirements.lock \"jax[tpu]==\$(python -c 'import jax; print(jax.__version__)')\""

# nohup and a detached shell keep training alive if this script's ssh session drops;
# the exit status lands in a file that the log stream below waits for.
# --expect_platform: a worker whose jax lacks the TPU build stops instead of using its CPU.
train_cmd="$(quote python -m pipeline.main --config="$config" --workdir="$workdir" \
  --mode="$mode" --expect_platform=tpu "${extra[@]}")"
start_cmd="cd $remote_dir && . .venv/bin/activate && rm -f \$HOME/pipeline.rc && \
nohup bash -c $(quote "$train_cmd; echo \$? > \$HOME/pipeline.rc") > \$HOME/pipeline.log 2>&1 < /dev/null &"
stream_cmd="tail -n +1 -F \$HOME/pipeline.log & t=\$!; \
while [ ! -f \$HOME/pipeline.rc ]; do sleep 10; done; sleep 2; kill \$t; exit \$(cat \$HOME/pipeline.rc)"

if ((reuse)); then
  echo "tpu_vm.sh: reusing TPU $name"
else
  create
fi
if ((!keep)); then
  # Set only once creation succeeded, so a name clash never deletes someone's TPU.
  # From here on it is deleted on any exit, failure and Ctrl-C included: an idle
  # slice still bills. A rerun resumes from the workdir.
  trap 'echo "tpu_vm.sh: deleting $name (pass --keep to keep it)"; delete' EXIT
fi
((reuse || !queued)) || wait_until_active
ship_code
run "${ssh[@]}" --worker=all --command="$install_cmd"
run "${ssh[@]}" --worker=all --command="$start_cmd"
echo "tpu_vm.sh: training started on all workers of $name; streaming worker 0's log"
run "${ssh[@]}" --worker=0 --command="$stream_cmd"
echo "tpu_vm.sh: finished; checkpoints and logs are in $workdir"
