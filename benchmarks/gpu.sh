#!/usr/bin/env bash
# One run on a GPU host without network access: install, export a random-weight bundle, GPU parity, latency.
# Prepared with benchmarks/gpu_prepare.sh on a networked machine; run after the last transfer (see
# docs/gpu.md), e.g. with .ortgpu/4 and .wheels/b copied into the checkout:
#   cp .ortgpu/4/piece /tmp/ortparts/4 && bash benchmarks/gpu.sh
# Earlier transfers copied .ortgpu/1..3 pieces to /tmp/ortparts and .wheels/a to /tmp/wheels.
# Try it on a CPU with: RECON_GPU_DEVICE=cpu RECON_QUICK=1 bash benchmarks/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE=${RECON_GPU_DEVICE:-cuda}
OUT=${OUT:-/tmp/recon-gpu-out}
mkdir -p "$OUT"
if [ -f /tmp/ortparts/4 ]; then
  mkdir -p /tmp/ortgpu
  cat /tmp/ortparts/1 /tmp/ortparts/2 /tmp/ortparts/3 /tmp/ortparts/4 | xz -d | tar -C /tmp/ortgpu -xf -
  export PYTHONPATH=/tmp/ortgpu:${PYTHONPATH:-}
fi
for w in /tmp/wheels .wheels/a .wheels/b; do
  if ls "$w"/*.whl >/dev/null 2>&1; then python3 -m pip install -q --no-deps --no-index "$w"/*.whl; fi
done
python3 -c "import torch, onnxruntime as o; print('onnxruntime', o.__version__, o.get_available_providers(), 'torch', torch.__version__)"
python3 - <<'PY'
import torch
if torch.cuda.is_available():
    print(torch.cuda.get_device_name(0))
PY
BUNDLE=/tmp/recon-bundle
CONFIG=audioldm2-music
[ -n "${RECON_QUICK:-}" ] && CONFIG=tiny
recon-export --random-weights --config "$CONFIG" --out "$BUNDLE" --force 2>&1 | tail -12

echo "== parity (TF32 off)"
NVIDIA_TF32_OVERRIDE=0 python3 -m benchmarks.gpu_parity --model "$BUNDLE" --device "$DEVICE" --out "$OUT/parity.json" || true

echo "== cuDNN settings"
python3 -m benchmarks.tuning --model "$BUNDLE" --device "$DEVICE" --out "$OUT/tuning.json" || true

echo "== latency"
if [ -n "${RECON_QUICK:-}" ]; then
  python3 -m benchmarks.latency --model "$BUNDLE" --device "$DEVICE" --lengths 1.0 --batches 1 \
    --precisions fp32 --torch-precisions fp32 --repeats 2 --no-cold-start --out "$OUT"
else
  python3 -m benchmarks.latency --model "$BUNDLE" --device "$DEVICE" --lengths 1.0,10.24,30 --batches 1,4,16 \
    --max-audio-seconds 500 --precisions fp16,fp32 --torch-precisions fp16,fp32 --repeats 20 --warmup 3 --out "$OUT"
fi

echo "== server (recon-run serve on loopback, dynamic batching, vs in-process reconstruct_many)"
if python3 -c "import fastapi, uvicorn, httpx, prometheus_client, multipart" 2>/dev/null; then
  if [ -n "${RECON_QUICK:-}" ]; then
    python3 -m benchmarks.server --model "$BUNDLE" --provider "$DEVICE" --precision fp32 --lengths 1.0 \
      --clients 1,4 --requests 8 --out "$OUT" --tag server || true
  else
    python3 -m benchmarks.server --model "$BUNDLE" --provider "$DEVICE" --precision auto --lengths 1.0,10.24 \
      --clients 1,4,16 --requests 64 --max-batches 1,8 --overload-queue 8 --out "$OUT" --tag server || true
  fi
else
  echo "skipped: the serve extra (fastapi uvicorn httpx prometheus-client python-multipart) is not installed"
fi
ls -la "$OUT"
