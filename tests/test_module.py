"""The LightningModule on a tiny model: updates, NSR-PreRL behaviour, the DSRL switch, resume, NaN."""

import functools
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from omegaconf import OmegaConf

import prerl.module as module_lib
import prerl.updates as updates_lib
from helpers import PatternReward, make_datamodule, make_module, make_trainer
from prerl.models import LoraSettings
from prerl.objectives import ConditionalRL, DualSpaceSchedule, MarginalNSR, MarginalRL
from prerl.scoring import score_responses

ROOT = Path(__file__).resolve().parents[1]


def _params(module):
    return {k: v.detach().clone() for k, v in module.policy.named_parameters()}


def _changed(before, module):
    return [k for k, v in module.policy.named_parameters() if not torch.equal(before[k], v.detach())]


def _fit(module, max_steps=1, callbacks=(), seed=0, **trainer_kwargs):
    L.seed_everything(seed)
    dm = make_datamodule(module.tokenizer)
    module.configure_model()
    before = _params(module)
    trainer = make_trainer(max_steps, callbacks, **trainer_kwargs)
    trainer.fit(module, datamodule=dm)
    return trainer, before


class RecordRollouts:
    """Wrap module.sample to keep every training rollout."""

    def __init__(self, module):
        self.rollouts = []
        original = module.sample

        def sample(*args, **kwargs):
            rollout = original(*args, **kwargs)
            if module.training:
                self.rollouts.append(rollout)
            return rollout

        module.sample = sample


class PhaseLog(Callback):
    def __init__(self):
        self.phases = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.phases.append(pl_module.phase)


def test_grpo_step_changes_every_parameter():
    module = make_module(ConditionalRL(advantage="grpo"))
    trainer, before = _fit(module)
    assert trainer.global_step == 1
    changed = _changed(before, module)
    assert len(changed) == len(before)


@pytest.mark.parametrize("convention, no_signal", [("group_mean", "step"), ("group_mean", "skip"), ("fixed", "step")])
def test_nsr_prerl_uniform_groups(convention, no_signal):
    """Authors' convention: all-right and all-wrong groups carry no gradient; the NSR paper's does.
    Without signal the authors still step AdamW (zero gradients: only weight decay moves the
    weights); ``no_signal=skip`` makes no update and counts no step."""
    reward = PatternReward((1, 1, 0, 0))  # G=2: group 0 all right, group 1 all wrong, per batch of 2
    lr, wd = 1e-3, 0.1
    module = make_module(
        MarginalNSR(convention=convention), reward=reward, group_size=2, no_signal=no_signal,
        optimizer=functools.partial(torch.optim.AdamW, lr=lr, weight_decay=wd),
    )
    trainer, before = _fit(module, max_steps=2, max_epochs=1, limit_train_batches=2)
    if convention == "fixed":  # every wrong response gets -1: a real update
        assert trainer.global_step == 2 and module.no_signal_total == 0
        decayed = {k: v * (1 - lr * wd) ** 2 for k, v in before.items()}
        assert any(not torch.allclose(decayed[k], v) for k, v in module.policy.named_parameters())
    elif no_signal == "step":
        assert trainer.global_step == 2 and module.no_signal_total == 2
        for name, value in module.policy.named_parameters():  # zero gradients: weight decay only
            torch.testing.assert_close(value.detach(), before[name] * (1 - lr * wd) ** 2, rtol=1e-6, atol=1e-8)
        assert _changed(before, module)
    else:
        assert trainer.global_step == 0 and not _changed(before, module)
        assert module.no_signal_total == 2


def test_entropy_of_an_update_with_no_signal_is_missing_not_zero():
    """Without signal no row is forwarded (skip_zero_advantage): the step's train/entropy is NaN
    (not measured), never a 0 that reads as a collapsed policy."""
    module = make_module(MarginalNSR(), reward=PatternReward((1, 1, 0, 0)), group_size=2, no_signal="step",
                         diagnostics_every_n_steps=1)
    trainer, _ = _fit(module, max_steps=1)
    assert module.no_signal_total == 1
    entropy = trainer.callback_metrics.get("train/entropy/marginal")
    assert entropy is None or math.isnan(float(entropy))  # before any measured step it is not logged at all
    signal = make_module(MarginalNSR(convention="fixed"), reward=PatternReward((1, 1, 0, 0)), group_size=2,
                         diagnostics_every_n_steps=1)
    trainer, _ = _fit(signal, max_steps=1)
    assert float(trainer.callback_metrics["train/entropy/marginal"]) > 0


