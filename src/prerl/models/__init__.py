"""Model specs (instantiated by Hydra from configs/model/*.yaml) and policy helpers.

Public names are imported lazily (PEP 562), so ``python -m prerl.models.smollm2`` and light
imports such as ``from prerl.models.params import count_parameters`` stay cheap.
"""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING, Any


class _NoKernelsHubWarning(logging.Filter):
    """bitsandbytes' CPU backend warns at import, on CPUs with AVX512-BF16, that the optional
    ``kernels`` package is missing ("Failed to load CPU gemm_4bit_forward from kernels-community").
    Harmless here: that kernel only serves 4-bit layers repacked into bitsandbytes' CPU inference
    layout, which prerl turns off (``quant.disable_cpu_inference_repacking``). peft imports
    bitsandbytes, so every LoRA run would print it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "kernels-community" not in record.getMessage()


# Installed before any prerl code imports peft or bitsandbytes (they log through this logger).
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_NoKernelsHubWarning())

_EXPORTS = {
    "ModelSpec": "spec",
    "DTYPES": "spec",
    "resolve_dtype": "spec",
    "align_generation_config": "spec",
    "TinyModelSpec": "tiny",
    "SmolLM2Spec": "smollm2",
    "convert_smollm2": "smollm2",
    "HFModelSpec": "hf",
    "ModelUnavailableError": "hf",
    "NotAModelFolderError": "hf",
    "LoraSettings": "lora",
    "apply_lora": "lora",
    "is_lora_model": "lora",
    "QuantizationSettings": "quant",
    "is_quantized": "quant",
    "disable_cpu_inference_repacking": "quant",
    "adapter_state_dict": "export",
    "trainable_state_dict": "export",
    "load_trainable_state_dict": "export",
    "merged_state_dict": "export",
    "export_pretrained": "export",
    "ParamCount": "params",
    "count_parameters": "params",
    "trainable_parameters": "params",
    "unwrap_policy": "params",
    "CHATML_TEMPLATE": "tokenizer",
    "build_tiny_tokenizer": "tokenizer",
    "configure_chat_tokenizer": "tokenizer",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # for type checkers and IDEs
    from .hf import HFModelSpec, ModelUnavailableError, NotAModelFolderError
    from .lora import LoraSettings, apply_lora, is_lora_model
    from .quant import QuantizationSettings, disable_cpu_inference_repacking, is_quantized
    from .export import (
        adapter_state_dict,
        export_pretrained,
        load_trainable_state_dict,
        merged_state_dict,
        trainable_state_dict,
    )
    from .params import ParamCount, count_parameters, trainable_parameters, unwrap_policy
    from .smollm2 import SmolLM2Spec, convert_smollm2
    from .spec import DTYPES, ModelSpec, align_generation_config, resolve_dtype
    from .tiny import TinyModelSpec
    from .tokenizer import CHATML_TEMPLATE, build_tiny_tokenizer, configure_chat_tokenizer
