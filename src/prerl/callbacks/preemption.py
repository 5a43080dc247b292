"""Save a checkpoint when the job is pre-empted (SIGTERM), then let Lightning exit."""

from __future__ import annotations

import logging
from pathlib import Path

from lightning import Callback

log = logging.getLogger(__name__)


class PreemptionCheckpoint(Callback):
    """On SIGTERM, write ``<checkpoint dir>/last.ckpt`` at the end of the current batch.

    Lightning's signal handler only records the signal and raises ``SIGTERMException`` after the
    batch; this callback runs first, so the step that was under way is kept. All ranks agree on
    the decision (a sharded save is collective). Resume with ``ckpt_path=<that folder>``.

    Args:
        dirpath: where to write; default: the ModelCheckpoint's folder, else ``<root>/checkpoints``.
        filename: checkpoint file name.
    """

    def __init__(self, dirpath: str | None = None, filename: str = "last.ckpt"):
        self.dirpath = dirpath
        self.filename = filename

    def _target(self, trainer) -> Path:
        if self.dirpath is not None:
            return Path(self.dirpath) / self.filename
        if trainer.checkpoint_callback is not None and trainer.checkpoint_callback.dirpath:
            return Path(trainer.checkpoint_callback.dirpath) / self.filename
        return Path(trainer.default_root_dir) / "checkpoints" / self.filename

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        received = bool(getattr(trainer, "received_sigterm", False))
        if not trainer.strategy.reduce_boolean_decision(received, all=False):
            return
        path = self._target(trainer)
        trainer.save_checkpoint(path)
        log.warning("SIGTERM received: saved %s at step %d before exiting", path, trainer.global_step)
