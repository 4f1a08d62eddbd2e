#!/usr/bin/env bash
# Run on a networked machine (not the GPU host): packs what an offline GPU host lacks, in pieces of at most 64 MiB.
#   .ortgpu/1..4/piece   onnxruntime-gpu (CUDA 13) as an xz tar cut in four, by an external packing tool
#   .wheels/a, .wheels/b Python 3.12 wheels: diffusers, librosa and its imports, soxr, soundfile, click, tqdm
# Then see benchmarks/gpu.sh for the run calls.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -f .ortgpu/4/piece ] || ../shared/tools/ort-gpu-pieces
dl() { pip download -q --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
         --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --no-deps -d "$@"; }
mkdir -p .wheels/a .wheels/b
dl .wheels/a diffusers librosa soxr soundfile click tqdm lazy_loader audioread pooch msgpack decorator joblib \
   threadpoolctl scikit-learn platformdirs
dl .wheels/b numba llvmlite
python3 -m pip wheel -q --no-deps -w .wheels/a .
du -sh .wheels/a .wheels/b .ortgpu/*
