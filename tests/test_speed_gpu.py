"""benchmarks/gpu.sh --dry-run: the GPU benchmark's every code path, on the CPU at tiny sizes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow  # about 15 s here, most of it importing torch, open_clip and FAISS in a fresh process
def test_gpu_benchmark_dry_run_runs_every_part(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHON": sys.executable, "TMPDIR": str(tmp_path)}
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--dry-run"], capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    assert "DRY RUN on the CPU" in out
    for line in ("model forward alone", "ingest 12 x 320x240 JPEGs, GPU decode vs CPU decode",
                 "ingest 16 x 96x72 JPEGs, GPU decode vs CPU decode", "index_paths today",
                 "FAISS GPU exact search, 10000 vectors", "FAISS GPU IVF32,Flat nprobe 4", "GPU memory peak"):
        assert line in out, line
    agreement = next(row for row in out.splitlines() if row.startswith("GPU decode's vectors"))
    assert agreement.rstrip().endswith("yes")
    sent_back = next(row for row in out.splitlines() if row.startswith("files sent back"))
    assert "2 of 2" in sent_back and sent_back.rstrip().endswith("yes")
    assert not list(tmp_path.glob("clipdex-speed-gpu-*"))  # its photos and libraries are gone
