#!/bin/sh
# Fetch the pure-Python wheels that bench/gpu.py needs and the GPU machine's image lacks
# (diffusers and what it imports, platformdirs for conceptctl's settings) into .whl/, which
# git ignores and the device run carries. Run here, where the package index is reachable.
set -e
cd "$(dirname "$0")/.."
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux2014_x86_64 -d .whl \
    diffusers==0.42.1 importlib_metadata==10.2.0 lazy-importer==0.1.0 platformdirs==4.14.8
ls .whl
