"""The GPU check script: its engine-mode settings on random Qwen3 folders (tiny shapes here), its
budget guard, the memory-bound arithmetic by hand; its three paths (bf16, FSDP, QLoRA) and the GPU
presets at a reduced shape end to end; on CPU here (measured memory '-', the estimator's figure next to it)."""

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.py"
GPU_PRESETS = ("dsrl_qwen3_4b", "qlora_qwen3_4b_24gb", "dsrl_qwen3_1p7b_1gpu")


def _load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    return gpu_check


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
    proc, result = _run(["--settings", "", "--paths", "bf16,fsdp,qlora", "--presets", ",".join(GPU_PRESETS),
                         "--steps", "2", "--prompts", "2", "--group-size", "4", "--max-new-tokens", "8",
                         "--preset-steps", "2", "--preset-prompts", "2", "--preset-val-problems", "1",
                         "--preset-max-new-tokens", "16", "--preset-prompt-len", "128"], tmp_path)
    rows = result["paths"]
    assert [r["path"] for r in rows] == ["bf16", "fsdp", "qlora"]
    for row in rows:
        assert row["updates"] == 2 and row["final_phase"] == 2 and row["sample_tokens_per_s"] > 0
    assert "peak GiB" in proc.stdout
    rows = result["presets"]
    assert [r["preset"] for r in rows] == list(GPU_PRESETS)
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
    gpu_check = _load_script()
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


def test_engine_modes_on_random_qwen3_folders(tmp_path):
    """Both settings (the 1.7B preset's regime, QLoRA) on tiny Qwen3 folders with the real
    vocabulary: a warm-up update, then one update per mode, each with every figure of the table; a
    failing item (an unknown preset) is recorded and the check still ends normally."""
    proc, result = _run(["--modes", "generate,refill-bf16", "--prompts", "2", "--group-size", "2",
                         "--max-new-tokens", "4", "--prompt-len", "32", "--presets", "no_such_preset"], tmp_path)
    assert [r["preset"] for r in result["failed"]] == ["no_such_preset"] and "FAILED" in proc.stdout
    chip = result["chip"]
    assert chip["matmul_tflops"] > 0 and chip["copy_gb_per_s"] > 0
    # the log-prob paths' bytes per logit: on CPU the estimator's own constants, measured the same way
    assert len(chip["logits_bytes"]) == 8 and all(0.95 <= r["ratio"] <= 1.05 for r in chip["logits_bytes"])
    assert "chunked train + entropy" in proc.stdout and "bytes/logit" in proc.stdout
    assert [r["setting"] for r in result["settings"]] == ["qwen3-1.7b", "qwen3-4b-qlora"]
    for row in result["settings"]:
        config = json.loads((Path(row["folder"]) / "config.json").read_text())
        assert config["architectures"] == ["Qwen3ForCausalLM"] and config["vocab_size"] == 151936
        assert [m["mode"] for m in row["modes"]] == ["generate (warm-up)", "generate", "refill-bf16"]
        assert row["skipped_modes"] == [] and row["peak_gpu_mem_gib"] is None and row["estimate_gib"] > 0
        assert set(row["measured_phases_gib"].values()) == {None}  # no peak counter on CPU
        groups = row["estimate_groups_gib"]
        assert 0 < groups["rollout"] <= row["estimate_gib"] and 0 < groups["update"] <= row["estimate_gib"]
        assert row["estimate_gib"] in groups.values()  # the largest phase is in one of the groups
        budget = row["update_token_budget"]  # --update-budget largest (default): on CPU, the preset's declared GPU
        assert budget > 0 and f"module.update.max_tokens_per_micro_batch={budget}" in row["overrides"]
        for m in row["modes"]:
            assert m["sequences"] == 4 and m["tokens"] > 0 and m["decode_steps"] >= m["new_tokens_max"] - 1
            for key in ("ms_per_decode_step", "tokens_per_s", "memory_bound_ms", "of_memory_bound", "update_tflops",
                        "update_of_peak"):
                assert 0 < m[key] < float("inf"), (key, m)
            assert m["graphs_compiled"] == 0  # nothing runs compiled in these modes
    table = proc.stdout[proc.stdout.index("chip: fp32 matmul 256^3"):]
    for header in ("ms/step", "tok/s", "of bound", "upd TFLOP/s", "of peak", "graphs", "measured GiB", "estimate GiB",
                   "peak GiB by phase", "rollout meas/est"):
        assert header in table
    assert "qwen3-4b-qlora  refill-bf16" in table and "skipped" not in table


