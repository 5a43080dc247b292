"""Write a few generated responses to TensorBoard as text every N steps."""

from __future__ import annotations

from lightning import Callback
from lightning.pytorch.loggers import TensorBoardLogger


def format_samples(samples: list[dict]) -> str:
    """Markdown for TensorBoard's text tab: question, gold answer, reward, response."""
    blocks = []
    for s in samples:
        blocks.append(
            f"**{s['id']}** reward={s['reward']:.0f} gold=`{s['gold']}` extracted=`{s['extracted']}`\n\n"
            f"Q: {s['question']}\n\n```\n{s['response']}\n```"
        )
    return "\n\n---\n\n".join(blocks)


class TextSamples(Callback):
    """Log the module's ``last_samples`` (kept in memory by the training step) every N steps."""

    def __init__(self, every_n_steps: int = 10):
        if every_n_steps < 1:
            raise ValueError("every_n_steps must be >= 1")
        self.every_n_steps = every_n_steps
        self._last_logged = -1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step == self._last_logged or step % self.every_n_steps or not pl_module.last_samples:
            return
        self._last_logged = step
        text = format_samples(pl_module.last_samples)
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_text("samples", text, global_step=step)
