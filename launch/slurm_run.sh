#!/usr/bin/env bash
# One SLURM task of launch/slurm.sbatch: chooses the GPUs this process drives, then
# runs pipeline.main with the given flags. jax.distributed reads the coordinator, the
# process count and the process id from SLURM's variables.
#
# Usage (srun runs it once per task; by hand only with --dry-run):
#   LAUNCH_TASKS=per-gpu|per-node LAUNCH_GPUS_PER_NODE=G \
#       launch/slurm_run.sh [--dry-run] PIPELINE_MAIN_FLAGS...
#
#   LAUNCH_TASKS           per-gpu (default): this task drives GPU $SLURM_LOCALID;
#                          per-node: this task drives all G GPUs of its node
#   LAUNCH_GPUS_PER_NODE   G (default 8)
#   PYTHON                 the interpreter (default python3)
#   --dry-run              print the command and its GPU settings instead of running it
#
# Example:
#   LAUNCH_TASKS=per-node LAUNCH_GPUS_PER_NODE=8 launch/slurm_run.sh --dry-run \
#       --config=configs/imagenet_resnet50.py --workdir=/shared/runs/rn50
set -euo pipefail

usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; }
die() { echo "slurm_run.sh: $*" >&2; echo "Run launch/slurm_run.sh --help for usage." >&2; exit 2; }

dry_run=0
case "${1:-}" in
  -h|--help) usage; exit 0 ;;
  --dry-run) dry_run=1; shift ;;
esac
(($#)) || die "missing the pipeline.main flags (at least --config and --workdir)"
tasks="${LAUNCH_TASKS:-per-gpu}"
gpus="${LAUNCH_GPUS_PER_NODE:-8}"
[[ "$gpus" =~ ^[1-9][0-9]*$ ]] || die "LAUNCH_GPUS_PER_NODE must be a positive integer"

# JAX_LOCAL_DEVICE_IDS is read by jax.distributed.initialize. Left unset, JAX's SLURM
# detection gives every task the one GPU numbered SLURM_LOCALID.
case "$tasks" in
  per-gpu)
    # If SLURM already bound one GPU to this task (--gpus-per-task, --gpu-bind), that GPU
    # is number 0 of the visible ones, not SLURM_LOCALID.
    if [[ -n "${CUDA_VISIBLE_DEVICES:-}" && "${CUDA_VISIBLE_DEVICES}" != *,* ]]; then
      export JAX_LOCAL_DEVICE_IDS=0
    fi ;;
  per-node)
    # Without this JAX would hand the node's single task only GPU 0.
    JAX_LOCAL_DEVICE_IDS="$(seq -s, 0 $((gpus - 1)))"
    export JAX_LOCAL_DEVICE_IDS ;;
  *) die "LAUNCH_TASKS must be per-gpu or per-node, not '$tasks'" ;;
esac
export PYTHONUNBUFFERED=1  # Lines from all tasks interleave in one file; keep them whole.

cmd=("${PYTHON:-python3}" -m pipeline.main "$@")
if ((dry_run)); then
  echo "+ JAX_LOCAL_DEVICE_IDS=${JAX_LOCAL_DEVICE_IDS:-\$SLURM_LOCALID} ${cmd[*]}"
  exit 0
fi
exec "${cmd[@]}"
