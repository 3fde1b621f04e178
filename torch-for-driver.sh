# Sourced by the setup blocks of allatonce.yaml and service.yaml: the PyTorch build that this
# node's NVIDIA driver runs, and a check that the installed torch does use the GPU.
#
# PyTorch publishes each release built for several CUDA lines, each on a wheel index of its own
# (https://download.pytorch.org/whl/cu126, ...). A build runs on drivers from its CUDA line's
# minimum on: 525 for CUDA 12 (through CUDA's minor-version compatibility), 570 for 12.8 (which
# adds Blackwell GPUs), 580 for CUDA 13. The default (PyPI) wheel of torch 2.14 is a CUDA 13
# build: on the 535-570 drivers of many cloud images it cannot see the GPU at all.

# The driver's version, e.g. 535.183.01; nothing without an NVIDIA GPU.
nvidia_driver() {
  command -v nvidia-smi >/dev/null || return 0
  nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -n 1 || true
}

# cuda_line DRIVER: the newest CUDA line of PyTorch's indexes that DRIVER runs (cu130, cu128,
# cu126), cpu without a driver; one error line and status 1 for a driver too old for any.
cuda_line() {
  local major=${1%%.*}
  if [ -z "$1" ]; then
    echo cpu
  elif [ "$major" -ge 580 ]; then
    echo cu130
  elif [ "$major" -ge 570 ]; then
    echo cu128
  elif [ "$major" -ge 525 ]; then
    echo cu126
  else
    echo "error: the NVIDIA driver $1 is too old for PyTorch's CUDA builds (525 or newer): pick an" \
      "image with a newer driver (resources.image_id) or another GPU in resources.ordered" >&2
    return 1
  fi
}

# gpu_check PYTHON DRIVER: one error line and status 1 when there is a driver and the torch of
# PYTHON cannot use the GPU (never a silent CPU run on a GPU node).
gpu_check() {
  [ -z "$2" ] && return 0
  "$1" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' 2>/dev/null && return 0
  local torch
  torch=$("$1" -c 'import torch; print(torch.__version__, "built for CUDA", torch.version.cuda)' 2>&1 | tail -n 1)
  echo "error: nvidia-smi sees a GPU (driver $2) and torch cannot use it ($torch): remove the" \
    "venv and rerun setup, or pick an image whose driver runs this build (resources.image_id)" >&2
  return 1
}
