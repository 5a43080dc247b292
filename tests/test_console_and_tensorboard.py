"""What a user sees: a smoke run's console carries no warning, the alignment probe prints its own
lines, and TensorBoard opens on the RL story (train/, val/) with every point at the number of
updates of the policy it measures."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import open_dict
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from helpers import make_datamodule, make_module, make_trainer
from prerl.callbacks import BehaviourLogger, TextSamples
from prerl.callbacks.text_samples import WIDTH, format_samples
from prerl.loggers import TensorBoardLogger
from prerl.objectives import ConditionalRL
from prerl.train import train

ROOT = Path(__file__).resolve().parents[1]
NOISE = re.compile(r"warn|💡|tip:", re.IGNORECASE)


def _noisy_lines(output: str, allowed: tuple[str, ...] = ()) -> list[str]:
    lines = re.split(r"[\r\n]+", output)  # the progress bar redraws its line with \r
    return [line for line in lines if NOISE.search(line) and not any(a in line for a in allowed)]


def test_smoke_run_console_has_no_warning_lines(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "src" / "train.py"), "experiment=smoke", "trainer.max_steps=2",
         "validate_before=false", f"paths.log_dir={tmp_path}"],
        capture_output=True, text=True, timeout=300,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    # prerl's own note, on purpose: the smoke run's 2 updates end before DSRL's switch step (20).
    dsrl_note = "[prerl.callbacks.phase_switch][WARNING] - DSRL: objective.switch_step=20 >= trainer.max_steps=2"
    assert _noisy_lines(output, allowed=(dsrl_note,)) == []
    # No Lightning model summary (validation metrics as rows, FLOPs of 0); the module's one line instead.
    assert "Total FLOPs" not in output and "val_accuracy" not in output
    assert "policy: LlamaForCausalLM, 107,200 trainable / 107,200 total" in output


def test_alignment_probe_prints_its_own_lines(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "alignment_probe.py"), "experiment=smoke", "--prompts", "2",
         "--samples", "2", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert _noisy_lines(output) == []
    assert "prerl.data.datamodule" not in output  # the training batches it would build
    assert "sampled 4 pairs from 2 val prompts" in output


def _steps(run: Path) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
    """The steps of each scalar tag and of each text tag of a run's TensorBoard events."""
    [folder] = {p.parent for p in run.rglob("events.out.tfevents.*")}
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    return ({tag: [e.step for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]},
            {tag: [e.step for e in events.Tensors(tag)] for tag in events.Tags()["tensors"]})


def test_tensorboard_opens_on_train_and_val_at_the_update_counts(tmp_path):
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[
            "experiment=smoke", "trainer.max_steps=4", "trainer.val_check_interval=2",
        ])
    with open_dict(cfg):
        cfg.paths.output_dir = cfg.paths.log_dir = str(tmp_path)
    train(cfg)
    steps, texts = _steps(tmp_path)

    # TensorBoard sorts tag groups alphabetically and opens the first two.
    assert sorted({tag.split("/")[0] for tag in steps}) == ["train", "val", "z_behaviour"]
    updates = [0, 1, 2, 3]  # train/* of each batch at the updates made before it
    assert steps["train/accuracy"] == updates
    # Before training, in fit after 2 and 4 updates, and the final validation after 4.
    assert steps["val/avg@2"] == [0, 2, 4, 4]
    assert texts == {"samples/text_summary": updates}  # smoke: text samples every update
    assert steps["z_behaviour/thoughts"] == [0]  # every 5 batches: the first one
    # One name per quantity: the update's rows vs every response of the rollout.
    assert {"train/entropy/marginal", "train/rollout_entropy/conditional", "train/rollout_entropy/marginal"} <= set(steps)
    assert not any(tag.startswith(("train/entropy_", "behaviour/")) for tag in steps)


def test_text_samples_are_wrapped_markdown_with_reward_and_answer_first():
    response = "Let me compute | step ```by``` step. " * 20 + "\n\nSo the answer is \\boxed{42}."
    sample = {"id": "p1", "question": "What is 6 x 7?", "gold": "42", "response": response,
              "extracted": "42", "reward": 1.0}
    text = format_samples([sample, {**sample, "extracted": None, "reward": 0.0}])
    lines = text.splitlines()
    assert lines[:4] == ["| # | reward | extracted | gold | problem |", "|---|---|---|---|---|",
                         "| 1 | 1 | `42` | `42` | `p1` |", "| 2 | 0 | - | `42` | `p1` |"]
    assert "**#1** reward 1, extracted `42`, gold `42`" in text
    # The response's own ``` cannot close the block: the fence is longer than any backtick run.
    assert text.count("```text\nWhat is 6 x 7?\n```\n") == 2 and text.count("````text\nLet me") == 2
    assert text.endswith("So the answer is \\boxed{42}.\n````")
    assert max(len(line) for line in lines) <= WIDTH
    assert "".join(line for line in lines if "compute" in line or "step" in line).count("compute") == 40


def test_steps_count_updates_when_a_batch_makes_several(tmp_path):
    """Two optimizer updates per rollout batch: Lightning's own logging step would count batches
    (0, 1) while the switch step, checkpoints and the alignment probe count updates."""
    module = make_module(ConditionalRL(), update={"mini_batches": 2, "micro_batch_size": 2})
    logger = TensorBoardLogger(tmp_path, name="tb", version="")
    trainer = make_trainer(4, [TextSamples(every_n_steps=1), BehaviourLogger(every_n_steps=1)], logger=logger,
                           log_every_n_steps=1, limit_val_batches=1, val_check_interval=1)
    trainer.fit(module, datamodule=make_datamodule(module.tokenizer))
    logger.save()
    steps, texts = _steps(tmp_path)
    assert trainer.global_step == 4
    assert steps["train/accuracy"] == steps["z_behaviour/thoughts"] == texts["samples/text_summary"] == [0, 2]
    assert steps["val/avg@2"] == [2, 4]  # after each batch's two updates
    assert "epoch" not in steps
