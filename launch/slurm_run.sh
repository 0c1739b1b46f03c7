#!/usr/bin/env bash
# One SLURM task of launch/slurm.sbatch: chooses the GPUs (or fake CPU devices) this
# process drives, then runs pipeline.main with the given flags. jax.distributed reads the coordinator, the
# process count and the process id from SLURM's variables.
#
# Usage (srun runs it once per task; by hand only with --dry-run):
#   LAUNCH_TASKS=per-gpu|per-node|N LAUNCH_GPUS_PER_NODE=G [LAUNCH_CPU_DEVICES=D] \
#       launch/slurm_run.sh [--dry-run] PIPELINE_MAIN_FLAGS...
#
#   LAUNCH_TASKS           per-gpu (default): this task drives GPU $SLURM_LOCALID;
#                          per-node: this task drives all G GPUs of its node;
#                          N (N tasks per node): CPU-only jobs
#   LAUNCH_GPUS_PER_NODE   G (default 8); 0: a CPU-only job, no GPU selection
#   LAUNCH_CPU_DEVICES     D: CPU-only jobs, this task gets D fake CPU devices
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
cpu_devices="${LAUNCH_CPU_DEVICES:-}"
[[ "$gpus" =~ ^[0-9]+$ ]] || die "LAUNCH_GPUS_PER_NODE must be 0 or a positive integer, not '$gpus'"
[[ -z "$cpu_devices" || "$cpu_devices" =~ ^[1-9][0-9]*$ ]] \
  || die "LAUNCH_CPU_DEVICES must be a positive integer, not '$cpu_devices'"
((gpus == 0 || ${#cpu_devices} == 0)) || die "LAUNCH_CPU_DEVICES is for CPU-only jobs (LAUNCH_GPUS_PER_NODE=0)"

if [[ -n "$cpu_devices" ]]; then
  # Fake devices give a CPU job the topology of an accelerator one (tests, rehearsals).
  export JAX_PLATFORMS=cpu
  # Last, so that it wins over a device count inherited from the submitting shell.
  XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_force_host_platform_device_count=$cpu_devices"
  export XLA_FLAGS
fi

# JAX_LOCAL_DEVICE_IDS is read by jax.distributed.initialize. Left unset, JAX's SLURM
# detection gives every task the one GPU numbered SLURM_LOCALID.
if ((gpus > 0)); then
  case "$tasks" in
    per-gpu)
      # If SLURM already bound one GPU to this task (--gpus-per-task, --gpu-bind), that
      # GPU is number 0 of the visible ones, not SLURM_LOCALID.
      if [[ -n "${CUDA_VISIBLE_DEVICES:-}" && "${CUDA_VISIBLE_DEVICES}" != *,* ]]; then
        export JAX_LOCAL_DEVICE_IDS=0
      fi ;;
    per-node)
      # Without this JAX would hand the node's single task only GPU 0.
      JAX_LOCAL_DEVICE_IDS="$(seq -s, 0 $((gpus - 1)))"
      export JAX_LOCAL_DEVICE_IDS ;;
    *) die "LAUNCH_TASKS must be per-gpu or per-node with GPUs, not '$tasks'" ;;
  esac
fi
export PYTHONUNBUFFERED=1  # Lines from all tasks interleave in one file; keep them whole.

cmd=("${PYTHON:-python3}" -m pipeline.main "$@")
if ((dry_run)); then
  if ((gpus > 0)); then
    echo "+ JAX_LOCAL_DEVICE_IDS=${JAX_LOCAL_DEVICE_IDS:-\$SLURM_LOCALID} ${cmd[*]}"
  else
    echo "+ JAX_PLATFORMS=${JAX_PLATFORMS:-} XLA_FLAGS=${XLA_FLAGS:-} ${cmd[*]}"
  fi
  exit 0
fi
exec "${cmd[@]}"