def test_phase_groups_pair_the_module_peaks_with_the_estimators_phases():
    """Each estimator phase falls in exactly one measured group, and each group reads the module's key."""
    gpu_check = _load_script()
    from tools.estimate_config import estimate_run

    est = estimate_run(gpu_check.compose_train(["experiment=dsrl_qwen3_1p7b_1gpu"])).estimate
    groups = gpu_check.estimated_phases(est)
    for phase in est.phases:
        owners = [g for g, prefixes in gpu_check.PHASE_GROUPS.items() if phase.short.startswith(prefixes)]
        assert len(owners) == 1, phase.short
        assert phase.total / 2**30 <= groups[owners[0]] + 1e-3
    update = [p.total for p in est.phases if p.short in ("training", "scoring", "optimizer")]
    assert len(update) >= 2 and groups["update"] == round(max(update) / 2**30, 3)
    summary = {"train_metrics": {"train/memory/rollout_peak_gib": 1.5, "train/memory/update_peak_gib": 2.5},
               "after": {"val/memory/peak_gib": 0.5}}
    assert gpu_check.measured_phases(summary) == {"rollout": 1.5, "update": 2.5, "validation": 0.5}


def test_a_failing_logits_measurement_is_recorded_and_the_check_goes_on(tmp_path, monkeypatch):
    gpu_check = _load_script()

    def broken(*args, **kwargs):
        raise RuntimeError("no such kernel")

    monkeypatch.setattr(gpu_check, "logits_bytes", broken)
    result = gpu_check.main(["--device", "cpu", "--model", "tiny", "--settings", "", "--out", str(tmp_path)])
    assert result["chip"]["logits_bytes_error"] == "RuntimeError: no such kernel"
    assert result["chip"]["matmul_tflops"] > 0 and (tmp_path / "gpu_check.json").exists()


def test_graph_count_sees_a_compile_and_a_recompile_for_a_new_shape():
    """The check's 'graphs' column: a first call compiles one graph, a repeat none, a new shape
    (static shapes, as CUDA graphs need) one more."""
    dynamo_graphs = _load_script().dynamo_graphs
    torch._dynamo.reset()
    double = torch.compile(lambda x: x * 2, backend="eager", dynamic=False)
    counts = [dynamo_graphs()]
    for shape in (3, 3, 5):
        double(torch.ones(shape))
        counts.append(dynamo_graphs())
    assert [b - a for a, b in zip(counts, counts[1:])] == [1, 0, 1]


def test_budget_guard_skips_what_would_start_late(tmp_path):
    proc, result = _run(["--budget-s", "0", "--presets", "dsrl_qwen3_4b"], tmp_path)
    assert result["settings"] == [] and result["presets"] == []
    assert result["skipped"] == ["setting qwen3-1.7b", "setting qwen3-4b-qlora", "preset dsrl_qwen3_4b"]
    assert "skipped: setting qwen3-1.7b" in proc.stdout


def test_real_shapes_and_decode_bytes_by_hand():
    """The folders' configs are Qwen3-1.7B's and Qwen3-4B's (the model cards' 1.4B and 3.6B
    non-embedding parameters); a 1.7B bf16 decode step reads 3.44 GB of weights."""
    gpu_check = _load_script()
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from prerl.flops import ModelShape

    for model, non_embedding in (("qwen3-1.7b", 1.4e9), ("qwen3-4b", 3.6e9)):
        with torch.device("meta"):
            built = Qwen3ForCausalLM(Qwen3Config(**gpu_check.qwen3_config(model, tiny=False)))
        counted = sum(p.numel() for n, p in built.named_parameters() if "embed_tokens" not in n)
        assert round(counted / 1e8) * 1e8 == non_embedding and built.config.tie_word_embeddings
    shape = ModelShape.from_config(Qwen3Config(**gpu_check.qwen3_config("qwen3-1.7b", tiny=False)))
    weights = 28 * (2 * 2048 * 2048 + 2 * 2048 * 1024 + 3 * 2048 * 6144) * 2 + 2048 * 151936 * 2
    assert weights == 3_440_902_144
    kv_per_token = 2 * 28 * 8 * 128 * 2  # keys and values, every layer, bf16
    assert gpu_check.decode_step_bytes(shape, 2.0, 32, 1152) == weights + 32 * 1152 * kv_per_token
    nf4 = gpu_check.decode_step_bytes(shape, 0.5, 32, 1152)
    assert nf4 == weights - 28 * (2 * 2048 * 2048 + 2 * 2048 * 1024 + 3 * 2048 * 6144) * 1.5 + 32 * 1152 * kv_per_token
