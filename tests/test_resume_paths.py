"""What ``ckpt_path`` may name: a checkpoint file, a checkpoints/ folder, a run folder, or ``last``
(prerl.checkpointing.resolve_checkpoint)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from prerl.checkpointing import resolve_checkpoint


def ckpt(path: Path, mtime: float, valid: bool = True) -> Path:
    """A checkpoint file with a given modification time (a truncated one when not valid)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"global_step": int(mtime), "state_dict": {"w": torch.zeros(1)}, "prerl_state": {"phase": 0}}, path)
    if not valid:
        path.write_bytes(path.read_bytes()[:40])
    os.utime(path, (mtime, mtime))
    return path


@pytest.fixture
def runs(tmp_path) -> Path:
    """logs/<task>/runs with four run folders; folder names deliberately do not sort by age."""
    runs = tmp_path / "logs" / "train" / "runs"
    ckpt(runs / "2026-12-01_09-00-00_ffffff" / "checkpoints" / "last.ckpt", 1_000)
    ckpt(runs / "2026-12-01_08-00-00_aaaaaa" / "checkpoints" / "step00004.ckpt", 2_000)  # newest valid
    ckpt(runs / "2026-12-01_08-00-00_aaaaaa" / "checkpoints" / "last.ckpt", 1_500)
    ckpt(runs / "2026-12-01_10-00-00_bbbbbb" / "checkpoints" / "last.ckpt", 3_000, valid=False)  # newest, corrupt
    (runs / "2026-12-01_11-00-00_cccccc").mkdir()  # the new run's own folder: no checkpoints yet
    return runs


def test_a_checkpoint_file_is_used_as_is(runs):
    path = runs / "2026-12-01_09-00-00_ffffff" / "checkpoints" / "last.ckpt"
    assert resolve_checkpoint(str(path)) == str(path)


def test_a_checkpoints_folder_gives_its_newest_valid_checkpoint(runs):
    folder = runs / "2026-12-01_08-00-00_aaaaaa" / "checkpoints"
    assert resolve_checkpoint(folder) == str(folder / "step00004.ckpt")


def test_a_run_folder_stands_for_its_checkpoints_folder(runs):
    run = runs / "2026-12-01_08-00-00_aaaaaa"
    assert resolve_checkpoint(str(run)) == str(run / "checkpoints" / "step00004.ckpt")


def test_a_run_folder_without_valid_checkpoints_says_where_it_looked(runs):
    run = runs / "2026-12-01_10-00-00_bbbbbb"
    with pytest.raises(FileNotFoundError, match=r"no valid checkpoint in .*bbbbbb/checkpoints \(1 invalid or weightless"):
        resolve_checkpoint(run)


def test_last_is_the_newest_valid_checkpoint_over_all_runs_by_modification_time(runs):
    # not the newest folder name (cccccc: no checkpoints; bbbbbb: corrupt), not the newest run by name
    assert resolve_checkpoint("last", runs_dir=runs) == str(runs / "2026-12-01_08-00-00_aaaaaa" / "checkpoints" / "step00004.ckpt")


def test_last_skips_a_run_whose_newest_checkpoint_is_corrupt_but_uses_an_older_valid_one(runs):
    ckpt(runs / "2026-12-01_10-00-00_bbbbbb" / "checkpoints" / "step00002.ckpt", 2_500)
    assert resolve_checkpoint("last", runs_dir=runs).endswith("bbbbbb/checkpoints/step00002.ckpt")


def test_last_with_no_valid_checkpoint_anywhere(tmp_path):
    runs = tmp_path / "runs"
    ckpt(runs / "a" / "checkpoints" / "last.ckpt", 1_000, valid=False)
    (runs / "b").mkdir()
    with pytest.raises(FileNotFoundError, match=r"ckpt_path=last: no usable checkpoint in any run folder of .*runs"):
        resolve_checkpoint("last", runs_dir=runs)
    with pytest.raises(FileNotFoundError, match=r"ckpt_path=last: .*does not exist"):
        resolve_checkpoint("last", runs_dir=tmp_path / "no_runs_yet")


def test_last_needs_the_runs_folder():
    with pytest.raises(ValueError, match="ckpt_path=last needs the folder of this task's runs"):
        resolve_checkpoint("last")


def test_none_and_missing_paths():
    assert resolve_checkpoint(None) is None
    with pytest.raises(FileNotFoundError, match="nope.ckpt does not exist"):
        resolve_checkpoint("/nonexistent/nope.ckpt")


def test_a_checkpoint_without_weights_is_never_used(runs):
    folder = runs / "2026-12-01_08-00-00_aaaaaa" / "checkpoints"
    weightless = folder / "step00009.ckpt"
    torch.save({"global_step": 9, "state_dict": {}, "prerl_state": {"phase": 0}}, weightless)
    os.utime(weightless, (5_000, 5_000))  # the newest of all
    assert resolve_checkpoint(folder) == str(folder / "step00004.ckpt")
    assert resolve_checkpoint(weightless) == str(folder / "step00004.ckpt")  # its newest usable sibling
    assert resolve_checkpoint("last", runs_dir=runs) == str(folder / "step00004.ckpt")
