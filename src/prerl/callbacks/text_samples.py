"""Write a few generated responses to TensorBoard as text every N steps."""

from __future__ import annotations

import re
import textwrap

from lightning import Callback
from lightning.pytorch.loggers import TensorBoardLogger

from prerl.callbacks.behaviours import logging_step

WIDTH = 100  # characters per line of a question or response: TensorBoard does not wrap code blocks


def _inline(value) -> str:
    """A short value as inline code that fits a table cell; "-" for none."""
    text = "" if value is None else " ".join(str(value).split()).replace("|", "\\|").replace("`", "'")
    return f"`{text[:60] + '…' if len(text) > 60 else text}`" if text else "-"


def _code_block(text: str) -> str:
    """``text`` hard-wrapped to WIDTH columns in a fenced block (longer than any backtick run in it)."""
    lines = [part for line in str(text).splitlines() or [""]
             for part in textwrap.wrap(line, WIDTH, replace_whitespace=False, drop_whitespace=False) or [""]]
    fence = "`" * max(3, 1 + max((len(run) for run in re.findall("`+", str(text))), default=0))
    return f"{fence}text\n" + "\n".join(lines) + f"\n{fence}"


def format_samples(samples: list[dict]) -> str:
    """Markdown for TensorBoard's text tab: a table of reward, extracted and gold answer per sample,
    then each sample's question and response, wrapped."""
    rows = ["| # | reward | extracted | gold | problem |", "|---|---|---|---|---|"]
    rows += [f"| {i} | {s['reward']:g} | {_inline(s['extracted'])} | {_inline(s['gold'])} | {_inline(s['id'])} |"
             for i, s in enumerate(samples, 1)]
    blocks = [
        f"**#{i}** reward {s['reward']:g}, extracted {_inline(s['extracted'])}, gold {_inline(s['gold'])}\n\n"
        f"question:\n\n{_code_block(s['question'])}\n\nresponse:\n\n{_code_block(s['response'])}"
        for i, s in enumerate(samples, 1)
    ]
    return "\n\n".join(["\n".join(rows), *blocks])


class TextSamples(Callback):
    """Log the module's ``last_samples`` (kept in memory by the training step) every N steps, at
    the step of the same batch's ``train/*`` metrics (the updates made before its rollout)."""

    def __init__(self, every_n_steps: int = 10):
        if every_n_steps < 1:
            raise ValueError("every_n_steps must be >= 1")
        self.every_n_steps = every_n_steps
        self._last_logged = -1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = logging_step(trainer)
        if step == self._last_logged or step % self.every_n_steps or not pl_module.last_samples:
            return
        self._last_logged = step
        text = format_samples(pl_module.last_samples)
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_text("samples", text, global_step=step)
