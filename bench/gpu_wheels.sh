#!/usr/bin/env bash
# Wheels for the GPU machine, fetched HERE (it has no network): its image has python3 3.12 with torch (CUDA),
# tensorboard, accelerate, tokenizers, numpy, ... but not DeepSpeed and a few small packages.
# The versions are this checkout's tested ones (.venv). Then, on the GPU machine: bench/gpu_session.sh.
#
#   bash bench/gpu_wheels.sh            # -> .gpu/wheels (~25 MB), ignored by git, carried by device runs
set -euo pipefail
cd "$(dirname "$0")/.."
W=.gpu/wheels
mkdir -p "$W"
ver() { .venv/bin/pip show "$1" | sed -n 's/^Version: //p'; }
binary=()
# transformers too: the image's is older than this checkout's tested one (its KV-cache argument changed name)
for p in hjson pydantic pydantic_core annotated-types typing-inspection webdataset braceexpand pycodestyle pysbd \
         zstandard transformers; do
    binary+=("$p==$(ver "$p")")
done
.venv/bin/pip download --quiet --no-deps --dest "$W" --only-binary=:all: --implementation cp --python-version 3.12 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any "${binary[@]}"
# DeepSpeed is an sdist on PyPI: its wheel is built here without ops (they JIT-compile where they run)
DS_BUILD_OPS=0 .venv/bin/pip wheel --quiet --no-deps --no-build-isolation --wheel-dir "$W" "deepspeed==$(ver deepspeed)"
ls -1 "$W"
du -sh "$W"
