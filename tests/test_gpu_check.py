"""The GPU check script runs its three paths (bf16, FSDP, QLoRA) end to end; on CPU here."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_paths_run_on_cpu(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--device", "cpu", "--model", "tiny",
         "--steps", "2", "--prompts", "2", "--group-size", "4", "--max-new-tokens", "8", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [r["path"] for r in rows] == ["bf16", "fsdp", "qlora"]
    for row in rows:
        assert row["updates"] == 2 and row["final_phase"] == 2 and row["sample_tokens_per_s"] > 0
    assert "peak GiB" in proc.stdout


def test_gpu_check_refuses_to_run_without_cuda_on_gpu_mode():
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py")], capture_output=True, text=True)
    if proc.returncode == 0:
        pytest.skip("a CUDA device is visible")
    assert "no CUDA device visible" in proc.stderr
