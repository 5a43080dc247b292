"""Export a training checkpoint as a Hugging Face folder that loads with plain transformers.

    python -m prerl.export logs/train/runs/<run>/checkpoints/last.ckpt out/policy            # merged
    python -m prerl.export logs/train/runs/<run>/checkpoints/last.ckpt out/adapter --adapter  # LoRA only

The model is rebuilt from the run's own config (``<run>/.hydra/config.yaml``), the checkpoint's
policy weights are loaded (full, or LoRA adapters over the rebuilt base), and the folder is
written atomically. Merged folders load with ``AutoModelForCausalLM.from_pretrained``; adapter
folders with ``peft.PeftModel.from_pretrained`` over the same base.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import hydra
import torch
from omegaconf import OmegaConf

from prerl.checkpointing import resolve_checkpoint
from prerl.models.export import export_pretrained

log = logging.getLogger(__name__)
PREFIX = "policy."


def run_config_of(ckpt: Path) -> Path:
    """``<run>/.hydra/config.yaml`` for ``<run>/checkpoints/<file>``."""
    config = ckpt.resolve().parent.parent / ".hydra" / "config.yaml"
    if not config.is_file():
        raise FileNotFoundError(f"{config} not found: pass --config with the run's resolved Hydra config")
    return config


def load_policy(ckpt_path: str | Path, config_path: str | Path | None = None):
    """Rebuild the run's policy and tokenizer and load the checkpoint's policy weights into it."""
    ckpt = Path(resolve_checkpoint(ckpt_path))
    cfg = OmegaConf.load(config_path or run_config_of(ckpt))
    spec = hydra.utils.instantiate(cfg.model)
    tokenizer, policy = spec.build_tokenizer(), spec.build_model()
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    weights = {k[len(PREFIX) :]: v for k, v in state.items() if k.startswith(PREFIX)}
    if not weights:
        raise KeyError(f"{ckpt} holds no policy weights (keys starting with {PREFIX!r})")
    adapter_only = hasattr(policy, "disable_adapter")
    missing, unexpected = policy.load_state_dict(weights, strict=not adapter_only)
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    if unexpected or (adapter_only and trainable & set(missing)):
        raise KeyError(f"checkpoint does not match the model: missing {sorted(trainable & set(missing))[:3]}, "
                       f"unexpected {sorted(unexpected)[:3]}")
    return policy.eval(), tokenizer


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ckpt", help="a checkpoint, or a checkpoints/ folder (newest valid one)")
    parser.add_argument("out", help="output folder")
    parser.add_argument("--adapter", action="store_true", help="save LoRA adapters only (default: merged)")
    parser.add_argument("--config", default=None, help="the run's .hydra/config.yaml (default: found from ckpt)")
    parser.add_argument("--dtype", default=None, help="dtype of merged weights (default: the model's)")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    policy, tokenizer = load_policy(args.ckpt, args.config)
    out = export_pretrained(policy, tokenizer, args.out, merge=not args.adapter, dtype=args.dtype, overwrite=args.overwrite)
    print(f"exported to {out}")
    return out


if __name__ == "__main__":
    main()
