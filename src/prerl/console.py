"""What the console shows of an error: one line with its hint, last; the traceback goes to the
run's log file (and to the console too with ``HYDRA_FULL_ERROR=1``)."""

from __future__ import annotations

import logging
import os
import sys


class NoLightningTips(logging.Filter):
    """Lightning advertises its cloud services (litlogger, litmodels) on every Trainer; it has no
    switch for it, and these lines say nothing about the run."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("💡 Tip:")


# Installed on import: every entry point that builds a Trainer imports prerl.module, which imports this.
logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(NoLightningTips())


def full_errors() -> bool:
    """``HYDRA_FULL_ERROR=1``: tracebacks on the console as well (Hydra's own switch)."""
    return os.environ.get("HYDRA_FULL_ERROR") == "1"


class FileOnly(logging.Filter):
    """On a console handler: drop records logged with ``extra={"file_only": True}`` (a traceback
    that the log file keeps), unless ``HYDRA_FULL_ERROR=1``."""

    def filter(self, record: logging.LogRecord) -> bool:
        return full_errors() or not getattr(record, "file_only", False)


def log_file() -> str | None:
    """The run's log file (Hydra's file handler), if logging is set up."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            return handler.baseFilename
    return None


def log_traceback(err: BaseException, message: str) -> None:
    """The traceback of ``err`` to the log file only (once: ``report_error`` then skips it)."""
    logging.getLogger("prerl").error(message, exc_info=err, extra={"file_only": True})
    err.prerl_logged = True


def report_error(err: BaseException, logged: bool = True) -> int:
    """Print ``error: <message>`` and where the traceback is, last on stderr; the exit code (1).
    ``logged``: the run's log file is set up (not yet in a Hydra callback before the run): the
    traceback goes there, if it is not there already."""
    if logged and not getattr(err, "prerl_logged", False):
        log_traceback(err, "failed")
    where = log_file() if logged else None
    print(f"\nerror: {type(err).__name__}: {err}" + (f"\n(traceback in {where}; HYDRA_FULL_ERROR=1 prints it here)"
                                                     if where else ""), file=sys.stderr, flush=True)
    return 1
