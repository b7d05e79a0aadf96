#!/usr/bin/env bash
# Wheels of what the GPU machines lack for the DeepSpeed test (they have no network and no deepspeed):
#   bash bench/gpu_wheels.sh [DIR]      (default DIR: wheels/, which make gpu-check unpacks; ~23 MB)
# Run it on a machine with network and a Python that has torch and setuptools (DeepSpeed's wheel is built,
# pure Python, with its C++/CUDA ops left to JIT): PYTHON=.venv/bin/python by default. The other wheels are
# downloaded for the GPU machines' CPython 3.12 on x86_64 Linux. Then carry DIR along to the GPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR="${1:-wheels}"
PYTHON="${PYTHON:-.venv/bin/python}"
mkdir -p "$DIR"
DS_BUILD_OPS=0 "$PYTHON" -m pip wheel --quiet --no-deps --no-build-isolation -w "$DIR" deepspeed==0.19.8
# DeepSpeed's dependencies, and transformers (Accelerate's DeepSpeed path imports it) with its own, at the
# versions of constraints.txt where they are pinned there
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$DIR" \
    hjson==3.1.0 msgpack==1.2.4 ninja==1.13.2 py-cpuinfo==9.0.0 einops==0.8.2 pydantic==2.14.3 pydantic-core==2.50.4 \
    annotated-types==0.8.0 typing-inspection==0.4.5 transformers==5.23.0 tokenizers==0.23.3 regex==2026.11.15 \
    typer==0.29.2 shellingham==1.5.4 rich==15.0.0 markdown-it-py==4.3.0 mdurl==0.1.2
ls "$DIR"
