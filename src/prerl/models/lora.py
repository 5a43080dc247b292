"""LoRA settings and their application with peft.

Kept separate from the specs so that callers (e.g. checkpoint callbacks that save adapters only)
can import :func:`is_lora_model` without touching the model-building code.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch

from prerl.config_fields import from_mapping


@dataclass(frozen=True)
class LoraSettings:
    """LoRA hyper-parameters (mapped one-to-one to ``peft.LoraConfig``).

    ``dropout`` defaults to 0: in RL the log-probs of the sampling pass and of the training pass
    must come from the same function, and dropout would make the importance ratio != 1 even for
    on-policy data.
    """

    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: str | tuple[str, ...] = "all-linear"
    bias: str = "none"

    def __post_init__(self) -> None:
        if int(self.r) <= 0:
            raise ValueError(f"lora.r must be a positive integer, got {self.r!r}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout!r}")
        if self.bias not in ("none", "all", "lora_only"):
            raise ValueError(f"lora.bias must be 'none', 'all' or 'lora_only', got {self.bias!r}")
        tm = self.target_modules
        if not isinstance(tm, str):  # lists / ListConfig -> hashable tuple
            object.__setattr__(self, "target_modules", tuple(str(t) for t in tm))

    @classmethod
    def from_any(cls, value: Any) -> LoraSettings | None:
        """None -> None; a LoraSettings, or a mapping (dict / DictConfig) with a subset of the fields."""
        if value is None:
            return None
        if isinstance(value, LoraSettings):
            return value
        if isinstance(value, Mapping):
            return from_mapping(cls, value, "lora")
        raise TypeError(f"lora must be None, a mapping or LoraSettings, got {type(value).__name__}")

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if isinstance(d["target_modules"], tuple):
            d["target_modules"] = list(d["target_modules"])
        return d


def apply_lora(model: torch.nn.Module, settings: LoraSettings) -> torch.nn.Module:
    """Wrap ``model`` with peft LoRA adapters. Only adapter parameters stay trainable.

    peft keeps adapter weights in float32 even when the base is bf16/fp16
    (``autocast_adapter_dtype=True``), which is what optimizers want.
    """
    from peft import LoraConfig, get_peft_model

    tm = settings.target_modules
    config = LoraConfig(
        r=int(settings.r),
        lora_alpha=settings.alpha,
        lora_dropout=float(settings.dropout),
        target_modules=tm if isinstance(tm, str) else list(tm),
        bias=settings.bias,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def is_lora_model(model: torch.nn.Module) -> bool:
    """True for a peft-wrapped model (possibly itself wrapped by DDP / torch.compile)."""
    from .params import _is_peft, unwrap_policy  # local import: avoid a cycle at import time

    return _is_peft(unwrap_policy(model, strip_peft=False))
