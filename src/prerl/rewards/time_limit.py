"""Wall-clock limits on code that may hang, with ``SIGALRM`` (POSIX, main thread only).

Used by :class:`~prerl.rewards.MathVerifyReward` (one response's parse + verify) and by
:class:`~prerl.rewards.PluginReward` (one call of the reward, ``reward.timeout_s``). The two nest:
the plug-in limit around the default reward holds math-verify's limits inside it.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["time_limit", "signals_usable"]


def signals_usable() -> bool:
    """True when a SIGALRM-based timer can be installed here (POSIX, main thread)."""
    return hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()


@contextmanager
def time_limit(seconds: float | None, exc_type: type[BaseException]) -> Iterator[None]:
    """Raise ``exc_type`` inside the block after ``seconds`` (main thread only).

    No-op when ``seconds`` is None/<=0 or signals are unusable here. Nesting-safe: an enclosing
    limit (an earlier ITIMER_REAL with a Python handler) that is due first still fires on time, by
    its own handler, inside this block; otherwise it is re-armed afterwards with the elapsed time
    subtracted.
    """
    if not seconds or seconds <= 0 or not signals_usable():
        yield
        return

    start = time.monotonic()
    deadline = start + seconds
    old_handler = signal.getsignal(signal.SIGALRM)
    old_delay, old_interval = signal.setitimer(signal.ITIMER_REAL, 0)
    outer_pending = old_delay > 0  # the enclosing timer has yet to fire
    outer_first = outer_pending and old_delay < seconds and callable(old_handler)

    def _handler(signum, frame):
        nonlocal outer_first, outer_pending
        if outer_first:  # the enclosing limit's moment: its handler acts, this limit keeps running
            outer_first = outer_pending = False
            signal.setitimer(signal.ITIMER_REAL, max(deadline - time.monotonic(), 1e-3))
            old_handler(signum, frame)
            return
        raise exc_type(f"exceeded the time limit of {seconds} s")

    signal.signal(signal.SIGALRM, _handler)
    signal.setitimer(signal.ITIMER_REAL, min(seconds, old_delay) if outer_first else float(seconds))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old_handler)
        if outer_pending:
            remaining = max(old_delay - (time.monotonic() - start), 1e-3)
            signal.setitimer(signal.ITIMER_REAL, remaining, old_interval)
