#!/usr/bin/env bash
# One-GPU benchmark (H100/H200), under 8 minutes: train-step MFU (stage 2 and 4, 7B with LoRA +
# remat), batch-1 decode tokens/s and HBM fraction, MoE vs dense decode. Results go to
# bench/results/gpu.json and docs/benchmarks.md.
#   bash bench/gpu.sh            # on the GPU machine
#   bash bench/gpu.sh --dry-run  # same code, tiny configs, on CPU (bench/results/gpu_dryrun.json)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
test -x "$PY" || PY=python3
if [[ "${1:-}" == "--dry-run" ]]; then
  shift
  export MEDPLIB_BENCH_SMALL=1
fi
if [[ "${MEDPLIB_BENCH_SMALL:-}" == "1" ]]; then
  export JAX_PLATFORMS=cpu
  ARGS=(--dry-run)
  BENCH_TIMEOUT=${BENCH_TIMEOUT:-1800}  # a shared CPU is slow; the 8-minute budget is for the GPU
else
  # Let XLA take most of the GPU memory up front; cuDNN attention is chosen by the model on GPU.
  export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}
  "$PY" -c "import jax; assert jax.default_backend() == 'gpu', jax.devices(); print(jax.devices())"
  ARGS=()
fi
timeout "${BENCH_TIMEOUT:-470}" "$PY" -m bench.gpu_bench "${ARGS[@]}" "$@"
"$PY" -m bench.run_all --docs-only
