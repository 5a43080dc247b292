"""Reasoning-behaviour analysis: SEAL thought classification, the project's behaviour counters,
the training callback and the plot script (docs/analysis.md)."""

from __future__ import annotations

import csv
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from helpers import PatternReward, make_datamodule, make_module, make_trainer
from prerl.analysis.behaviours import (
    COUNT_KEYS,
    behaviour_counts,
    classify_thought,
    split_thoughts,
    summarize_behaviours,
)
from prerl.callbacks import BehaviourLogger
from prerl.objectives import ConditionalRL

ROOT = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------------------------
# split_thoughts
# ---------------------------------------------------------------------------------------------


def test_split_on_blank_lines_strips_and_drops_empty():
    assert split_thoughts("") == []
    assert split_thoughts("\n\n  \n") == []
    assert split_thoughts("one line") == ["one line"]
    assert split_thoughts("a\nstill a\n\nb") == ["a\nstill a", "b"]
    assert split_thoughts("\n\n  a  \n\n\n\n b \n\n") == ["a", "b"]  # several blank lines: one break
    assert split_thoughts("a\n   \t\nb") == ["a", "b"]  # a whitespace-only line is blank


def test_split_windows_and_old_mac_line_endings():
    assert split_thoughts("a\r\nstill a\r\n\r\nb\r\n\r\n\r\nc") == ["a\nstill a", "b", "c"]
    assert split_thoughts("a\r\rb") == ["a", "b"]


# ---------------------------------------------------------------------------------------------
# classify_thought (SEAL)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "thought, kind",
    [
        ("Wait, I forgot the factor of 2.", "reflection"),
        ("wait... is that right?", "reflection"),
        ("WAIT. Recompute.", "reflection"),
        ("  Wait, leading spaces", "reflection"),
        ("So 3 + 4 = 7. Let me check: 7 - 4 = 3.", "reflection"),
        ("We should VERIFY the bound.", "reflection"),
        ("Hold on, the sign flips.", "reflection"),
        ("That’s correct.", "reflection"),  # typographic apostrophe
        ("This seems right to me.", "reflection"),
        ("Let me make sure the units match.", "reflection"),
        ("I think again about the base case.", "reflection"),
        ("Alternatively, use the quadratic formula.", "transition"),
        ("alternatively we factor it.", "transition"),
        ("There is another way to see it.", "transition"),
        ("Let's try Another Approach: induction.", "transition"),
        ("We should think differently here.", "transition"),
        ("Another method is to complete the square.", "transition"),
        ("Compute 3 + 4 = 7.", "execution"),
        ("", "execution"),
        ("Waiting for the series to converge, we sum the terms.", "execution"),  # not the word "Wait"
        ("The answer is 7, but wait for the next step.", "execution"),  # "wait" mid-sentence
        ("We could do it alternatively by hand.", "execution"),  # "alternatively" not first
    ],
)
def test_classify_thought(thought, kind):
    assert classify_thought(thought) == kind


def test_reflection_wins_over_transition():
    assert classify_thought("Alternatively, let me check it another way.") == "reflection"
    assert classify_thought("Wait, there is another approach.") == "reflection"


# ---------------------------------------------------------------------------------------------
# behaviour counters (the project's own lists)
# ---------------------------------------------------------------------------------------------

RESPONSE = """To solve this problem, we need to find x such that x^2 = 9.

Step 1: take square roots.

Case 1: x = 3. Case 2: x = -3.

Let me check: plug it back in, 3^2 = 9 and (-3)^2 = 9. Both work.

Wait, the problem says x > 0. That's wrong, I made a mistake: let me go back.

Alternatively, note that x = 3 is the only positive root.

So the answer is \\boxed{3}."""


def test_behaviour_counts_on_a_hand_written_response():
    counts = behaviour_counts(RESPONSE)
    assert list(counts) == list(COUNT_KEYS)
    assert counts == {
        "thoughts": 7,
        "reflection": 2,  # "Let me check ...", "Wait, ..."
        "transition": 1,  # "Alternatively, ..."
        "execution": 4,
        "subgoal_setting": 2,  # "To solve this problem, we need to", "Step 1:"
        "enumeration": 1,  # "Case 1: ... Case 2:" (one thought)
        "verification": 1,  # "Let me check: plug it back in"
        "backtracking": 1,  # "That's wrong, I made a mistake: let me go back"
    }
    assert counts["reflection"] + counts["transition"] + counts["execution"] == counts["thoughts"]