def test_zero_gradient_for_uniform_groups_group_mean():
    obj = MarginalNSR()
    rewards = torch.tensor([1.0, 1.0, 0.0, 0.0])
    adv = obj.advantages(rewards, 2)
    assert not obj.keep(adv).any()


def test_one_nsr_prerl_step_lowers_marginal_logprob_of_penalised_responses():
    module = make_module(MarginalNSR(), reward=PatternReward((1, 0)), lr=1e-3, max_new_tokens=12)
    recorder = RecordRollouts(module)
    _fit(module)
    rollout = recorder.rollouts[0]
    wrong = rollout.rewards < 0.5
    batch = MarginalRL().select(rollout, torch.zeros_like(rollout.rewards), wrong)
    fresh = make_module(MarginalNSR())
    fresh.configure_model()

    def total(model):
        with torch.no_grad():
            lp, _ = score_responses(model, batch.prefix_ids, batch.prefix_mask, batch.response_ids, batch.response_mask)
        return lp.sum(dim=1)

    before, after = total(fresh.policy), total(module.policy)
    assert torch.all(after < before), (before, after)


def test_phase1_step_scores_only_kept_rows_in_marginal_space(monkeypatch):
    calls = []

    def spy(policy, prefix_ids, prefix_mask, response_ids, response_mask, **kw):
        calls.append((prefix_ids.shape, response_ids.shape[0]))
        return score_responses(policy, prefix_ids, prefix_mask, response_ids, response_mask, **kw)

    monkeypatch.setattr(updates_lib, "score_responses", spy)
    schedule = DualSpaceSchedule(MarginalNSR(), ConditionalRL(), switch_step=5)
    module = make_module(schedule, reward=PatternReward((1, 0)), diagnostics_every_n_steps=0)
    _fit(module)
    assert calls, "the update ran no forward pass"
    assert all(shape[1] == 1 for shape, _ in calls), "a phase-1 step ran a conditional forward"
    assert sum(rows for _, rows in calls) == 4  # 2 prompts x 4 samples, half wrong


def test_dsrl_switches_at_exactly_step_s():
    schedule = DualSpaceSchedule(MarginalNSR(), ConditionalRL(), switch_step=3)
    module = make_module(schedule, diagnostics_every_n_steps=0)
    phases = PhaseLog()
    trainer, _ = _fit(module, max_steps=5, callbacks=[phases])
    assert phases.phases == [0, 0, 0, 1, 1]
    assert trainer.global_step == 5


def test_dsrl_resume_before_switch_continues_phase1_and_switches_at_s(tmp_path):
    def run(max_steps, ckpt_path=None):
        schedule = DualSpaceSchedule(MarginalNSR(), ConditionalRL(), switch_step=3)
        module = make_module(schedule, diagnostics_every_n_steps=0)
        phases = PhaseLog()
        ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=1, save_top_k=-1)
        L.seed_everything(0)
        trainer = make_trainer(max_steps, [phases, ckpt], enable_checkpointing=True)
        trainer.fit(module, datamodule=make_datamodule(module.tokenizer), ckpt_path=ckpt_path)
        return module, phases.phases

    _, first = run(2)
    assert first == [0, 0]
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert saved["prerl_state"]["phase"] == 0 and saved["global_step"] == 2
    module, resumed = run(5, ckpt_path=str(tmp_path / "last.ckpt"))
    assert resumed == [0, 1, 1]  # steps 2, 3, 4
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert saved["prerl_state"]["phase"] == 1


def test_nonfinite_loss_is_skipped_counted_and_stops_with_checkpoint_intact(tmp_path):
    objective = ConditionalRL()
    module = make_module(objective, max_consecutive_nonfinite=2)
    original_loss = objective.loss

    class BreakAfterFirstStep(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 1:
                objective.loss = lambda *a, **k: (original_loss(*a, **k)[0] * float("nan"), {})

    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_top_k=-1)
    with pytest.raises(module_lib.NonFiniteLossError, match="2 consecutive updates"):
        _fit(module, max_steps=10, callbacks=[BreakAfterFirstStep(), ckpt], enable_checkpointing=True)
    assert module.nonfinite_total == 2
    files = sorted(tmp_path.glob("*.ckpt"))
    assert len(files) == 1
    state = torch.load(files[0], weights_only=False)
    assert state["global_step"] == 1
    for name, value in module.policy.named_parameters():  # skipped updates changed nothing
        torch.testing.assert_close(state["state_dict"][f"policy.{name}"], value.detach())


