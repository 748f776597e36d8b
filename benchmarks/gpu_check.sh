#!/usr/bin/env bash
# GPU check for posezoo (issue 13): installs the GPU extra, then prints the providers
# really used, model-only and end-to-end frames/s of the bundled model (CUDA fp32,
# TensorRT fp32/fp16), HRNet-w32 top-down crops/s and GPU-vs-CPU keypoint parity.
# Meant to finish in under 5 minutes on a fresh GPU machine (--budget bounds the
# measurements; TensorRT engines are cached under the posezoo cache for the next run).
#
#   bash benchmarks/gpu_check.sh               # install .[gpu], then measure
#   bash benchmarks/gpu_check.sh --dry-run     # no install, no GPU needed: the providers each
#                                              # configuration would use and the engine cache path
#   bash benchmarks/gpu_check.sh --no-install  # measure with the onnxruntime already installed
#   bash benchmarks/gpu_check.sh --wheelhouse DIR  # install offline from wheels in DIR
# Other options go to `python -m posezoo.gpu` (--video, --frames, --batch-size, --budget,
# --no-hrnet, --json FILE).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
install=1
dry=0
wheelhouse=""
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry=1; install=0; args+=("$1") ;;
    --no-install) install=0 ;;
    --wheelhouse) wheelhouse="$2"; shift ;;
    *) args+=("$1") ;;
  esac
  shift
done

if [ "$install" = 1 ]; then
  start=$(date +%s)
  pipargs=()
  if [ -n "$wheelhouse" ]; then pipargs=(--no-index --find-links "$wheelhouse"); fi
  have_gpu_ort=$("$PYTHON" -c "import onnxruntime as o; print(int('CUDAExecutionProvider' in o.get_available_providers()))" 2>/dev/null || echo 0)
  if [ "$have_gpu_ort" = 1 ]; then
    echo "gpu_check: onnxruntime-gpu is installed already"
  else
    echo "gpu_check: installing the GPU extra (onnxruntime-gpu replaces onnxruntime)"
    # both wheels install the same module: the CPU one must go first
    "$PYTHON" -m pip uninstall -y -q onnxruntime || true
    if ! "$PYTHON" -m pip install -q "${pipargs[@]}" -e '.[gpu]'; then
      echo "gpu_check: could not install the GPU extra (no network? try --wheelhouse DIR); putting back onnxruntime" >&2
      "$PYTHON" -m pip install -q "${pipargs[@]}" onnxruntime || true
    fi
  fi
  # TensorRT from NVIDIA's wheels, matching the CUDA major version onnxruntime-gpu was built for
  cuda_major=$("$PYTHON" -c "from onnxruntime.capi import build_and_package_info as b; print(str(getattr(b, 'cuda_version', '') or '').split('.')[0])" 2>/dev/null || true)
  if [ -n "$cuda_major" ] && ! "$PYTHON" -c "import tensorrt" 2>/dev/null; then
    echo "gpu_check: installing TensorRT for CUDA $cuda_major (tensorrt-cu$cuda_major)"
    "$PYTHON" -m pip install -q "${pipargs[@]}" "tensorrt-cu${cuda_major}" \
      || echo "gpu_check: TensorRT not installed: the TensorRT configurations will say so" >&2
  fi
  echo "gpu_check: install took $(( $(date +%s) - start )) s"
fi

exec "$PYTHON" -m posezoo.gpu "${args[@]}"
