#!/usr/bin/env bash
# One GPU benchmark session: every bench section in its own process (so one failure or hang
# loses nothing else), then the learning checks on the real CIFAR-10 subset, in priority
# order under one deadline.
#
#   OUT=results_folder DATA=path/to/cifar10-subset bash bench/gpu_session.sh [SECONDS]
#
# Missing Python packages (albumentations, pytorch-grad-cam, ml_collections, ...) may be
# carried as wheels in .whl/; they are installed into /tmp/site first.
set -u
budget=${1:-560}
deadline=$(( $(date +%s) + budget ))
OUT=${OUT:-bench/results/gpu}
DATA=${DATA:-../shared/data/cifar10-subset}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
# JAX takes 75% of GPU memory by default; leave room for PyTorch in the same process.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.5}
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

# step NAME LIMIT COMMAND...: run COMMAND under the smaller of LIMIT and the time left.
step() {
  local name=$1 limit=$2; shift 2
  local left=$(( deadline - $(date +%s) ))
  (( left < limit )) && limit=$left
  if (( limit < 15 )); then echo "== $name: skipped (out of time)"; return; fi
  echo "== $name (limit ${limit}s)"
  local start=$(date +%s)
  timeout "$limit" "$@"
  echo "== $name: exit $? after $(( $(date +%s) - start ))s"
}

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.limit --format=csv 2>&1
python3 - <<'EOF'
import importlib
for name in ("jax", "jaxlib", "flax", "optax", "orbax.checkpoint", "numpy", "torch", "albumentations", "pytorch_grad_cam", "ml_collections"):
    try:
        print(name, getattr(importlib.import_module(name), "__version__", "?"))
    except Exception as error:
        print(name, "MISSING", type(error).__name__, error)
import jax
print(jax.devices())
EOF

step train 200 python3 -m bench.run --sections train --out "$OUT/train.json"
# The cold end-to-end run fills an empty compilation cache; e2e_warm (later, lower priority)
# re-runs it as a second `python train.py` of the same model would, with the cache.
rm -rf /tmp/jaxcam_e2e_cache
step e2e 150 env JAX_COMPILATION_CACHE_DIR=/tmp/jaxcam_e2e_cache python3 -m bench.run --sections e2e --out "$OUT/e2e.json"
step pipeline 60 python3 -m bench.run --sections pipeline --out "$OUT/pipeline.json"
step learning_check 100 python3 train.py --config configs/learning_check.py --workdir /tmp/runs \
  --config.data_dir="$DATA" --config.tensorboard=False --config.print_summary=False
step eval 60 python3 -m bench.run --sections eval --out "$OUT/eval.json"
step cam 150 python3 -m bench.run --sections cam --out "$OUT/cam.json"
step default_recipe_subset 100 python3 train.py --config configs/default.py --workdir /tmp/runs \
  --config.data_dir="$DATA" --config.dtype=bfloat16 --config.tensorboard=False --config.print_summary=False
step e2e_warm 100 env JAX_COMPILATION_CACHE_DIR=/tmp/jaxcam_e2e_cache python3 -m bench.run --sections e2e --out "$OUT/e2e_warm.json"
# Lowest priority: does XLA's GPU autotuning or its Triton GEMMs change the bf16 step? (A
# bigger step or a shorter first compile here points at where the MFU or end-to-end time goes.)
step flags_no_autotune 120 env XLA_FLAGS="--xla_gpu_autotune_level=0" \
  python3 -m bench.run --sections train --dtypes bfloat16 --no-torch --out "$OUT/flags_no_autotune.json"
step flags_no_triton_gemm 120 env XLA_FLAGS="--xla_gpu_enable_triton_gemm=false" \
  python3 -m bench.run --sections train --dtypes bfloat16 --no-torch --out "$OUT/flags_no_triton_gemm.json"