def test_validation_avg_at_k_and_pass_at_k():
    module = make_module(ConditionalRL(), reward=PatternReward((1, 0)))
    dm = make_datamodule(module.tokenizer)
    trainer = make_trainer(1, limit_val_batches=None)
    (metrics,) = trainer.validate(module, datamodule=dm, verbose=False)
    assert metrics["val/avg@2"] == pytest.approx(0.5)
    assert metrics["val/pass@2"] == pytest.approx(1.0)
    assert metrics["val/reward_timeouts"] == 0


def test_several_updates_per_rollout_batch():
    module = make_module(ConditionalRL(), update={"epochs": 2, "mini_batches": 2, "micro_batch_size": 2})
    trainer, before = _fit(module, max_steps=4)
    assert trainer.global_step == 4
    assert module.no_signal_total == 0 and _changed(before, module)


def test_micro_batch_size_does_not_change_the_update():
    results = []
    for micro in (1, 8):
        module = make_module(
            ConditionalRL(loss_agg="seq-mean-token-mean"),
            update={"micro_batch_size": micro, "max_grad_norm": 1e9},
            optimizer=functools.partial(torch.optim.SGD, lr=1.0),  # AdamW's first step is ~sign(g)
        )
        _fit(module, seed=3)
        results.append(_params(module))
    initial = dict(make_module(ConditionalRL()).model_spec.build_model().named_parameters())
    for name in results[0]:
        torch.testing.assert_close(results[0][name], results[1][name], atol=1e-6, rtol=1e-5)
    assert any(not torch.equal(results[0][n], initial[n].detach()) for n in results[0])


def test_persistent_lack_of_signal_stops_with_clear_error():
    module = make_module(ConditionalRL(), reward=PatternReward((0,)), max_consecutive_no_signal=3, no_signal="skip")
    with pytest.raises(module_lib.NoLearningSignalError, match="3 consecutive batches had no learning signal"):
        _fit(module, max_steps=5)
    assert module.no_signal_total == 3 and module.global_step == 0


def test_no_signal_limit_null_lets_a_collapsed_policy_reach_the_planned_step():
    """A study arm that collapses to all-wrong keeps making zero-gradient updates to N (null limit);
    the same run with a limit stops there; null with no_signal=skip (a run that might never end)
    and a limit below 1 are refused at construction."""
    module = make_module(ConditionalRL(), reward=PatternReward((0,)), max_consecutive_no_signal=None)
    trainer, _ = _fit(module, max_steps=5)
    assert trainer.global_step == 5 and module.no_signal_total == 5
    limited = make_module(ConditionalRL(), reward=PatternReward((0,)), max_consecutive_no_signal=4)
    with pytest.raises(module_lib.NoLearningSignalError, match="4 consecutive batches"):
        _fit(limited, max_steps=5)
    for value, no_signal in ((None, "skip"), (0, "step")):
        with pytest.raises(ValueError, match=rf"module.max_consecutive_no_signal={value!r} is not allowed"):
            make_module(ConditionalRL(), max_consecutive_no_signal=value, no_signal=no_signal)


def test_validate_fit_with_validation_validate():
    """Metric states created by a validate() before fit() stay usable in fit's own validation."""
    module = make_module(ConditionalRL(), reward=PatternReward((1, 0)))
    dm = make_datamodule(module.tokenizer, n_train=8, batch_size=4)
    inference_mode = OmegaConf.load(ROOT / "configs" / "trainer" / "default.yaml").inference_mode
    trainer = make_trainer(4, limit_val_batches=None, check_val_every_n_epoch=1, inference_mode=inference_mode)
    trainer.validate(module, datamodule=dm, verbose=False)
    trainer.fit(module, datamodule=dm)  # 2 batches per epoch: validates twice inside fit
    (metrics,) = trainer.validate(module, datamodule=dm, verbose=False)
    assert trainer.global_step == 4 and metrics["val/avg@2"] == pytest.approx(0.5)


