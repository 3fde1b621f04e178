# Sourced by the setup blocks of allatonce.yaml and service.yaml: the PyTorch build that this
# node's NVIDIA driver and GPU run, and a check that the installed torch does use the GPU.
#
# PyTorch publishes each release built for several CUDA lines, each on a wheel index of its own
# (https://download.pytorch.org/whl/cu126, ...). A build runs on drivers from its CUDA line's
# minimum on: 525 for CUDA 12 (through CUDA's minor-version compatibility), 570 for 12.8 (which
# adds Blackwell GPUs), 580 for CUDA 13. And it holds kernels for some GPUs only: the cu128 and
# cu130 builds for compute capability 7.5 and up (T4 and newer), cu126 for 5.0 to 9.0 (a V100
# is 7.0). The default (PyPI) wheel of torch 2.14 is a CUDA 13 build: on the 535-570 drivers of
# many cloud images it cannot see the GPU at all.

# nvidia_query FIELD: what nvidia-smi says of the first GPU, e.g. driver_version (535.183.01) or
# compute_cap (8.6); nothing without an NVIDIA GPU.
nvidia_query() {
  command -v nvidia-smi >/dev/null || return 0
  nvidia-smi --query-gpu="$1" --format=csv,noheader 2>/dev/null | head -n 1 || true
}

# cuda_line DRIVER CAPABILITY: the newest CUDA line of PyTorch's indexes that DRIVER runs and
# that has kernels for a GPU of that compute capability (cu130, cu128, cu126), cpu without a
# driver; one error line and status 1 for a driver too old for any. An unknown capability
# leaves the choice to the driver.
cuda_line() {
  local driver=${1%%.*} capability=${2:-7.5}
  capability=${capability/./}  # 8.6 -> 86, 12.0 -> 120
  if [ -z "$1" ]; then
    echo cpu
  elif [ "$driver" -lt 525 ]; then
    echo "error: the NVIDIA driver $1 is too old for PyTorch's CUDA builds (525 or newer): pick an" \
      "image with a newer driver (resources.image_id) or another GPU in resources.ordered" >&2
    return 1
  elif [ "$capability" -lt 75 ] || [ "$driver" -lt 570 ]; then
    echo cu126
  elif [ "$driver" -lt 580 ]; then
    echo cu128
  else
    echo cu130
  fi
}

# gpu_check PYTHON DRIVER [MODULE...]: one error line and status 1 when there is a driver and
# the torch of PYTHON cannot use the GPU, has no kernels for it, or a compiled MODULE (vLLM's
# kernels) does not load: never a silent CPU run, nor a failure at the first kernel, on a GPU node.
gpu_check() {
  [ -z "$2" ] && return 0
  local problem
  problem=$("$1" - "$2" "${@:3}" 2>/dev/null <<'EOF'
import importlib, sys

FIX = "remove the venv and rerun setup"


def runs_on(archs, major, minor):
    """Whether one of torch's archs runs on this GPU: a cubin (sm_XY) on the same major with
    a minor of Y or more, PTX (compute_XY) on X.Y or later."""
    for arch in archs:
        kind, _, number = arch.partition("_")
        number = number.rstrip("af")  # sm_90a, sm_100f: arch-specific variants
        if kind not in ("sm", "compute") or not number.isdigit():
            continue
        x, y = divmod(int(number), 10)
        if kind == "sm" and x == major and y <= minor or kind == "compute" and (x, y) <= (major, minor):
            return True
    return False


def one_line(e):
    return f"{type(e).__name__}: {' '.join(str(e).split())}"


def problem(driver, modules):
    try:
        import torch
    except Exception as e:
        return f"torch does not load ({one_line(e)}): {FIX}"
    build = f"{torch.__version__} built for CUDA {torch.version.cuda}"
    if not torch.cuda.is_available():
        return (f"nvidia-smi sees a GPU (driver {driver}) and torch cannot use it ({build}): {FIX}, "
                "or pick an image whose driver runs this build (resources.image_id)")
    major, minor = torch.cuda.get_device_capability()
    archs = torch.cuda.get_arch_list()
    if not runs_on(archs, major, minor):
        return (f"torch {build} has no kernels for this GPU (compute capability {major}.{minor}; "
                f"it has {' '.join(archs)}): {FIX}, or pick another GPU in resources.ordered")
    for module in modules:
        try:
            importlib.import_module(module)
        except Exception as e:
            return f"{module} does not load beside torch {build} ({one_line(e)}): {FIX}"


found = problem(sys.argv[1], sys.argv[2:])
if found:
    print(f"error: {found}")
    sys.exit(1)
EOF
  ) && return 0
  echo "${problem:-error: $1 cannot check the GPU (run it to see why): remove the venv and rerun setup}" >&2
  return 1
}
