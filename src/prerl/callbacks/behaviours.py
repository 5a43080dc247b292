"""Log reasoning-behaviour statistics of the training rollouts (docs/analysis.md).

Reads the responses the training step already sampled (``pl_module.last_rollout``): no extra
generation. Every N-th training batch it writes ``z_behaviour/<key>`` for every key of
``prerl.analysis.behaviours.summarize_behaviours`` (means per response and fractions of
thoughts), and, when the rollout has rewards, the same for the right (reward > 0.5) and the wrong
responses as ``z_behaviour/correct/<key>`` and ``z_behaviour/wrong/<key>``. The family is
``z_behaviour`` (as in evaluations) so that TensorBoard, which sorts tag groups alphabetically and
opens the first two, opens on ``train/`` and ``val/`` and shows these 48 charts last.

The scalars go straight to ``logger.log_metrics`` of every trainer logger, at the step Lightning
gives the same batch's ``train/*`` metrics (the updates made before the batch; ``PreRLModule``
sets it), so ``z_behaviour/reflection`` at step s describes the rollout whose ``train/accuracy`` is
at step s.
Nothing is written on the other steps (no stale repeats, no NaN rows), and a split with no
response (e.g. no right answer in the batch) is left out of that step rather than logged as 0.
With several data-parallel processes the counts of every rank's rollout are summed first.
"""

from __future__ import annotations

import torch
from lightning import Callback

from prerl.analysis.behaviours import COUNT_KEYS, summary_from_totals, total_counts


FAMILY = "z_behaviour"  # the TensorBoard tag group of the behaviour scalars, in training and evaluation


def logging_step(trainer) -> int:
    """The step Lightning logs this batch's ``self.log`` metrics at."""
    loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
    return int(getattr(loop, "_batches_that_stepped", trainer.global_step))


class BehaviourLogger(Callback):
    """Log ``z_behaviour/*`` scalars of ``pl_module.last_rollout.texts`` every N training batches.

    Args:
        every_n_steps: log on the batches whose logging step is a multiple of N (the first
            batch, step 0, is logged: the behaviour of the initial policy).
        split_by_reward: also log ``z_behaviour/correct/*`` and ``z_behaviour/wrong/*``.
        threshold: a response is right when its reward is > threshold.
    """

    def __init__(self, every_n_steps: int = 10, split_by_reward: bool = True, threshold: float = 0.5):
        if every_n_steps < 1:
            raise ValueError("every_n_steps must be >= 1")
        self.every_n_steps = int(every_n_steps)
        self.split_by_reward = bool(split_by_reward)
        self.threshold = float(threshold)
        self._last_logged = -1

    def metrics(self, rollout, pl_module=None, world_size: int = 1) -> dict[str, float]:
        """The scalars for one rollout (``texts`` and optionally ``rewards``)."""
        texts = list(rollout.texts)
        groups = {"": texts}
        rewards = getattr(rollout, "rewards", None)
        if self.split_by_reward and rewards is not None:
            right = [bool(r > self.threshold) for r in torch.as_tensor(rewards).flatten().tolist()]
            if len(right) == len(texts):
                groups["correct/"] = [t for t, ok in zip(texts, right) if ok]
                groups["wrong/"] = [t for t, ok in zip(texts, right) if not ok]
        # One row per group: the responses and the summed counts (additive across ranks).
        table = torch.tensor(
            [[len(g)] + [total_counts(g)[k] for k in COUNT_KEYS] for g in groups.values()], dtype=torch.float64
        )
        if world_size > 1 and pl_module is not None:
            table = pl_module.all_gather(table).reshape(world_size, *table.shape).sum(0)
        metrics: dict[str, float] = {}
        for prefix, row in zip(groups, table.tolist()):
            responses, totals = int(row[0]), dict(zip(COUNT_KEYS, row[1:]))
            if prefix and responses == 0:
                continue  # nothing to describe: leave the split out of this step
            for key, value in summary_from_totals(totals, responses).items():
                metrics[f"{FAMILY}/{prefix}{key}"] = value
        return metrics

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = logging_step(trainer)
        rollout = getattr(pl_module, "last_rollout", None)
        if step == self._last_logged or step % self.every_n_steps or rollout is None:
            return
        self._last_logged = step
        metrics = self.metrics(rollout, pl_module, trainer.world_size)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
