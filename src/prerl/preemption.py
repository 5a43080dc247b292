"""SIGTERM, the scheduler's pre-emption signal, handled the same way on every rank (and SIGUSR1,
the warning signal SLURM sends with ``#SBATCH --signal=USR1@<seconds>``, the same way).

Lightning's own SIGTERM handler broadcasts a tensor from inside the signal handler. With the signal
delivered to every process at once (SLURM, ``timeout``, ``kill -- -PGID``) each rank enters that
broadcast at a different point of its own collective sequence, and a 2-process run deadlocks
before anything is saved. This module replaces it with a handler that only records the request:

- outside the training loop (building, validation before or after training) there is nothing
  unsaved, so the handler raises ``SIGTERMException`` at once on each rank (the run ends
  ``preempted``, exit 143);
- inside it (``defer(True)``, set by :class:`~prerl.callbacks.FaultCheckpoint`) the request waits
  for the end of the step under way, where all ranks agree on it in one collective, save one
  checkpoint together and stop;
- a single-process run also stops at once inside :func:`interruptible` code (a user's reward that
  may hang): the state at the start of that batch is saved instead. With several ranks that is
  not possible (the other ranks wait in the step's collectives): bound such code with a time
  limit (``reward.timeout_s``).

The first signal is forwarded to the processes Lightning launched, so a signal sent to the launcher
alone (``kill PID``, ``timeout``) still reaches every rank. Lightning's own SLURM auto-requeue (on
SIGUSR1) is not used: it saves from inside the signal handler, in the middle of a step (not an
exact resume point; a collective under FSDP); with this handler in place Lightning does not
register it.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from lightning.pytorch.utilities.exceptions import SIGTERMException

log = logging.getLogger(__name__)


class _State:
    def __init__(self) -> None:
        self.requested = False      # a SIGTERM arrived in this run
        self.deferred = False       # inside the training loop: stop at the end of the step
        self.single_process = True  # interruptible code may be stopped mid-step
        self.interruptible = 0      # depth of interruptible() sections under way
        self.forward: Callable[[int], None] | None = None
        self.previous: dict = {}    # the handlers before install()


_state = _State()


def _on_sigterm(signum, frame) -> None:
    first = not _state.requested
    _state.requested = True
    now = not _state.deferred or bool(_state.interruptible and _state.single_process)
    if first:
        # os.write, not logging: a handler must not take the logging lock the interrupted code may hold.
        when = "now" if now else "at the end of the step under way"
        os.write(2, f"[pid {os.getpid()}] {signal.Signals(signum).name} received: stopping {when}\n".encode())
        if _state.forward is not None:
            _state.forward(signum)
    if now:
        raise SIGTERMException()


STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def install() -> None:
    """Make SIGTERM and SIGUSR1 stop requests for this process (main thread only; a no-op elsewhere)."""
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in STOP_SIGNALS:
        previous = signal.signal(signum, _on_sigterm)
        if previous is not _on_sigterm:
            _state.previous[signum] = previous


def uninstall() -> None:
    """Restore the handlers that ``install`` replaced and forget this run's request."""
    global _state
    if threading.current_thread() is threading.main_thread():
        for signum, previous in _state.previous.items():
            signal.signal(signum, previous)
    _state = _State()


def take_over(trainer) -> None:
    """Silence Lightning's SIGTERM handler for this trainer (it broadcasts from inside the handler);
    Lightning re-registers it at every fit/validate and keeps ours as the handler already in place,
    which it then calls. The first SIGTERM is forwarded to the ranks Lightning launched."""
    trainer._signal_connector._sigterm_notifier_fn = lambda signum, frame: None
    launcher = trainer.strategy.launcher
    _state.forward = (lambda signum: launcher.kill(signum)) if hasattr(launcher, "procs") else None
    _state.single_process = trainer.world_size == 1


def requested() -> bool:
    """True once a SIGTERM arrived in this run."""
    return _state.requested


def defer(on: bool) -> None:
    """Inside the training loop (on) a SIGTERM waits for the end of the step under way."""
    _state.deferred = on


@contextmanager
def interruptible() -> Iterator[None]:
    """Code that may hang (a user's reward). In a single-process run a SIGTERM that arrives while it
    runs raises ``SIGTERMException`` here at once, in the middle of the step (one that arrived
    before lets the step finish: the usual case of a reward that returns)."""
    _state.interruptible += 1
    try:
        yield
    finally:
        _state.interruptible -= 1


def spawned_by_lightning() -> bool:
    """True in the processes Lightning's launcher starts for ranks 1, 2, ... (it runs them with
    ``hydra.job.name=train_ddp_process_<rank>``). Their exit code is watched by the launcher, which
    kills every rank when one exits non-zero: they exit 0 after a pre-emption, the launcher 143."""
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.initialized() and str(HydraConfig.get().job.name).startswith("train_ddp_process_")