def test_chunked_generation_gives_the_same_rollout():
    """generation_batch_size only bounds memory: greedy rollouts are unchanged by chunking."""
    results = []
    for chunk in (None, 4):
        module = make_module(ConditionalRL(), rollout={"generation_batch_size": chunk, "top_k": 1})  # argmax
        recorder = RecordRollouts(module)
        _fit(module, seed=5)
        results.append(recorder.rollouts[0])
    a, b = results
    T = min(a.response_ids.shape[1], b.response_ids.shape[1])
    assert torch.equal(a.response_mask.sum(1), b.response_mask.sum(1))
    assert torch.equal(a.response_ids[:, :T] * a.response_mask[:, :T], b.response_ids[:, :T] * b.response_mask[:, :T])


def test_sparse_metrics_are_not_repeated_on_steps_that_lack_them(tmp_path):
    """After the switch, the phase-1 loss term is NaN, not its last value; diagnostics likewise."""
    from lightning.pytorch.loggers import CSVLogger

    schedule = DualSpaceSchedule(MarginalNSR(), ConditionalRL(), switch_step=2)
    module = make_module(schedule, cross_space_diagnostics_every_n_steps=3)
    _fit(module, max_steps=4, logger=CSVLogger(tmp_path, name="m", version=""), log_every_n_steps=1)
    import csv
    import math

    rows = [r for r in csv.DictReader(open(tmp_path / "m" / "metrics.csv")) if r.get("train/loss")]
    value = lambda row, key: float(row[key]) if row.get(key) not in (None, "") else math.nan  # noqa: E731
    assert [int(r["step"]) for r in rows] == [0, 1, 2, 3]
    marginal = [value(r, "train/pg_loss/marginal") for r in rows]
    conditional = [value(r, "train/pg_loss/conditional") for r in rows]
    assert not any(math.isnan(v) for v in marginal[:2]) and all(math.isnan(v) for v in marginal[2:])
    assert all(math.isnan(v) for v in conditional[:2]) and not any(math.isnan(v) for v in conditional[2:])
    entropy = [value(r, "train/rollout_entropy/conditional") for r in rows]
    assert [math.isnan(v) for v in entropy] == [False, True, True, False]


def test_kl_penalty_with_a_frozen_reference_copy(tmp_path):
    """Full fine-tuning: the reference is a frozen copy that never moves and is never saved."""
    module = make_module(ConditionalRL(kl_coef=0.1), lr=1e-2)
    trainer, before = _fit(module, max_steps=2, callbacks=[PhaseLog()])
    assert module.ref_policy is not None
    for name, value in module.ref_policy.named_parameters():
        assert not value.requires_grad and torch.equal(value, before[name])
    assert trainer.callback_metrics["train/kl/conditional"] > 0  # the policy moved away from it
    trainer.save_checkpoint(tmp_path / "kl.ckpt")
    saved = torch.load(tmp_path / "kl.ckpt", weights_only=False)["state_dict"]
    assert saved and not any(k.startswith("ref_policy.") for k in saved)
    resumed = make_module(ConditionalRL(kl_coef=0.1), lr=1e-2)
    trainer = make_trainer(3)
    trainer.fit(resumed, datamodule=make_datamodule(resumed.tokenizer), ckpt_path=tmp_path / "kl.ckpt")
    assert trainer.global_step == 3


def test_kl_penalty_with_lora_uses_the_disabled_adapter_as_reference():
    module = make_module(ConditionalRL(kl_coef=0.1), spec_kwargs=(("lora", LoraSettings(r=4, alpha=8)),))
    trainer, _ = _fit(module, max_steps=1)
    assert module.ref_policy is None
    # LoRA B starts at zero: at the first update the policy equals its reference, KL is exactly 0
    assert float(trainer.callback_metrics["train/kl/conditional"]) == 0.0


def test_update_entropies_equal_the_cross_space_pass_on_the_same_tokens():
    """train/entropy/conditional comes from the update's own logits (no extra forward) and equals
    the extra no-grad pass over the same responses (GRPO, every row forwarded)."""
    module = make_module(
        ConditionalRL(), diagnostics_every_n_steps=1, cross_space_diagnostics_every_n_steps=1,
        update={"micro_batch_size": 3, "skip_zero_advantage": False},
    )
    trainer, _ = _fit(module)
    metrics = trainer.callback_metrics
    assert float(metrics["train/entropy/conditional"]) > 0
    torch.testing.assert_close(metrics["train/entropy/conditional"], metrics["train/rollout_entropy/conditional"], rtol=1e-5, atol=1e-6)
