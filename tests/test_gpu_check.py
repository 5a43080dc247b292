"""The GPU check script runs its three paths (bf16, FSDP, QLoRA) and the GPU presets at a reduced
shape end to end; on CPU here (measured memory '-', the estimator's figure next to it)."""

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.py"


def _run(args, tmp_path):
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--model", "tiny", "--out", str(tmp_path), *args],
        capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, json.loads((tmp_path / "gpu_check.json").read_text())


@pytest.mark.slow
def test_gpu_check_paths_and_presets_run_on_cpu(tmp_path):
    """The three code paths train 2 updates each (both DSRL phases); every GPU preset trains 2
    updates and validates one batch at a reduced shape, with an estimate for the same config."""
    proc, result = _run(["--steps", "2", "--prompts", "2", "--group-size", "4", "--max-new-tokens", "8",
                         "--preset-steps", "2", "--preset-prompts", "2", "--preset-val-problems", "1",
                         "--preset-max-new-tokens", "16", "--preset-prompt-len", "128"], tmp_path)
    rows = result["paths"]
    assert [r["path"] for r in rows] == ["bf16", "fsdp", "qlora"]
    for row in rows:
        assert row["updates"] == 2 and row["final_phase"] == 2 and row["sample_tokens_per_s"] > 0
    assert "peak GiB" in proc.stdout
    rows = result["presets"]
    assert [r["preset"] for r in rows] == ["dsrl_qwen3_4b", "qlora_qwen3_4b_24gb", "dsrl_qwen3_1p7b_1gpu"]
    for row in rows:
        assert row["updates"] == 2 and row["final_phase"] == 2 and row["peak_gpu_mem_gib"] is None
        assert 0 < row["estimate_gib"] < 1 and row["estimate_phase"] in row["estimate_phases_gib"]
        assert any(k.startswith("validation") for k in row["estimate_phases_gib"])
        assert row["val_metrics"]  # the validation batch ran
    table = proc.stdout[proc.stdout.index("measured GiB"):]
    assert "dsrl_qwen3_4b" in table and " - " in table
    assert "python scripts/estimate_memory.py experiment=qlora_qwen3_4b_24gb model=tiny" in proc.stdout


def test_preset_overrides_keep_the_presets_training_regime():
    """The stand-in model keeps the preset's dtype, QLoRA and checkpointing; the preset's
    generation batches, token budget and chunking stay; one device."""
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    from tools.estimate_config import setup_from_config

    args = argparse.Namespace(
        model="smollm2", device="gpu", data=None, preset_steps=3, preset_prompts=4, preset_val_problems=2,
        preset_prompt_len=512, preset_max_new_tokens=256)
    cfg = gpu_check.compose_train(gpu_check.preset_overrides("qlora_qwen3_4b_24gb", args))
    assert cfg.model._target_ == "prerl.models.SmolLM2Spec" and cfg.model.quantization.type == "nf4"
    s = setup_from_config(cfg)
    assert (s.preset, s.lora_r, s.dtype, s.gradient_checkpointing, s.autocast) == ("qlora", 16, "bf16", True, True)
    assert (s.gpus, s.prompts_per_step, s.response_len, s.generation_batch) == (1, 4, 256, 32)
    assert (s.max_tokens_per_micro_batch, s.logprob_chunk_tokens, s.scoring) == (12288, 1024, "entropy")
    four = setup_from_config(gpu_check.compose_train(gpu_check.preset_overrides("dsrl_qwen3_4b", args)))
    assert (four.fsdp, four.gpus, four.dtype, four.val_samples, four.val_generation_batch) == (True, 1, "fp32", 20, 40)
    assert "model_checkpoint" not in (gpu_check.compose_train(gpu_check.preset_overrides("dsrl_qwen3_4b", args)).callbacks or {})


def test_gpu_check_refuses_to_run_without_cuda_on_gpu_mode():
    proc = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True)
    if proc.returncode == 0:
        pytest.skip("a CUDA device is visible")
    assert "no CUDA device visible" in proc.stderr
