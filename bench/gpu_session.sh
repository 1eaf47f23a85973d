#!/usr/bin/env bash
# The whole GPU check in one command, for a lent GPU machine (device `run`, carry [".gpu"], timeout_s 600):
#
#   bash bench/gpu_session.sh      # versions, then bench/gpu_check.py's parts; results and logs in $OUT
#
# That machine has no network and its own python3 (3.12, CUDA torch, triton, ninja, nvcc, tensorboard, ...):
# the packages it lacks (DeepSpeed, ...) and this checkout's transformers come from .gpu/wheels, made here
# beforehand by bench/gpu_wheels.sh, installed offline into /tmp/site (ahead of the image's on PYTHONPATH).
# prefpretrain itself runs from this checkout, so the image's torch is used as it is.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/prefpretrain_gpu}
mkdir -p "$OUT"
PY=${PY:-python3}
if ! ls .gpu/wheels/*.whl >/dev/null 2>&1; then
    echo "no .gpu/wheels: run bench/gpu_wheels.sh on a machine with network, and carry .gpu" >&2
    exit 2
fi
"$PY" -m pip install --quiet --no-index --no-deps --no-compile --target /tmp/site .gpu/wheels/*.whl 2>&1 | tail -3
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:/tmp/site TORCH_EXTENSIONS_DIR=$PWD/.cache/torch_extensions
"$PY" - <<'PYEOF' 2>&1 | tee "$OUT/versions.txt"
import deepspeed, torch, transformers
print("torch", torch.__version__, "| cuda", torch.version.cuda, torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-", "| nccl",
      torch.cuda.nccl.version() if torch.cuda.is_available() else "-",
      "| deepspeed", deepspeed.__version__, "| transformers", transformers.__version__)
PYEOF
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv 2>&1 | tee -a "$OUT/versions.txt"
# every part prints its result as it ends (gpu_check.log) and the JSON is rewritten after each (gpu_check.json)
timeout "${GPU_CHECK_TIMEOUT:-540}" "$PY" bench/gpu_check.py --budget "${GPU_CHECK_BUDGET:-420}" \
    --json "$OUT/gpu_check.json" ${GPU_CHECK_ARGS:-} 2>"$OUT/gpu_check.log" | tail -1
rc=${PIPESTATUS[0]}
grep "^gpu_check:" "$OUT/gpu_check.log" | cut -c1-600
exit "$rc"
