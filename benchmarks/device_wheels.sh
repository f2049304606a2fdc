#!/usr/bin/env bash
# The wheels benchmarks/device_check.sh needs on the device tool's H200 image (Python
# 3.12, x86-64, JAX with CUDA, flax, optax, orbax, pytest) beyond what it has: fetched
# here into .whl/ (git-ignored), carried with the call (`carry: [".whl"]`) and installed
# there by the check itself. Nothing is fetched on the GPU machine, which has no network.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl && mkdir .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl \
  ml-collections soundfile cffi pycparser   # ml_collections: configs; soundfile: tests' conftest
ls -l .whl
