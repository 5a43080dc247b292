"""Never lose training state: save the final update, and a checkpoint when the run is pre-empted
(SIGTERM), interrupted (Ctrl-C) or fails (an exception); record why the run stopped."""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path

from lightning import Callback
from lightning.pytorch.utilities.exceptions import SIGTERMException

from prerl import preemption

log = logging.getLogger(__name__)


class FaultCheckpoint(Callback):
    """Write ``<checkpoint dir>/last.ckpt`` of the last completed update however the run stops.

    * The end of training: the final update is saved whatever the periodic interval, so a
      completed run's ``last.ckpt`` is at the step its summary reports.
    * SIGTERM (pre-emption; :mod:`prerl.preemption`): every rank finishes the step under way, the
      ranks agree on the stop in one collective, save once together and stop
      (``stop_reason = "preempted"``), whatever order the signals arrive in.
    * SIGINT (Ctrl-C): the first one asks the run to finish its current step, save and stop
      (``stop_reason = "interrupted"``); a second one exits at once without saving.
    * Any other exception in a single-process run (and a SIGTERM that stopped a hung reward): the
      state at the start of the batch that failed (weights, optimizer, data position and random
      state), so a resume re-runs that batch exactly. A batch that had already updated the weights
      is not saved (a resume would repeat the update): the previous checkpoint stays. With several
      processes the other ranks may be inside a collective and could never join a save: nothing is
      saved, the periodic checkpoints stay.
    A run that has made no update saves nothing: its starting point is the config itself. Resume
    with ``ckpt_path=<run folder>`` or ``ckpt_path=last``.

    Args:
        dirpath: where to write; default: the ModelCheckpoint's folder, else ``<root>/checkpoints``.
        filename: checkpoint file name.
    """

    def __init__(self, dirpath: str | None = None, filename: str = "last.ckpt"):
        self.dirpath = dirpath
        self.filename = filename
        self.stop_reason: str | None = None  # "preempted" | "interrupted", read by prerl.train
        self.saved: Path | None = None
        self.saved_step: int | None = None
        self._sigint = False
        self._previous_handler = None

    def _target(self, trainer) -> Path:
        if self.dirpath is not None:
            return Path(self.dirpath) / self.filename
        if trainer.checkpoint_callback is not None and trainer.checkpoint_callback.dirpath:
            return Path(trainer.checkpoint_callback.dirpath) / self.filename
        return Path(trainer.default_root_dir) / "checkpoints" / self.filename

    def _save(self, trainer, why: str) -> None:
        path = self._target(trainer)
        trainer.save_checkpoint(path)
        self.saved, self.saved_step = path, trainer.global_step
        log.warning("%s: saved %s at step %d", why, path, trainer.global_step)

    # ------------------------------------------------------------------ signals
    def _on_sigint(self, signum, frame) -> None:
        if self._sigint:  # the second Ctrl-C: stop now
            raise KeyboardInterrupt
        self._sigint = True
        log.warning("Ctrl-C: finishing the current step, then saving a checkpoint and stopping "
                    "(press Ctrl-C again to stop at once without saving)")

    def on_train_start(self, trainer, pl_module) -> None:
        # After Lightning's signal connector took its snapshot of the handlers (it restores that
        # snapshot at teardown), and in the main thread, where signal handlers live.
        if threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(signal.SIGINT, self._on_sigint)
        preemption.defer(True)

    def _restore_sigint(self) -> None:
        preemption.defer(False)
        if self._previous_handler is not None:
            signal.signal(signal.SIGINT, self._previous_handler)
            self._previous_handler = None

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._restore_sigint()

    # ------------------------------------------------------------------ batch end: signals
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # Every rank reaches this point once per step: the one place where they can agree.
        if trainer.strategy.reduce_boolean_decision(preemption.requested(), all=False):
            self.stop_reason = "preempted"
            self._save(trainer, "SIGTERM received")
            # Every rank raises here, after the last collective of the step: nothing more runs (no
            # end-of-epoch validation eating the scheduler's grace period).
            raise SIGTERMException()
        elif trainer.strategy.reduce_boolean_decision(self._sigint, all=False):
            self.stop_reason = "interrupted"
            self._save(trainer, "Ctrl-C")
            trainer.should_stop = True

    # ------------------------------------------------------------------ the end of training
    def on_train_end(self, trainer, pl_module) -> None:
        preemption.defer(False)
        done = self.saved_step == trainer.global_step
        periodic = trainer.checkpoint_callback
        if periodic is not None and getattr(periodic, "_last_global_step_saved", None) == trainer.global_step:
            done = done or bool(getattr(periodic, "save_last", False))
        if self.stop_reason is None and trainer.global_step > 0 and not done:
            self._save(trainer, "training ended")

    # ------------------------------------------------------------------ exceptions
    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._restore_sigint()  # Lightning does not call teardown hooks after an exception
        if isinstance(exception, SIGTERMException):
            self.stop_reason = "preempted"
            if self.saved_step == trainer.global_step:
                return  # saved at the end of the step already
        elif isinstance(exception, KeyboardInterrupt):
            self.stop_reason = "interrupted"
            return
        if trainer.global_step == 0:
            return  # no update made: nothing worth a checkpoint
        if trainer.world_size > 1:
            log.error("%s on one of %d ranks: no checkpoint written (the other ranks cannot join a save); the "
                      "periodic checkpoints are kept", type(exception).__name__, trainer.world_size)
            return
        if not pl_module.resumable_mid_batch():
            log.error("%s after this batch had updated the weights: no checkpoint written (a resume would "
                      "repeat the update); the periodic checkpoints are kept", type(exception).__name__)
            return
        try:
            self._save(trainer, f"{type(exception).__name__} at step {trainer.global_step}")
        except Exception:  # never hide the original error behind a failed save
            log.exception("could not save a checkpoint after the failure")
