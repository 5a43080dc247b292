"""The DSRL switch: adaptive rules on synthetic metric streams, in training, across a resume;
validation's switch diagnostics (rare solutions, entropy)."""

import math

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from helpers import PatternReward, make_datamodule, make_module, make_trainer
from prerl.objectives import ConditionalRL, DualSpaceSchedule, MarginalNSR
from prerl.switch_rules import SwitchRule
from test_update_invariance import ScheduledReward


def _first_fire(rule: SwitchRule, stream) -> int | None:
    for step, value in enumerate(stream, start=1):
        if rule.update(step, value):
            return step
    return None


def test_threshold_rule_fires_when_the_window_mean_crosses():
    stream = [0.1, 0.2, 0.4, 0.6, 0.7, 0.9]
    assert _first_fire(SwitchRule("threshold", "m", value=0.5, window=1), stream) == 4
    assert _first_fire(SwitchRule("threshold", "m", value=0.5, window=2), stream) == 4  # (0.4 + 0.6) / 2
    assert _first_fire(SwitchRule("threshold", "m", value=0.5, window=3), stream) == 5
    assert _first_fire(SwitchRule("threshold", "m", value=0.15, direction="below", window=1), stream) == 1
    assert _first_fire(SwitchRule("threshold", "m", value=0.5, window=1, min_step=5), stream) == 5
    assert _first_fire(SwitchRule("threshold", "m", value=2.0, window=1), stream) is None


def test_growth_rule_compares_with_the_first_window():
    lengths = [40, 40, 42, 48, 52, 60]  # first window of 2: 40; +30% = 52
    assert _first_fire(SwitchRule("growth", "m", value=0.3, window=2), lengths) == 6  # (52 + 60) / 2 = 56
    assert _first_fire(SwitchRule("growth", "m", value=0.3, window=1), lengths) == 5
    shrinking = [50, 50, 40, 30]
    assert _first_fire(SwitchRule("growth", "m", value=0.3, direction="below", window=1), shrinking) == 4


def test_plateau_rule_needs_patience_non_improving_windows():
    accuracy = [0.1, 0.2, 0.4, 0.5, 0.5, 0.51, 0.5, 0.5]  # windows of 2: .15 .45 .505 .5
    assert _first_fire(SwitchRule("plateau", "m", window=2, patience=1, min_delta=0.1), accuracy) == 6
    assert _first_fire(SwitchRule("plateau", "m", window=2, patience=2, min_delta=0.1), accuracy) == 8
    assert _first_fire(SwitchRule("plateau", "m", window=2, patience=1, min_delta=0.0), [0.1, 0.2, 0.3, 0.4]) is None


def test_rules_skip_non_finite_values_and_round_trip_their_state():
    rule = SwitchRule("threshold", "m", value=0.5, window=2)
    assert not rule.update(1, math.nan) and not rule.update(2, 0.4)
    copy = SwitchRule("threshold", "m", value=0.5, window=2)
    copy.load_state_dict(rule.state_dict())
    assert copy.update(3, 0.7) and copy.fired_at == 3  # (0.4 + 0.7) / 2 >= 0.5 with the restored history
    with pytest.raises(ValueError, match="rule='sometimes'"):
        SwitchRule("sometimes", "m")
    with pytest.raises(ValueError, match="window must be >= 1"):
        DualSpaceSchedule(MarginalNSR(), ConditionalRL(), adaptive_switch={"rule": "threshold", "metric": "m", "window": 0})


class Phases(Callback):
    def __init__(self):
        self.seen = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seen.append((trainer.global_step, pl_module.phase))


# train/accuracy per batch: 0, 0, 0.5, 0.5, 0.5, ... (a rule with window 2 at 0.5 fires at step 4)
ACCURACY_PATTERNS = [(0,), (0,), (1, 0)]
RULE = {"rule": "threshold", "metric": "train/accuracy", "value": 0.5, "window": 2}


def _dsrl(tmp_path=None, steps=6, ckpt_path=None):
    schedule = DualSpaceSchedule(MarginalNSR(), ConditionalRL(), switch_step=10, adaptive_switch=RULE)
    module = make_module(schedule, reward=ScheduledReward(ACCURACY_PATTERNS), diagnostics_every_n_steps=0)
    phases = Phases()
    callbacks = [phases]
    kwargs = {}
    if tmp_path is not None:
        callbacks.append(ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=1, save_top_k=-1))
        kwargs["enable_checkpointing"] = True
    L.seed_everything(0)
    make_trainer(steps, callbacks, **kwargs).fit(module, datamodule=make_datamodule(module.tokenizer), ckpt_path=ckpt_path)
    return module, phases.seen


def test_adaptive_switch_happens_where_the_metric_says_and_survives_a_resume(tmp_path):
    _, uninterrupted = _dsrl()
    # the rule fires at the end of step 4 (mean of 0.5, 0.5); the switch comes at the next batch
    assert uninterrupted == [(1, 0), (2, 0), (3, 0), (4, 0), (5, 1), (6, 1)]
    _, first = _dsrl(tmp_path, steps=3)  # stops with the rule's window holding (0, 0.5)
    assert first == [(1, 0), (2, 0), (3, 0)]
    state = torch.load(tmp_path / "last.ckpt", weights_only=False)["callbacks"]
    (switch_state,) = [v for k, v in state.items() if k.startswith("PhaseSwitch")]
    assert switch_state["rule"]["history"] == [0.0, 0.5] and switch_state["rule"]["fired_at"] is None
    # A fresh reward object restarts its script at call 1: give the resumed run the remaining calls.
    schedule = DualSpaceSchedule(MarginalNSR(), ConditionalRL(), switch_step=10, adaptive_switch=RULE)
    module = make_module(schedule, reward=ScheduledReward([(1, 0)]), diagnostics_every_n_steps=0)
    phases = Phases()
    L.seed_everything(0)
    make_trainer(6, [phases]).fit(module, datamodule=make_datamodule(module.tokenizer),
                                  ckpt_path=str(tmp_path / "last.ckpt"))
    assert phases.seen == uninterrupted[3:]


def test_validation_logs_rare_solutions_and_entropy():
    module = make_module(ConditionalRL(), reward=PatternReward((1, 0)), validation_entropy=True)
    dm = make_datamodule(module.tokenizer)
    (metrics,) = make_trainer(1, limit_val_batches=None).validate(module, datamodule=dm, verbose=False)
    assert metrics["val/rare_solutions"] == pytest.approx(1.0)  # each problem: exactly 1 of 2 right
    assert metrics["val/entropy"] > 0
    module = make_module(ConditionalRL(), reward=PatternReward((1, 1)))
    (metrics,) = make_trainer(1, limit_val_batches=None).validate(module, datamodule=dm, verbose=False)
    assert metrics["val/rare_solutions"] == 0.0 and "val/entropy" not in metrics
