#!/usr/bin/env bash
# Run on a networked machine (not the GPU host): packs what an offline GPU host lacks, in pieces of at most 64 MiB.
#   .ortgpu/1..4/piece   onnxruntime-gpu (CUDA 13, Python 3.12) unpacked, as an xz tar cut in four
#   .wheels/a, .wheels/b Python 3.12 wheels: diffusers, librosa and its imports, soxr, soundfile, click, tqdm
# Then see benchmarks/gpu.sh for the run calls.
set -euo pipefail
cd "$(dirname "$0")/.."
ORT_GPU_VERSION=${ORT_GPU_VERSION:-1.31.1}
if [ ! -f .ortgpu/4/piece ]; then
  work=$(mktemp -d)
  pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 -d "$work/wheel" "onnxruntime-gpu==$ORT_GPU_VERSION"
  python3 -m zipfile -e "$work"/wheel/*.whl "$work/unpacked"
  # four pieces, each under 64 MiB: gpu.sh joins /tmp/ortparts/1..4
  size=$(tar -C "$work/unpacked" -cf - . | xz -T0 -6 | tee "$work/ort.tar.xz" | wc -c)
  split -n 4 -d -a 1 "$work/ort.tar.xz" "$work/piece."
  for n in 0 1 2 3; do mkdir -p ".ortgpu/$((n + 1))" && mv "$work/piece.$n" ".ortgpu/$((n + 1))/piece"; done
  echo "onnxruntime-gpu $ORT_GPU_VERSION: $size bytes of xz in four pieces"
  rm -rf "$work"
fi
dl() { pip download -q --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
         --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --no-deps -d "$@"; }
mkdir -p .wheels/a .wheels/b
dl .wheels/a diffusers librosa soxr soundfile click tqdm lazy_loader audioread pooch msgpack decorator joblib \
   threadpoolctl scikit-learn platformdirs
dl .wheels/b numba llvmlite
python3 -m pip wheel -q --no-deps -w .wheels/a .
du -sh .wheels/a .wheels/b .ortgpu/*
