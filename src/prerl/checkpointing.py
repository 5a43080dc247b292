"""Checkpoints that survive faults: atomic writes, validity checks, resume resolution, RNG state.

- ``AtomicCheckpointIO`` writes ``<name>.tmp`` and renames it, so a process killed mid-save
  leaves the previous file intact and never a truncated one under the final name.
- ``resolve_checkpoint`` turns ``ckpt_path`` (a file, a folder of checkpoints, a run folder or
  ``last``) into the newest checkpoint that passes ``is_valid_checkpoint`` and holds weights,
  skipping truncated, corrupt or weightless ones (and, for ``last``, those a caller's ``accept``
  refuses: another model's).
- ``capture_rng_state`` / ``restore_rng_state`` carry python, numpy and torch (CPU and CUDA)
  generators, so sampling after a resume continues exactly where it stopped.
- ``rewind_to_previous_batch_end`` makes a checkpoint written inside a failed batch resume at
  that batch; ``check_phases`` refuses a checkpoint whose objective has other phases.
"""

from __future__ import annotations

import logging
import os
import random
import zipfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

log = logging.getLogger(__name__)

SHARDED_METADATA = "meta.pt"  # Lightning's metadata file inside a sharded FSDP checkpoint folder


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` to a temporary file in the same folder, fsync, then ``os.replace``."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options")
        if "://" in str(path):  # remote filesystems: no rename semantics to rely on
            return super().save_checkpoint(checkpoint, path)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


def is_valid_checkpoint(path: str | Path) -> bool:
    """True if ``path`` is a complete checkpoint: a torch zip file whose entries all pass their
    CRC check, or a sharded FSDP folder with its metadata file."""
    path = Path(path)
    if path.is_dir():
        return (path / SHARDED_METADATA).is_file() and (path / ".metadata").is_file()
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.testzip() is None and any(n.endswith("data.pkl") for n in archive.namelist())
    except (zipfile.BadZipFile, OSError, EOFError):
        return False


def checkpoint_step(path: str | Path) -> int | None:
    """The ``global_step`` a checkpoint was written at, read without loading its tensors."""
    path = Path(path)
    try:
        state = torch.load(path / SHARDED_METADATA if path.is_dir() else path, map_location="cpu",
                           mmap=not path.is_dir(), weights_only=False)
    except Exception:  # noqa: BLE001 - unreadable: no step to report
        return None
    return int(state["global_step"]) if "global_step" in state else None


def holds_weights(path: str | Path) -> bool:
    """True if a checkpoint file holds a PreRLModule's state and at least one tensor of weights (a
    run that failed before building its model once wrote an 18 KB checkpoint without any). A
    sharded folder's weights are in its shards: True."""
    path = Path(path)
    if path.is_dir():
        return True
    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except Exception:  # noqa: BLE001 - unreadable is not usable
        return False
    return "prerl_state" in state and bool(state.get("state_dict"))


def _candidates(folder: Path) -> list[Path]:
    """The ``*.ckpt`` entries of ``folder`` (files, or sharded FSDP folders), newest first."""
    found = [p for p in folder.iterdir() if p.suffix == ".ckpt" and not p.name.startswith(".")]
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


LAST = "last"  # ckpt_path keyword: the newest valid checkpoint of this task's runs


Accept = Callable[[Path], "str | None"]  # a reason to skip a checkpoint (e.g. another model's), or None


def _problem(candidate: Path, accept: Accept | None) -> str | None:
    if not is_valid_checkpoint(candidate):
        return "truncated or corrupt"
    if not holds_weights(candidate):
        return "holds no weights"
    return accept(candidate) if accept is not None else None


def _newest_valid(folder: Path, exclude: Path | None = None, accept: Accept | None = None) -> tuple[Path | None, int]:
    """(newest usable checkpoint in ``folder`` or None, number of unusable ones skipped)."""
    skipped = 0
    for candidate in _candidates(folder):
        if candidate == exclude:
            continue
        problem = _problem(candidate, accept)
        if problem is None:
            return candidate, skipped
        log.warning("skipping checkpoint %s: %s", candidate, problem)
        skipped += 1
    return None, skipped


def _checkpoint_folder(path: Path) -> Path:
    """A run folder (logs/<task>/runs/<run>) stands for its checkpoints/ subfolder."""
    sub = path / "checkpoints"
    return sub if sub.is_dir() else path


def _resolve_last(runs_dir: str | Path | None, accept: Accept | None = None) -> str:
    """``ckpt_path=last``: the newest usable checkpoint (by modification time) over every run folder
    in ``runs_dir``. Run folders without one (such as the new run's own, just created) are skipped."""
    if runs_dir is None:
        raise ValueError(
            "ckpt_path=last needs the folder of this task's runs (resolve_checkpoint(..., runs_dir=...)); "
            "give ckpt_path a checkpoint file or a run folder instead"
        )
    runs_dir = Path(runs_dir).expanduser()
    if not runs_dir.is_dir():
        raise FileNotFoundError(f"ckpt_path=last: there are no runs to resume: {runs_dir} does not exist")
    best: Path | None = None
    looked, skipped = 0, 0
    for run in sorted(p for p in runs_dir.iterdir() if p.is_dir()):
        folder = run / "checkpoints"
        if not folder.is_dir():
            continue
        looked += 1
        found, n_bad = _newest_valid(folder, accept=accept)
        skipped += n_bad
        if found is not None and (best is None or found.stat().st_mtime > best.stat().st_mtime):
            best = found
    if best is None:
        raise FileNotFoundError(
            f"ckpt_path=last: no usable checkpoint in any run folder of {runs_dir} "
            f"({looked} run folder(s) with a checkpoints/ subfolder"
            f"{f', {skipped} checkpoint(s) skipped: corrupt, weightless or of another model' if skipped else ''}); "
            "nothing to resume"
        )
    log.info("ckpt_path=last: %s (step %s)", best, checkpoint_step(best))
    return str(best)


def resolve_checkpoint(ckpt_path: str | Path | None, runs_dir: str | Path | None = None,
                       accept: Accept | None = None) -> str | None:
    """The checkpoint to resume from (a path string for ``Trainer.fit(ckpt_path=...)``), or None.

    ``ckpt_path`` may be:
      - None: start fresh;
      - a checkpoint file (or a sharded FSDP checkpoint folder): used if valid; if truncated or
        corrupt, the newest valid checkpoint beside it is used, with a warning;
      - a folder of checkpoints: its newest valid one (by modification time);
      - a run folder (``logs/<task>/runs/<run>``): the newest valid one in its ``checkpoints/``;
      - ``"last"``: the newest valid checkpoint over all run folders in ``runs_dir``
        (``logs/<task>/runs``), skipping runs that have none and checkpoints ``accept`` refuses.
    Checkpoints without weights are never used. Nothing found: FileNotFoundError saying where it looked.
    """
    if ckpt_path is None:
        return None
    if str(ckpt_path) == LAST:
        return _resolve_last(runs_dir, accept)
    path = Path(ckpt_path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"ckpt_path {path} does not exist")
    if path.is_dir() and not (path / SHARDED_METADATA).is_file():
        folder, exclude = _checkpoint_folder(path), None
    elif (problem := _problem(path, None)) is None:
        return str(path)
    else:
        folder, exclude = path.parent, path
        log.warning("checkpoint %s %s; looking for the newest usable one in %s", path, problem, folder)
    found, skipped = _newest_valid(folder, exclude)
    if found is None:
        what = f"{skipped} invalid or weightless checkpoint(s)" if skipped else "no *.ckpt checkpoint"
        raise FileNotFoundError(f"no valid checkpoint in {folder} ({what}; from ckpt_path={ckpt_path})")
    log.info("resuming from %s", found)
    return str(found)


def capture_rng_state() -> dict[str, Any]:
    """This process's python, numpy and torch (CPU and CUDA) generator states."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        # plain types and tensors only, so checkpoints load with torch.load(weights_only=True)
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of ``capture_rng_state``."""
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def rewind_to_previous_batch_end(loops: dict) -> None:
    """Make the loop counters of a checkpoint written inside a training batch (after a failure,
    before that batch updated anything) read as those of a checkpoint written at the end of the
    previous batch, where Lightning's periodic checkpoints are taken: ready = started = processed,
    completed = processed - 1, and the logging step one less. The resume then re-runs the batch
    and logs it at its own step. (Lightning 2.6 loop-state layout.)"""
    epoch_loop = loops["fit_loop"]
    progress = epoch_loop["epoch_loop.batch_progress"]
    for part in ("total", "current"):
        done = progress[part]["processed"]
        progress[part].update(ready=done, started=done, completed=max(done - 1, 0))
    state = epoch_loop["epoch_loop.state_dict"]
    state["_batches_that_stepped"] = max(state["_batches_that_stepped"] - 1, 0)


def check_phases(state: dict, num_phases: int) -> None:
    """A checkpoint's training state must fit this run's objective (e.g. a DSRL checkpoint resumed
    with a one-phase objective)."""
    saved = int(state.get("num_phases", int(state["phase"]) + 1))
    if saved != num_phases or int(state["phase"]) >= num_phases:
        kind = lambda n: "DSRL (objective=dual, 2 phases)" if n == 2 else f"a {n}-phase objective"  # noqa: E731
        raise ValueError(
            f"the checkpoint was written by {kind(saved)} (in phase {int(state['phase']) + 1}), this run's objective "
            f"is {kind(num_phases)}: resume with the objective it was trained with, or export its weights "
            "(python -m prerl.export) and start a new run from them with model=hf"
        )
