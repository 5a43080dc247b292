"""TensorBoard's HPARAMS view: what a run varied (objective, switch step, seed, learning rate, ...)
beside how it ended (status, step) and its final validation, so runs compare in one table.

Written once, when the run ends, into the run's own event file; the metric columns are tags the run
already logged (``val/avg@k``, ...), whose last value the view shows. A run that failed before it
measured anything (a settings or data error while setting up) leaves no TensorBoard run: its
event files would only add an empty entry to every comparison.
"""

from __future__ import annotations

import shutil
from typing import Any

from omegaconf import DictConfig, OmegaConf

# The settings a reader compares runs by (dotted config keys), beside every scalar of `objective`.
COMPARED = ("seed", "trainer.max_steps", "data.batch_size", "module.optimizer.lr", "module.rollout.group_size",
            "module.rollout.max_new_tokens", "module.rollout.temperature")


def _scalar(value: Any) -> bool:
    return isinstance(value, (bool, int, float, str))


def run_hparams(cfg: DictConfig, summary: dict) -> dict[str, Any]:
    """The hyper-parameters of a run as TensorBoard takes them (scalars and strings only)."""
    from hydra.core.hydra_config import HydraConfig

    out: dict[str, Any] = {}
    if HydraConfig.initialized():
        out["objective"] = HydraConfig.get().runtime.choices.get("objective")
    objective = OmegaConf.to_container(cfg.objective, resolve=True)
    out["objective._target_"] = str(objective.get("_target_", "")).rsplit(".", 1)[-1]
    for key, value in objective.items():
        if _scalar(value) and not key.startswith("_"):
            out[f"objective.{key}"] = value
    for key in COMPARED:
        value = OmegaConf.select(cfg, key, default=None)
        if _scalar(value):
            out[key] = value
    out["model"] = str(OmegaConf.select(cfg, "model.name", default=None) or
                       OmegaConf.select(cfg, "model.path", default=None) or cfg.model.get("_target_", "")).rsplit("/", 1)[-1]
    out["status"], out["global_step"] = summary["status"], int(summary["global_step"])
    return out


def log_run_hparams(trainer, cfg: DictConfig, summary: dict) -> None:
    """Write the HPARAMS summary of a run to each TensorBoard logger that has written anything; its
    metric columns are the validation metrics and the tags sent to the loggers."""
    from lightning.pytorch.loggers import TensorBoardLogger
    from torch.utils.tensorboard.summary import hparams

    metrics = sorted(set(summary.get("after", {})) | set(summary.get("before", {})) | set(trainer.logged_metrics))
    for logger in trainer.loggers:
        if not isinstance(logger, TensorBoardLogger):
            continue
        if not metrics:  # failed while setting up: nothing measured
            logger.finalize("failed")
            shutil.rmtree(logger.log_dir, ignore_errors=True)
            continue
        writer = logger.experiment._get_file_writer()
        for part in hparams(run_hparams(cfg, summary), {m: 0.0 for m in metrics}):
            writer.add_summary(part)
        writer.flush()
