"""Flush the loggers at every step, so a killed run loses no logged point."""

from __future__ import annotations

from lightning import Callback


class FlushLoggers(Callback):
    """Write buffered logger events (TensorBoard's are flushed only every two minutes) at the start
    of each training batch and after validation.

    Lightning logs a step's metrics after its ``on_train_batch_end``, where the periodic
    checkpoint of that step is written: a run killed (SIGKILL) before the next flush resumes after
    that checkpoint and never logs the step again, so its TensorBoard point would be lost.
    """

    @staticmethod
    def _flush(trainer) -> None:
        for logger in trainer.loggers:
            experiment = getattr(logger, "_experiment", None)  # only loggers that were written to
            if experiment is None:
                continue
            if hasattr(experiment, "flush"):  # TensorBoard's SummaryWriter
                experiment.flush()
            else:  # CSV: writes the rows logged since the last save
                logger.save()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._flush(trainer)

    def on_validation_end(self, trainer, pl_module) -> None:
        self._flush(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        self._flush(trainer)
