"""Checkpoints that survive faults: atomic writes, validity checks, resume resolution, RNG state.

- ``AtomicCheckpointIO`` writes ``<name>.tmp`` and renames it, so a process killed mid-save
  leaves the previous file intact and never a truncated one under the final name.
- ``resolve_checkpoint`` turns ``ckpt_path`` (a file or a folder of checkpoints) into the newest
  checkpoint that passes ``is_valid_checkpoint``, skipping truncated or corrupt ones.
- ``capture_rng_state`` / ``restore_rng_state`` carry python, numpy and torch (CPU and CUDA)
  generators, so sampling after a resume continues exactly where it stopped.
"""

from __future__ import annotations

import logging
import os
import random
import zipfile
from pathlib import Path
from typing import Any

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


def _candidates(folder: Path) -> list[Path]:
    found = [p for p in folder.iterdir() if p.suffix == ".ckpt" and not p.name.startswith(".")]
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


def resolve_checkpoint(ckpt_path: str | Path | None) -> str | None:
    """The checkpoint to resume from.

    ``ckpt_path`` may be None (start fresh), a checkpoint, or a folder of checkpoints (the newest
    valid one is used). A checkpoint that is truncated or corrupt is skipped with a warning in
    favour of the newest valid one beside it; if none is valid, FileNotFoundError.
    """
    if ckpt_path is None:
        return None
    path = Path(ckpt_path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"ckpt_path {path} does not exist")
    if path.is_dir() and not (path / SHARDED_METADATA).is_file():
        candidates, folder = _candidates(path), path
    elif is_valid_checkpoint(path):
        return str(path)
    else:
        folder = path.parent
        log.warning("checkpoint %s is truncated or corrupt; looking for the newest valid one in %s", path, folder)
        candidates = [p for p in _candidates(folder) if p != path]
    for candidate in candidates:
        if is_valid_checkpoint(candidate):
            log.info("resuming from %s", candidate)
            return str(candidate)
        log.warning("skipping invalid checkpoint %s", candidate)
    raise FileNotFoundError(f"no valid checkpoint in {folder} (from ckpt_path={ckpt_path})")


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
