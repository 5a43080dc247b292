"""One folder per run: a unique name, and a refusal to reuse a folder another run has written."""

from __future__ import annotations

import os
import secrets
import time
from pathlib import Path

_RUN_NAME: str | None = None


def run_name() -> str:
    """This process's run name: ``<YYYY-mm-dd_HH-MM-SS>_<6 hex digits>``, or ``$PRERL_RUN_ID``.

    The random suffix keeps two runs started in the same second apart. Processes launched by
    Lightning get the parent's folder from Lightning; processes of a torchrun / SLURM job compose
    their configs separately, so set ``PRERL_RUN_ID`` (e.g. to ``$SLURM_JOB_ID``) to give them one
    folder. Computed once per process (Hydra resolves the run folder more than once).
    """
    global _RUN_NAME
    if _RUN_NAME is None:
        _RUN_NAME = os.environ.get("PRERL_RUN_ID") or f"{time.strftime('%Y-%m-%d_%H-%M-%S')}_{secrets.token_hex(3)}"
    return _RUN_NAME


class RunFolderInUseError(RuntimeError):
    """The run folder already holds another run's results or checkpoints."""


def claim_run_folder(output_dir: str | Path) -> None:
    """Refuse a folder in which another run has written a summary or checkpoints (its config,
    log, events and checkpoints would mix with this run's)."""
    folder = Path(output_dir)
    checkpoints = folder / "checkpoints"
    used = (folder / "summary.json").exists() or (checkpoints.is_dir() and any(checkpoints.iterdir()))
    if used:
        raise RunFolderInUseError(
            f"{folder} already holds another run's summary or checkpoints; give this run its own folder "
            "(the default, logs/<task>/runs/<time>_<id>) and resume with ckpt_path=<that folder> instead"
        )
