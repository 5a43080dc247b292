"""The Dual Space RL switch: NSR-PreRL for S optimizer updates, then GRPO (docs/method.md, "DSRL")."""

from __future__ import annotations

import logging

from lightning import Callback

log = logging.getLogger(__name__)


class PhaseSwitch(Callback):
    """Move the module to phase 2 once ``trainer.global_step >= switch_step``.

    ``global_step`` counts optimizer updates, so phase 1 makes exactly ``switch_step`` updates
    when each rollout batch makes one (the paper's S = 20; ``switch_step=19`` reproduces the
    released code, whose marginal loss is active while its 1-based step is < 20). With several
    updates per batch the switch happens at the first batch that starts at or after S.

    Nothing is reset: weights, optimizer state, learning rate and data stream carry over, unless
    ``reset_optimizer`` asks to clear the optimizer state. The phase itself is module state and
    is saved in checkpoints, so a resumed run continues in the phase and switches at S.
    """

    def __init__(self, switch_step: int = 20, reset_optimizer: bool = False):
        self.switch_step = int(switch_step)
        self.reset_optimizer = reset_optimizer

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if pl_module.phase == 0 and trainer.global_step >= self.switch_step:
            pl_module.set_phase(1)
            if self.reset_optimizer:
                for optimizer in trainer.optimizers:
                    optimizer.state.clear()
            log.info(
                "DSRL: switched to phase 2 (%s) at step %d%s",
                ", ".join(repr(o) for o, _ in pl_module.phase_terms),
                trainer.global_step,
                " with a fresh optimizer state" if self.reset_optimizer else "",
            )
