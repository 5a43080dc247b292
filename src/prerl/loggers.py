"""Lightning's TensorBoard logger, without the ``epoch`` scalar (configs/logger/tensorboard.yaml)."""

from __future__ import annotations

from lightning.pytorch.loggers import TensorBoardLogger as _LightningTensorBoardLogger


class TensorBoardLogger(_LightningTensorBoardLogger):
    """Lightning adds an ``epoch`` scalar to every step it logs. An RL run's axis is the optimizer
    update (the step); passes over the prompts say nothing there, and TensorBoard, which sorts tag
    groups alphabetically and opens the first two, would open on ``epoch`` instead of ``val/``."""

    def log_metrics(self, metrics, step=None) -> None:
        super().log_metrics({k: v for k, v in metrics.items() if k != "epoch"}, step)
