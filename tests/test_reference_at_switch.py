"""DSRL's KL reference at the switch: a copy of the policy (the authors' update_ref_from_actor,
objective.reference_at_switch=policy) or the initial model (base); kept across a resume."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir

from helpers import make_datamodule, make_module, make_trainer
from prerl.models import LoraSettings
from prerl.objectives import ConditionalRL, DualSpaceSchedule, MarginalNSR
from test_configs import CONFIGS

LORA = (("lora", LoraSettings(r=4, alpha=8)),)


def dsrl(reference_at_switch: str) -> DualSpaceSchedule:
    return DualSpaceSchedule(MarginalNSR(), ConditionalRL(kl_coef=0.1), switch_step=1,
                             reference_at_switch=reference_at_switch)


class AtSwitch(L.Callback):
    """The policy's trainable tensors after the last phase-1 update (switch_step=1): the policy at the switch."""

    def __init__(self):
        self.policy = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == 1 and self.policy is None:
            self.policy = {n: p.detach().clone() for n, p in pl_module.policy.named_parameters() if p.requires_grad}


def fit(module, max_steps, ckpt_path=None):
    L.seed_everything(0)
    at_switch = AtSwitch()
    trainer = make_trainer(max_steps, [at_switch])
    trainer.fit(module, datamodule=make_datamodule(module.tokenizer), ckpt_path=ckpt_path)
    return trainer, at_switch.policy


@pytest.mark.parametrize("spec_kwargs", [(), LORA], ids=["full", "lora"])
def test_phase_two_kl_is_zero_right_after_the_switch_and_the_copy_survives_a_resume(spec_kwargs, tmp_path):
    module = make_module(dsrl("policy"), lr=1e-2, spec_kwargs=spec_kwargs)
    module.configure_model()
    initial = {n: p.detach().clone() for n, p in module.policy.named_parameters() if p.requires_grad}
    trainer, at_switch = fit(module, max_steps=2)  # one NSR-PreRL update, the switch, one GRPO update
    assert module.phase == 1 and module.reference_step == 1
    assert any(not torch.equal(initial[n], v) for n, v in at_switch.items())  # phase 1 moved the policy
    # the first phase-2 update measures its KL before it moves the policy: against the copy, exactly 0
    assert float(trainer.callback_metrics["train/kl/conditional"]) == 0.0
    reference = module.ref_adapter if spec_kwargs else dict(module.ref_policy.named_parameters())
    for name, value in at_switch.items():
        assert torch.equal(reference[name], value), name

    trainer.save_checkpoint(tmp_path / "after_switch.ckpt")
    saved = torch.load(tmp_path / "after_switch.ckpt", weights_only=False)
    assert saved["prerl_state"]["reference_step"] == 1
    if spec_kwargs:
        assert set(saved["prerl_ref_adapter"]) == set(at_switch)
    else:
        assert {f"ref_policy.{n}" for n in at_switch} <= set(saved["state_dict"])
    resumed = make_module(dsrl("policy"), lr=1e-2, spec_kwargs=spec_kwargs)
    trainer, _ = fit(resumed, max_steps=3, ckpt_path=tmp_path / "after_switch.ckpt")
    assert trainer.global_step == 3 and resumed.reference_step == 1
    # step 2 moved the policy off the copy (with LoRA: the swapped-in copy was swapped out again)
    assert float(trainer.callback_metrics["train/kl/conditional"]) > 0
    reference = resumed.ref_adapter if spec_kwargs else dict(resumed.ref_policy.named_parameters())
    for name, value in at_switch.items():
        assert torch.equal(reference[name].to(value.device), value), name


@pytest.mark.parametrize("spec_kwargs", [(), LORA], ids=["full", "lora"])
def test_reference_at_switch_base_keeps_the_initial_model(spec_kwargs):
    module = make_module(dsrl("base"), lr=1e-2, spec_kwargs=spec_kwargs)
    trainer, _ = fit(module, max_steps=2)
    assert module.reference_step == -1 and module.ref_adapter is None
    assert float(trainer.callback_metrics["train/kl/conditional"]) > 0  # phase 1 moved the policy off the base


def test_without_a_kl_term_nothing_is_copied_and_the_key_is_checked():
    module = make_module(DualSpaceSchedule(MarginalNSR(), ConditionalRL(), switch_step=1), lr=1e-2)
    fit(module, max_steps=2)
    assert module.phase == 1 and module.reference_step == -1 and module.ref_policy is None
    with pytest.raises(ValueError, match=r"objective.reference_at_switch='actor': choose policy .* or base"):
        DualSpaceSchedule(MarginalNSR(), ConditionalRL(), reference_at_switch="actor")
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        for name in ("dual", "nsr_warmup_grpo"):
            assert compose(config_name="train", overrides=[f"objective={name}"]).objective.reference_at_switch == "policy"
