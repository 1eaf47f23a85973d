#!/usr/bin/env bash
# The whole GPU check in one command, for a device machine (`run` with carry [".gpu"], timeout_s 600):
#
#   bash bench/gpu_session.sh          # prints versions, then bench/gpu_mfu.py's JSON line; logs in $OUT
#
# That machine has no network and its own python3 (3.12, CUDA torch, transformers, tensorboard, ...): the
# packages it lacks come from .gpu/wheels, made here beforehand by bench/gpu_wheels.sh, installed offline.
# prefpretrain itself runs from this checkout (PYTHONPATH), so the image's torch is left as it is.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/prefpretrain_gpu}
mkdir -p "$OUT"
PY=${PY:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD TORCH_EXTENSIONS_DIR=$PWD/.cache/torch_extensions
if ! ls .gpu/wheels/*.whl >/dev/null 2>&1; then
    echo "no .gpu/wheels: run bench/gpu_wheels.sh on a machine with network, and carry .gpu" >&2
    exit 2
fi
# by name: a package the image already has is kept; the rest come from the carried wheels
"$PY" -m pip install --quiet --no-index --no-deps --find-links .gpu/wheels deepspeed hjson pydantic pydantic_core \
    annotated-types typing-inspection webdataset braceexpand pycodestyle pysbd zstandard 2>&1 | tail -3
"$PY" - <<'PYEOF' 2>&1 | tee "$OUT/versions.txt"
import deepspeed, torch, transformers
print("torch", torch.__version__, "| cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-",
      "| deepspeed", deepspeed.__version__, "| transformers", transformers.__version__)
PYEOF
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv 2>&1 | tee -a "$OUT/versions.txt"
# ~1 B Llama, bf16, ZeRO-2 through `prefpretrain launch` (MFU), then fp16 with an absurd loss scale (skips)
# (GPU_MFU_ARGS="--smoke --shards data/tiny" PY=.venv/bin/python runs this script's path on a CPU machine)
# shellcheck disable=SC2086
timeout "${GPU_MFU_TIMEOUT:-480}" "$PY" bench/gpu_mfu.py --gpus "${GPUS:-1}" --steps "${STEPS:-30}" ${GPU_MFU_ARGS:-} 2>&1 \
    | tee "$OUT/gpu_mfu.log" | grep -v "^\s*$" | tail -40
exit "${PIPESTATUS[0]}"
