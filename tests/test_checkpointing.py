"""Fault-tolerant training state: atomic writes, corrupt-checkpoint fallback, exact resume,
adapter-only LoRA checkpoints, SIGTERM saves, Hugging Face export."""

import csv
import json
import os
import signal
import time

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from transformers import AutoModelForCausalLM

from prerl.checkpointing import AtomicCheckpointIO, is_valid_checkpoint, resolve_checkpoint
from prerl.export import main as export_main
from prerl.export import load_policy
from prerl.train import train
from test_configs import compose_train


# ------------------------------------------------------------------ atomic writes, validity
def test_atomic_save_keeps_previous_checkpoint_when_killed_mid_write(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.ones(3)}, path)
    real_save = torch.save

    def dying_save(obj, f, *a, **k):
        f.write(b"PK\x03\x04 partial")
        raise KeyboardInterrupt  # the process is killed half-way

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": 2, "w": torch.zeros(3)}, path)
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.load(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_truncated_checkpoint_is_detected_and_the_previous_one_used(tmp_path):
    io = AtomicCheckpointIO()
    old, new = tmp_path / "step00002.ckpt", tmp_path / "last.ckpt"
    io.save_checkpoint({"global_step": 2, "prerl_state": {}, "state_dict": {"w": torch.randn(1000)}}, old)
    time.sleep(0.05)
    io.save_checkpoint({"global_step": 4, "prerl_state": {}, "state_dict": {"w": torch.randn(1000)}}, new)
    assert is_valid_checkpoint(new) and resolve_checkpoint(tmp_path) == str(new)
    data = new.read_bytes()
    new.write_bytes(data[: len(data) // 2])  # e.g. a copy interrupted by a full disk
    assert not is_valid_checkpoint(new)
    assert resolve_checkpoint(new) == str(old)
    assert resolve_checkpoint(tmp_path) == str(old)
    old.write_bytes(b"garbage")
    with pytest.raises(FileNotFoundError, match="no valid checkpoint"):
        resolve_checkpoint(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_checkpoint(tmp_path / "nope.ckpt")


# ------------------------------------------------------------------ resume equivalence
def _metrics(run_dir):
    rows = list(csv.DictReader(open(run_dir / "csv" / "metrics.csv")))
    by_step = {}
    for row in rows:
        if row.get("train/loss"):
            by_step[int(row["step"])] = {k: float(v) for k, v in row.items() if v and k.startswith("train/")}
    return by_step


def _smoke(tmp, steps, *extra):
    overrides = ["experiment=smoke", "objective=dual", "objective.switch_step=2", "logger=csv",
                 f"trainer.max_steps={steps}", "validate_before=false", "validate_after=false",
                 "module.diagnostics_every_n_steps=0", *extra]
    return compose_train(overrides, output_dir=tmp)


@pytest.mark.slow
def test_resumed_run_matches_uninterrupted_run_across_the_dsrl_switch(tmp_path):
    full_dir, first_dir, resumed_dir = tmp_path / "full", tmp_path / "first", tmp_path / "resumed"
    train(_smoke(full_dir, 5))
    train(_smoke(first_dir, 2))  # checkpoints at step 2, in phase 1 (switch at S=2)
    saved = torch.load(first_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert saved["prerl_state"]["phase"] == 0 and saved["global_step"] == 2
    assert saved["PromptDataModule"] == {"epoch": 0, "batches": 2}  # the data position
    train(_smoke(resumed_dir, 5, f"ckpt_path={first_dir / 'checkpoints'}"))
    full, resumed = _metrics(full_dir), _metrics(resumed_dir)
    assert sorted(resumed) == [2, 3, 4]
    for step in (2, 3, 4):
        for key in ("train/reward_mean", "train/loss", "train/response_len_mean", "train/phase", "train/grad_norm"):
            assert resumed[step][key] == pytest.approx(full[step][key], rel=1e-5, abs=1e-6), (step, key)
    assert [full[s]["train/phase"] for s in range(5)] == [1, 1, 2, 2, 2]
    a = torch.load(full_dir / "checkpoints" / "last.ckpt", weights_only=False)
    b = torch.load(resumed_dir / "checkpoints" / "last.ckpt", weights_only=False)
    for key, value in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][key], value)


# ------------------------------------------------------------------ LoRA, SIGTERM, export
LORA = "model.lora={r:4,alpha:8,dropout:0.0}"


def test_lora_checkpoints_hold_adapters_only_and_export_loads_with_transformers(tmp_path):
    run = tmp_path / "run"
    train(_smoke(run, 2, LORA))
    ckpt = run / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, weights_only=False)["state_dict"]
    assert state and all("lora_" in key for key in state), sorted(state)[:5]
    # the export rebuilds the model from the run's config: write it where Hydra would
    (run / ".hydra").mkdir()
    from omegaconf import OmegaConf

    OmegaConf.save(_smoke(run, 2, LORA), run / ".hydra" / "config.yaml")
    policy, tokenizer = load_policy(ckpt)
    out = export_main([str(ckpt), str(tmp_path / "merged")])
    merged = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.tensor([tokenizer("What is 2 + 2?")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, policy(input_ids=ids).logits, atol=1e-4, rtol=1e-4)
    # an adapter checkpoint that lost a tensor is refused
    bad = {k: v for i, (k, v) in enumerate(state.items()) if i}
    full = torch.load(ckpt, weights_only=False)
    full["state_dict"] = bad
    torch.save(full, tmp_path / "bad.ckpt")
    with pytest.raises(KeyError, match="lacks 1 required tensors"):
        train(_smoke(tmp_path / "again", 3, LORA, f"ckpt_path={tmp_path / 'bad.ckpt'}"))


class SendSigterm(Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # handled by Lightning's handler: sets a flag


def test_sigterm_saves_a_checkpoint_before_exiting(tmp_path, monkeypatch):
    import prerl.train as train_lib

    original = train_lib.instantiate_group
    monkeypatch.setattr(
        train_lib, "instantiate_group",
        lambda cfg, where="callbacks": original(cfg, where) + ([SendSigterm()] if cfg and "fault_checkpoint" in cfg else []),
    )
    summary = train(_smoke(tmp_path, 10))
    assert summary["status"] == "preempted" and summary["global_step"] == 2
    saved = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert saved["global_step"] == 2  # the step under way when the signal came was kept
    assert json.loads((tmp_path / "summary.json").read_text())["checkpoint"] == str(tmp_path / "checkpoints" / "last.ckpt")
