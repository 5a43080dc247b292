"""Small helpers about a policy's parameters."""

from __future__ import annotations

import sys
from typing import NamedTuple

import torch


class ParamCount(NamedTuple):
    trainable: int
    total: int

    @property
    def fraction(self) -> float:
        return self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return f"{self.trainable:,} trainable / {self.total:,} total ({100 * self.fraction:.2f}%)"


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters an optimizer should see (``requires_grad=True``), in module order."""
    return [p for p in model.parameters() if p.requires_grad]


def count_parameters(model: torch.nn.Module) -> ParamCount:
    """Trainable vs total parameter count (tied weights counted once)."""
    trainable = total = 0
    for p in model.parameters():  # .parameters() already de-duplicates tied tensors
        n = p.numel()
        total += n
        if p.requires_grad:
            trainable += n
    return ParamCount(trainable, total)


def disable_dropout(model: torch.nn.Module) -> int:
    """Set every dropout probability of ``model`` to 0 (TRL's ``disable_dropout_in_model``), also the
    attention dropout that Hugging Face attention modules keep as a float; returns how many were
    non-zero. Scoring is then deterministic, so a recomputed log-prob equals the sampling policy's."""
    changed = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout) and module.p:
            module.p, changed = 0.0, changed + 1
        if isinstance(getattr(module, "attention_dropout", None), float) and module.attention_dropout:
            module.attention_dropout, changed = 0.0, changed + 1
    return changed


def unwrap_policy(model: torch.nn.Module, *, strip_peft: bool = True) -> torch.nn.Module:
    """Strip DDP / FSDP1 (``.module``), ``torch.compile`` (``._orig_mod``) and, unless
    ``strip_peft`` is False, the peft wrapper, returning the underlying HF causal LM (LoRA layers
    stay in place). FSDP2 (``fully_shard``) keeps the module's class, so there is nothing to strip."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, torch.nn.parallel.DistributedDataParallel | FullyShardedDataParallel):
            model = model.module
        elif strip_peft and _is_peft(model):
            model = model.get_base_model()
        else:
            return model


def _is_peft(model: torch.nn.Module) -> bool:
    # A peft model exists only once peft is imported: asking an unimported peft would import it,
    # and with it bitsandbytes (whose CPU backend warns about an optional kernel) on every run.
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)
