#!/usr/bin/env bash
# ResNet-50 bf16 on synthetic 224x224 images on one GPU: bare-step and real-loop images/s
# and MFU, in under 5 minutes (about 1-2 for the install, 1 for compiles, 1-2 timed).
#
#   bash bench/gpu.sh                    # install the CUDA jax into .venv, then measure
#   bash bench/gpu.sh --no-install       # .venv already has jax[cuda12]==0.10.2
#   bash bench/gpu.sh --cpu-dry-run      # no GPU: tiny shapes on the CPU, no install
#   bash bench/gpu.sh --batch 512 --flax-loop   # extra arguments go to bench/resnet50.py
#
# The install needs PyPI: jax 0.10.2 declares the extras cuda12 (jax-cuda12-plugin[with-cuda],
# which pulls the CUDA 12 / cuDNN wheels) and cuda13; the project's other pins come from
# requirements.lock. On a machine without network, preinstall and pass --no-install.
set -euo pipefail
cd "$(dirname "$0")/.."

install=1
args=()
for arg in "$@"; do
  case "$arg" in
    --no-install) install=0 ;;
    --cpu-dry-run) install=0; args+=("$arg") ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) args+=("$arg") ;;
  esac
done

py=.venv/bin/python
if [ "$install" = 1 ]; then
  [ -x "$py" ] || python3 -m venv .venv
  # One resolver run: the CUDA jax and the project at its locked versions.
  "$py" -m pip install -q -c requirements.lock 'jax[cuda12]==0.10.2' -e .
fi

if [ "${args[*]:-}" != "${args[*]/--cpu-dry-run/}" ]; then
  echo "cpu dry run: tiny shapes, measured bf16 matmul as the peak"
else
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader || true
  "$py" -c 'import jax; d = jax.devices(); assert d[0].platform == "gpu", d; print(d)'
fi
# 270 s leaves the install and start-up inside 5 minutes; the script prints per round, so
# a timeout still leaves the rounds done so far on the screen.
timeout 270 "$py" bench/resnet50.py "${args[@]}"
