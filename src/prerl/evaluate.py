"""Evaluate a policy (initial weights or a training checkpoint) on the validation split."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
from omegaconf import DictConfig

from prerl.checkpointing import resolve_checkpoint
from prerl.train import build


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Run validation once; return and save its metrics (avg@k, pass@k, lengths)."""
    L.seed_everything(cfg.seed, workers=True)
    datamodule, module, trainer = build(cfg)
    # Lightning restores the checkpoint (full or adapter-only, sharded or not) like a resume would.
    runs = Path(cfg.paths.log_dir) / cfg.get("checkpoints_of", cfg.task_name) / "runs"  # for ckpt_path=last
    ckpt_path = resolve_checkpoint(cfg.get("ckpt_path"), runs_dir=runs)
    (metrics,) = trainer.validate(module, datamodule=datamodule, ckpt_path=ckpt_path, verbose=True)
    result = {"ckpt_path": ckpt_path, "metrics": {k: float(v) for k, v in metrics.items()}}
    if trainer.is_global_zero:
        out = Path(cfg.paths.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "eval.json").write_text(json.dumps(result, indent=2))
    return result
