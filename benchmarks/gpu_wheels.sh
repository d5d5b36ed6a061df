#!/usr/bin/env bash
# Download, here, the wheels the GPU image lacks for benchmarks/gpu_train.py: diffusers and datasets
# with their missing dependencies (the image has torch, transformers, peft, accelerate, pyarrow,
# huggingface-hub, fsspec and xxhash), for its Python 3.12 on x86-64, into the ignored .whl/.
# Versions are the ones this project's CPU environment tests. About 9 MB.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl diffusers==0.42.1 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 importlib-metadata==10.2.0
ls -l .whl
