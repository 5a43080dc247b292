"""Build everything from a Hydra config, validate, train, validate again, print a summary.

Thin by design (lightning-hydra-template): all logic lives in the components it instantiates.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from prerl.checkpointing import resolve_checkpoint

log = logging.getLogger(__name__)


def instantiate_group(cfg: DictConfig | None) -> list[Any]:
    """Instantiate every entry of a dict-of-configs group (callbacks, loggers)."""
    if not cfg:
        return []
    items = []
    for name, node in cfg.items():
        if not isinstance(node, DictConfig) or "_target_" not in node:
            raise ValueError(f"config entry {name!r} must be a mapping with a _target_")
        items.append(hydra.utils.instantiate(node))
    return items


def build(cfg: DictConfig) -> tuple[L.LightningDataModule, L.LightningModule, L.Trainer]:
    """Instantiate data, module and trainer. The network itself is built later in configure_model."""
    spec = hydra.utils.instantiate(cfg.model)
    tokenizer = spec.build_tokenizer()  # fails early on a bad model path
    # The model's chat-template options (e.g. Qwen3 enable_thinking) complete the data's.
    template_kwargs = {**(cfg.data.get("chat_template_kwargs") or {}), **spec.chat_template_kwargs}
    datamodule = hydra.utils.instantiate(cfg.data, tokenizer=tokenizer, chat_template_kwargs=template_kwargs)
    module = hydra.utils.instantiate(
        cfg.module,
        model=spec,
        tokenizer=tokenizer,
        objective=hydra.utils.instantiate(cfg.objective),
        reward=hydra.utils.instantiate(cfg.reward),
    )
    trainer = hydra.utils.instantiate(
        cfg.trainer, callbacks=instantiate_group(cfg.get("callbacks")), logger=instantiate_group(cfg.get("logger")) or False
    )
    return datamodule, module, trainer


def _val_metrics(results: list[dict]) -> dict[str, float]:
    return {k: float(v) for k, v in (results[0] if results else {}).items()}


def format_summary(summary: dict) -> str:
    """A small before/after table for the console."""
    keys = sorted(set(summary.get("before", {})) | set(summary.get("after", {})))
    lines = ["", "=" * 64, f"{'metric':<28}{'before':>12}{'after':>12}{'change':>12}", "-" * 64]
    for key in keys:
        before, after = summary.get("before", {}).get(key), summary.get("after", {}).get(key)
        fmt = lambda v: f"{v:12.4f}" if v is not None else f"{'-':>12}"  # noqa: E731
        change = fmt(after - before) if before is not None and after is not None else f"{'-':>12}"
        lines.append(f"{key:<28}{fmt(before)}{fmt(after)}{change}")
    lines.append("-" * 64)
    lines.append(
        f"steps={summary['global_step']}  phase={summary['final_phase']}  "
        f"train_time={summary['train_seconds']:.0f}s  output={summary['output_dir']}"
    )
    lines.append("=" * 64)
    return "\n".join(lines)


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run one training job; return the summary (also written to summary.json)."""
    L.seed_everything(cfg.seed, workers=True)
    datamodule, module, trainer = build(cfg)
    output_dir = Path(cfg.paths.output_dir)
    for logger in trainer.loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))

    summary: dict[str, Any] = {"tags": list(cfg.get("tags", [])), "output_dir": str(output_dir)}
    ckpt_path = resolve_checkpoint(cfg.get("ckpt_path"))
    if cfg.get("validate_before") and ckpt_path is None:  # a resumed run's "before" is its first run's
        summary["before"] = _val_metrics(trainer.validate(module, datamodule=datamodule, verbose=False))
    started = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    summary["train_seconds"] = time.perf_counter() - started
    if cfg.get("validate_after"):
        summary["after"] = _val_metrics(trainer.validate(module, datamodule=datamodule, verbose=False))
    summary["global_step"] = trainer.global_step
    summary["final_phase"] = module.phase + 1
    summary["train_metrics"] = {  # the last update's values (NaN: not computed on that step)
        k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/") and not torch.isnan(v)
    }
    if trainer.is_global_zero:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        print(format_summary(summary), flush=True)
    return summary
