"""Evaluate a policy (initial weights or a training checkpoint) on the validation split."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig

from prerl.train import build

log = logging.getLogger(__name__)


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Run validation once; return and save its metrics (avg@k, pass@k, lengths)."""
    L.seed_everything(cfg.seed, workers=True)
    datamodule, module, trainer = build(cfg)
    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path:
        path = Path(ckpt_path)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {path} does not exist")
        module.configure_model()
        state = torch.load(path, map_location="cpu", weights_only=False)
        module.load_state_dict(state["state_dict"])
        log.info("loaded %s (global step %s)", path, state.get("global_step"))
    (metrics,) = trainer.validate(module, datamodule=datamodule, verbose=True)
    result = {"ckpt_path": ckpt_path, "metrics": {k: float(v) for k, v in metrics.items()}}
    if trainer.is_global_zero:
        out = Path(cfg.paths.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "eval.json").write_text(json.dumps(result, indent=2))
    return result
