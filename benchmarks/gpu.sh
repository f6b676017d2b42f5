#!/usr/bin/env bash
# The GPU speed check: fp16 indexing throughput and FAISS GPU search latency, one table.
#
#   bash benchmarks/gpu.sh [--count 768] [--batch-size 64] [--vectors 1000000]
#
# Needs one CUDA GPU seen by torch and FAISS (faiss-gpu); no network: the model is
# ViT-B-32 with random weights and every image is generated. About 2-3 minutes on one
# GPU; the timeout below stops it at 5.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
exec timeout 300 "$PYTHON" benchmarks/speed_gpu.py "$@"