@pytest.mark.parametrize(
    "text, key",
    [
        ("First, we need to compute the area.", "subgoal_setting"),
        ("Let's break this problem down into parts.", "subgoal_setting"),
        ("## Step 2: Simplify", "subgoal_setting"),
        ("Our goal is to bound the sum.", "subgoal_setting"),
        ("Let's list all the divisors of 12.", "enumeration"),
        ("The possible values of n are 1, 2 and 3.", "enumeration"),
        ("We try them one by one.", "enumeration"),
        ("Case (a): n is even.", None),  # "Case (a)" has no "Case a:" form: not counted
        ("Case a: n is even.", "enumeration"),
        ("Let's double-check the arithmetic.", "verification"),
        ("Substituting back, 2*3 = 6, which confirms the result.", "verification"),
        ("We can check whether it satisfies the equation.", "verification"),
        ("This doesn't work, so let me try again.", "backtracking"),
        ("Oops, the sign is wrong.", "backtracking"),
        ("Let me reconsider the constraint.", "backtracking"),
        ("That can't be right.", "backtracking"),
        ("Multiply 6 by 7 to get 42.", None),
        ("1. Add the numbers.\n2. Divide by two.", None),  # a plain numbered list is not a subgoal
    ],
)
def test_each_counter_fires_on_its_phrases(text, key):
    counts = behaviour_counts(text)
    fired = {k for k in ("subgoal_setting", "enumeration", "verification", "backtracking") if counts[k]}
    assert fired == ({key} if key else set())


def test_counters_count_thoughts_not_matches():
    assert behaviour_counts("Let me check. Let me check. Verify.")["verification"] == 1
    assert behaviour_counts("Let me check.\n\nLet me verify.")["verification"] == 2


def test_empty_response_counts_zero():
    assert behaviour_counts("") == dict.fromkeys(COUNT_KEYS, 0)
    assert behaviour_counts("\r\n\r\n") == dict.fromkeys(COUNT_KEYS, 0)


# ---------------------------------------------------------------------------------------------
# summarize_behaviours
# ---------------------------------------------------------------------------------------------


def test_summarize_empty_list_is_all_zeros():
    summary = summarize_behaviours([])
    assert summary["responses"] == 0.0
    assert all(v == 0.0 for v in summary.values())
    assert {"thoughts", "reflection_frac", "backtracking_frac"} <= summary.keys()
    assert summarize_behaviours(["", "  "])["reflection_frac"] == 0.0  # no thoughts: no 0/0


def test_summarize_means_and_pooled_fractions():
    texts = ["Wait, no.\n\nCompute 2.", "Alternatively, 3.\n\nCompute.\n\nCompute.\n\nLet me verify.", ""]
    s = summarize_behaviours(texts)
    assert s["responses"] == 3
    assert s["thoughts"] == pytest.approx(6 / 3)
    assert s["reflection"] == pytest.approx(2 / 3)
    assert s["transition"] == pytest.approx(1 / 3)
    assert s["reflection_frac"] == pytest.approx(2 / 6)  # pooled: 2 reflections over 6 thoughts
    assert s["transition_frac"] == pytest.approx(1 / 6)
    assert s["execution_frac"] == pytest.approx(3 / 6)
    assert s["reflection_frac"] + s["transition_frac"] + s["execution_frac"] == pytest.approx(1)
    assert s["verification_frac"] == pytest.approx(1 / 6)


# ---------------------------------------------------------------------------------------------
# BehaviourLogger
# ---------------------------------------------------------------------------------------------


class RecordingLogger:
    def __init__(self):
        self.calls = []

    def log_metrics(self, metrics, step):
        self.calls.append((step, dict(metrics)))


def _fake(step, texts, rewards=None):
    logger = RecordingLogger()
    trainer = SimpleNamespace(
        global_step=step + 1, world_size=1, loggers=[logger],
        fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(_batches_that_stepped=step)),
    )
    rollout = SimpleNamespace(texts=texts, rewards=None if rewards is None else torch.tensor(rewards), group_size=2)
    return trainer, SimpleNamespace(last_rollout=rollout), logger


def test_callback_with_hand_written_texts_and_reward_split():
    texts = ["Wait, recheck.\n\nSo 4.", "Compute 4.", "Alternatively, 5.", "Let me verify it."]
    trainer, module, logger = _fake(0, texts, rewards=[1.0, 0.0, 0.0, 1.0])
    BehaviourLogger(every_n_steps=2).on_train_batch_end(trainer, module, None, None, 0)
    [(step, m)] = logger.calls
    assert step == 0
    assert m["z_behaviour/responses"] == 4 and m["z_behaviour/thoughts"] == pytest.approx(5 / 4)
    assert m["z_behaviour/reflection"] == pytest.approx(2 / 4)
    assert m["z_behaviour/transition_frac"] == pytest.approx(1 / 5)
    assert m["z_behaviour/correct/responses"] == 2 and m["z_behaviour/correct/reflection"] == 1.0
    assert m["z_behaviour/wrong/responses"] == 2 and m["z_behaviour/wrong/transition"] == 0.5
    assert m["z_behaviour/wrong/reflection"] == 0.0
    summary_keys = summarize_behaviours([]).keys()
    assert set(m) == {f"z_behaviour/{p}{k}" for p in ("", "correct/", "wrong/") for k in summary_keys}


