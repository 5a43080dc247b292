"""The benchmarks run end to end in their tiny modes and print every figure (no timing assertions)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("trl") is None, reason="needs the bench extra: pip install -e '.[bench]'")
def test_grpo_vs_trl_tiny_mode_prints_every_figure(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import grpo_vs_trl as bench
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    out = tmp_path / "result.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "grpo_vs_trl.py"), "--model", "tiny", "--steps", "2",
         "--repeats", "1", "--threads", "1", "--device", "cpu", "--json", str(out)],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = proc.stdout
    for label in ("ours GRPO", "TRL GRPO", "ours NSR-PreRL", "TRL 1.16.0", "step 0 rollout"):
        assert label in text, label
    for key, label, _ in bench.STEP_FIGURES + bench.RUN_FIGURES:
        if not key.startswith("cuda"):  # GPU rows only on a GPU
            assert label in text, label
    for _, label, *_ in bench.TARGETS:
        assert label in text and "target" in text, label
    assert text.count("target met") + text.count("target missed") == len(bench.TARGETS)

    result = json.loads(out.read_text())
    assert set(result["summary"]) == set(bench.SYSTEMS)
    for system, figures in result["summary"].items():
        for key, _, _ in bench.STEP_FIGURES + bench.RUN_FIGURES:
            assert key in figures, (system, key)
            if key == "other_s" and system == "trl_grpo" or key.startswith("cuda"):
                continue  # TRL's update is the rest of its step; GPU figures only on a GPU
            assert figures[key] is not None and {"median", "min", "max", "n"} <= set(figures[key]), (system, key)
    assert set(result["targets"]) == {key for key, *_ in bench.TARGETS}
    assert all(goal["ratio"] is not None and goal["met"] in (True, False) for goal in result["targets"].values())
    assert set(result["first_rollout_check"]) == {
        "ours_gen_tokens", "trl_gen_tokens", "ours_reward_mean", "trl_reward_mean", "identical"}
    trl_settings = result["runs"]["trl_grpo"][0]["settings"]
    assert trl_settings["loss_type"] == "dapo" and trl_settings["beta"] == 0.0 and trl_settings["bf16"] is False
    assert trl_settings["generation"]["top_k"] == 0 and trl_settings["gradient_checkpointing"] is False
    assert all(run["threads"] == 1 for runs in result["runs"].values() for run in runs)


def test_profile_step_finds_every_part_of_a_tiny_step(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    dump = tmp_path / "step.pstats"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "profile_step.py"), "experiment=smoke", "objective=grpo",
         "--steps", "2", "--threads", "1", "--dump", str(dump)],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import pstats

        from profile_step import PARTS, parts
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    found = dict(parts(pstats.Stats(str(dump))))
    for label, *_ in PARTS:
        assert label in proc.stdout, label
    # the parts a GRPO step must contain were found in the profile, and they nest
    for label in ("training_step (all)", "sampling: generate", "update: all", "update: backward", "rewards"):
        assert found[label] > 0, label
    assert found["update: backward"] < found["update: all"] < found["training_step (all)"]
