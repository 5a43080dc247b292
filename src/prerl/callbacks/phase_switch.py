"""The Dual Space RL switch: NSR-PreRL for S optimizer updates, then GRPO (docs/method.md, "DSRL")."""

from __future__ import annotations

import logging
from typing import Any

from lightning import Callback

from prerl.switch_rules import SwitchRule

log = logging.getLogger(__name__)


class PhaseSwitch(Callback):
    """Move the module to phase 2 once ``trainer.global_step >= switch_step`` (or earlier, when an
    adaptive ``rule`` fires).

    ``global_step`` counts optimizer updates, so phase 1 makes exactly ``switch_step`` updates
    when each rollout batch makes one (the paper's S = 20; ``switch_step=19`` reproduces the
    released code, whose marginal loss is active while its 1-based step is < 20). With several
    updates per batch the switch happens at the first batch that starts at or after S.

    With a rule (``prerl.switch_rules.SwitchRule``), each phase-1 step's logged value of its
    metric is fed to it at the end of the batch, and the switch happens at the start of the next
    batch once it fires; ``switch_step`` stays the latest switch.

    Nothing is reset: weights, optimizer state, learning rate and data stream carry over, unless
    ``reset_optimizer`` asks to clear the optimizer state. With ``reference_from_policy`` and a KL
    term, the KL reference becomes a copy of the policy at the switch (the authors'
    ``update_ref_from_actor``), so phase 2's KL starts at 0. The phase, the copied reference and the
    rule's trigger state are saved in checkpoints, so a resumed run continues in its phase, against
    its reference, and switches where an uninterrupted one would.

    A run in phase 1 whose ``trainer.max_steps`` ends before ``switch_step`` (and no rule) logs a
    warning when training starts: it would never reach phase 2.
    """

    def __init__(self, switch_step: int = 20, reset_optimizer: bool = False, rule: SwitchRule | None = None,
                 reference_from_policy: bool = False):
        self.switch_step = int(switch_step)
        self.reset_optimizer = reset_optimizer
        self.reference_from_policy = reference_from_policy
        self.rule = rule
        self.switched_at: int | None = None

    def _due(self, trainer) -> bool:
        return trainer.global_step >= self.switch_step or (self.rule is not None and self.rule.fired_at is not None)

    def on_train_start(self, trainer, pl_module) -> None:
        if pl_module.phase == 0 and self.rule is None and 0 <= trainer.max_steps <= self.switch_step:
            log.warning(
                "DSRL: objective.switch_step=%d >= trainer.max_steps=%d: the run ends before the switch, so it trains "
                "phase 1 (%s) only; set objective.switch_step below trainer.max_steps (or raise trainer.max_steps)",
                self.switch_step, trainer.max_steps, ", ".join(repr(o) for o, _ in pl_module.phases[0]),
            )

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if pl_module.phase == 0 and self._due(trainer):
            pl_module.set_phase(1)
            self.switched_at = trainer.global_step
            if self.reset_optimizer:
                for optimizer in trainer.optimizers:
                    optimizer.state.clear()
            copied = self.reference_from_policy and pl_module.reference_from_policy()
            why = (f"{self.rule.metric} triggered the {self.rule.rule} rule"
                   if self.rule is not None and self.rule.fired_at is not None else f"the fixed step {self.switch_step}")
            log.info(
                "DSRL: switched to phase 2 (%s) at step %d (%s)%s%s",
                ", ".join(repr(o) for o, _ in pl_module.phase_terms), trainer.global_step, why,
                " with a fresh optimizer state" if self.reset_optimizer else "",
                "; the KL reference is now a copy of the policy" if copied else "",
            )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.rule is None or pl_module.phase != 0:
            return
        value = trainer.callback_metrics.get(self.rule.metric)
        if value is None:
            raise KeyError(
                f"objective.adaptive_switch.metric={self.rule.metric!r} is not logged; logged training metrics: "
                f"{sorted(k for k in trainer.callback_metrics if k.startswith('train/'))}"
            )
        if self.rule.update(trainer.global_step, float(value)):
            log.info("DSRL: %s rule on %s fired at step %d", self.rule.rule, self.rule.metric, trainer.global_step)

    def state_dict(self) -> dict[str, Any]:
        return {"rule": self.rule.state_dict() if self.rule is not None else None, "switched_at": self.switched_at}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.rule is not None and state_dict.get("rule") is not None:
            self.rule.load_state_dict(state_dict["rule"])
        self.switched_at = state_dict.get("switched_at")
