#!/usr/bin/env bash
# Wheels that the lent GPU machine's image lacks for scripts/gpu_suite.py, fetched here into .whl/
# (git-ignored), at the versions this project is tested with. That machine runs Python 3.12 on
# x86-64 and reaches no package registry, so they travel with the working tree (~10 MB):
#
#   bash scripts/gpu_wheels.sh                       # here, once; PYTHON= a Python with torch (deepspeed's build)
#   # there (carry: [".whl"]):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
#       .whl/*.whl && export PYTHONPATH=/tmp/site && python3 scripts/gpu_suite.py --device cuda --size 7b
#
# The image already holds torch, transformers, accelerate, tokenizers, safetensors, timm, pyarrow,
# pandas and the rest (see the device notes' package list); transformers stays the image's own
# (carrying ours would pull a newer huggingface_hub and its dependencies). Per part: trl, datasets,
# peft (dpo), deepspeed + pydantic (dpo's ZeRO-2 arm), open_clip_torch + ftfy (clip).
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=.whl
PY=${PYTHON:-python3}
mkdir -p "$DEST"

"$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$DEST" \
    trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 peft==0.21.2 \
    hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
    typing-extensions==4.16.0 open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4

# deepspeed is published as source only: build its pure-Python wheel here (no ops prebuilt; it
# JIT-compiles an op only when one is asked for, and ZeRO-2 with the Trainer's AdamW asks for none)
if ! ls "$DEST"/deepspeed-0.19.8-*.whl >/dev/null 2>&1; then
    src=$(mktemp -d)
    "$PY" -m pip download --no-deps --no-binary=:all: -d "$src" deepspeed==0.19.8
    DS_BUILD_OPS=0 "$PY" -m pip wheel --no-deps --no-build-isolation -w "$DEST" "$src"/deepspeed-0.19.8.tar.gz
    rm -rf "$src"
fi
ls -la "$DEST"
du -sh "$DEST"
