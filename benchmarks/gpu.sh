#!/usr/bin/env bash
# The GPU speed check: does ingestion keep the GPU busy (nvJPEG decode vs CPU decode, against
# the fp16 model alone), and FAISS search on the GPU (flat and IVF, with recall). One table.
#
#   bash benchmarks/gpu.sh [--photos 512] [--small 4096] [--batch-size 256] [--vectors 1000000]
#   bash benchmarks/gpu.sh --dry-run     # on the CPU at tiny sizes: every code path, a few seconds
#
# Needs one CUDA GPU seen by torch and FAISS (faiss-gpu); no network: the model is
# ViT-B-32 with random weights and every image and vector is generated. Meant to take
# 2-3 minutes on one GPU; the timeout below stops it at 5.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
if [[ " $* " != *" --dry-run "* ]]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
exec timeout 300 "$PYTHON" benchmarks/speed_gpu.py "$@"