def test_callback_skips_other_steps_and_empty_splits():
    cb = BehaviourLogger(every_n_steps=2)
    trainer, module, logger = _fake(1, ["Wait."], rewards=[0.0])
    cb.on_train_batch_end(trainer, module, None, None, 0)
    assert logger.calls == []  # step 1: not a multiple of 2
    trainer, module, logger = _fake(2, ["Wait."], rewards=[0.0])
    cb.on_train_batch_end(trainer, module, None, None, 0)
    cb.on_train_batch_end(trainer, module, None, None, 0)  # same step again: once
    [(step, m)] = logger.calls
    assert step == 2 and m["z_behaviour/reflection"] == 1.0
    assert not any(k.startswith("z_behaviour/correct/") for k in m)  # no right answer: no split row
    assert m["z_behaviour/wrong/responses"] == 1
    trainer, module, logger = _fake(4, ["x"])
    cb.on_train_batch_end(trainer, module, None, None, 0)  # no rewards: no split at all
    assert set(logger.calls[0][1]) == {f"z_behaviour/{k}" for k in summarize_behaviours([])}
    trainer, module, logger = _fake(6, [])
    module.last_rollout = None
    cb.on_train_batch_end(trainer, module, None, None, 0)
    assert logger.calls == []
    with pytest.raises(ValueError):
        BehaviourLogger(every_n_steps=0)


def _tiny_run(folder: Path, max_steps: int, every: int, seed: int = 0, tensorboard: bool = False):
    L.seed_everything(seed)
    module = make_module(ConditionalRL(), reward=PatternReward((1.0, 0.0)))
    dm = make_datamodule(module.tokenizer)
    module.configure_model()
    loggers = [CSVLogger(folder, name="csv", version="")]
    if tensorboard:
        loggers.append(TensorBoardLogger(folder, name="tensorboard", version="", default_hp_metric=False))
    trainer = make_trainer(max_steps, [BehaviourLogger(every_n_steps=every)], logger=loggers, log_every_n_steps=1)
    trainer.fit(module, datamodule=dm)
    for logger in loggers:
        logger.save()
    return module


def _rows(folder: Path):
    return list(csv.DictReader(open(folder / "csv" / "metrics.csv")))


def test_callback_on_a_tiny_run_logs_on_the_right_steps(tmp_path):
    module = _tiny_run(tmp_path, max_steps=5, every=2)
    rows = _rows(tmp_path)
    logged = {int(r["step"]): r for r in rows if r.get("z_behaviour/thoughts") not in (None, "")}
    assert sorted(logged) == [0, 2, 4]  # the logging steps of the batches 1, 3, 5
    train_steps = sorted(int(r["step"]) for r in rows if r.get("train/accuracy") not in (None, ""))
    assert train_steps == [0, 1, 2, 3, 4]  # the same step numbers as the module's train/* metrics
    last = logged[4]
    expected = summarize_behaviours(module.last_rollout.texts)  # the last batch's own rollout
    for key, value in expected.items():
        assert float(last[f"z_behaviour/{key}"]) == pytest.approx(value, rel=1e-6)
    # PatternReward (1, 0): half the responses are right, so both splits are there.
    assert float(last["z_behaviour/correct/responses"]) == float(last["z_behaviour/wrong/responses"]) > 0
    # Nothing stale: no behaviour value in the rows of the other steps.
    for r in rows:
        if int(r["step"]) not in logged:
            assert all(r.get(k) in (None, "") for k in r if k.startswith("z_behaviour/"))


def test_plot_script_writes_a_png_from_two_runs(tmp_path):
    _tiny_run(tmp_path / "a", max_steps=2, every=1, seed=0, tensorboard=True)
    _tiny_run(tmp_path / "b", max_steps=2, every=1, seed=1)  # CSV only
    out = tmp_path / "plots" / "behaviours.png"
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "plot_behaviours.py"), str(tmp_path / "a"), str(tmp_path / "b"),
         "--out", str(out), "--stat", "frac"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import plot_behaviours
    finally:
        sys.path.pop(0)
    curves = plot_behaviours.read_run(tmp_path / "a", ["z_behaviour/reflection_frac"])
    assert sorted(curves["z_behaviour/reflection_frac"]) == [0, 1]
    assert all(not math.isnan(v) for v in curves["z_behaviour/reflection_frac"].values())
    # A run logged before the family was renamed (behaviour/*) reads under the new keys.
    legacy = tmp_path / "old" / "csv"
    legacy.mkdir(parents=True)
    (legacy / "metrics.csv").write_text("step,behaviour/reflection_frac\n0,0.25\n3,0.5\n")
    assert plot_behaviours.read_run(tmp_path / "old", ["z_behaviour/reflection_frac"]) == {
        "z_behaviour/reflection_frac": {0: 0.25, 3: 0.5}}


def test_evaluation_logs_behaviours_under_the_training_family():
    from prerl.callbacks.behaviours import FAMILY
    from prerl.evaluation.report import log_to_loggers

    logger = RecordingLogger()
    logger.save = lambda: None
    log_to_loggers([logger], {"aime": {"metrics": {"avg@2": 0.5}, "behaviours": {"reflection": 1.0}}})
    [(step, scalars)] = logger.calls
    assert scalars == {"aime/avg@2": 0.5, f"{FAMILY}/aime/reflection": 1.0}
