"""4-bit quantisation of the frozen base (QLoRA: bitsandbytes NF4 / FP4 base + peft LoRA adapters).

``model.quantization`` (see configs/model/qwen3_4b_qlora.yaml) is None, the shorthand ``"nf4"`` (or
``"fp4"``), or a mapping ``{type, double_quant, compute_dtype, quant_storage}`` mapped one-to-one
to ``transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_*)``.

Decisions (measured with bitsandbytes 0.50 / peft 0.21 / transformers 5.24 on CPU):

* A 4-bit base cannot be trained: quantisation requires LoRA (:class:`ModelSpec` raises otherwise).
* peft's ``prepare_model_for_kbit_training`` is deliberately NOT called. What it does:
  (1) freezes every base parameter: peft's ``get_peft_model`` already does that;
  (2) casts every non-4-bit parameter (embeddings, LM head, norms) from bf16/fp16 to float32:
      for Qwen3-4B that is +0.8 GB of weights (151936 x 2560 tied embedding), an fp32 LM-head
      matmul over a 152k vocabulary, and, because fp32 norm weights promote their outputs, an
      fp32 residual stream (2x activation memory). The norms are frozen, and transformers'
      RMSNorm already computes its statistics in float32, so the cast buys nothing for
      bf16 LoRA training; the RL losses upcast logits to float32 themselves;
  (3) ``enable_input_require_grads`` so that *reentrant* gradient checkpointing sees an input
      that requires grad: prerl uses non-reentrant checkpointing (``use_reentrant=False``), which
      needs no such hook (gradients with and without checkpointing are tested equal).
  So the non-quantised parameters stay in ``model.dtype``. For float16 training, where fp32
  norms matter for stability, prefer bfloat16 instead.
* Linear4bit biases (Qwen2-style q/k/v bias) are cast to ``compute_dtype`` right after loading.
  bitsandbytes does exactly this, in place, on the first forward anyway
  (``bias.data = bias.data.to(x.dtype)``); doing it up front means the model's state does not
  change dtype in the middle of a run (checkpoints, bit-exactness checks).
* CPU bug workaround, see :func:`disable_cpu_inference_repacking`.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch

from prerl.config_fields import from_mapping

log = logging.getLogger(__name__)

QUANT_TYPES = ("nf4", "fp4")
COMPUTE_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
# bitsandbytes packs two 4-bit values per byte and stores the packed bytes in a tensor of this
# dtype (uint8 by default). FSDP1 flattens all parameters of a wrapped unit into one buffer of a
# single dtype, so multi-GPU FSDP QLoRA needs quant_storage == the model dtype (e.g. bfloat16).
QUANT_STORAGE_DTYPES: dict[str, torch.dtype] = {
    "uint8": torch.uint8,
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def _dtype_name(value: Any, table: Mapping[str, torch.dtype], key: str) -> str:
    if isinstance(value, torch.dtype):
        for name, dt in table.items():
            if dt == value:
                return name
    else:
        name = str(value).removeprefix("torch.")
        if name in table:
            return name
    raise ValueError(f"quantization.{key}={value!r}; use one of {list(table)}")


@dataclass(frozen=True)
class QuantizationSettings:
    """4-bit weight quantisation of the frozen base model (bitsandbytes, via transformers).

    Attributes:
        type: "nf4" (NormalFloat4, the QLoRA data type for normally distributed weights) or "fp4".
        double_quant: also quantise the per-block absmax constants (saves ~0.37 bit/parameter).
        compute_dtype: dtype of the de-quantised weights in the matmuls ("bfloat16" on GPUs).
        quant_storage: dtype of the tensor holding the packed 4-bit data; None = bitsandbytes'
            default uint8. Must equal the model dtype for multi-GPU FSDP1 QLoRA.
    """

    type: str = "nf4"
    double_quant: bool = True
    compute_dtype: str = "bfloat16"
    quant_storage: str | None = None

    def __post_init__(self) -> None:
        qtype = str(self.type).lower()
        if qtype not in QUANT_TYPES:
            raise ValueError(f"quantization.type={self.type!r}; use one of {list(QUANT_TYPES)}")
        object.__setattr__(self, "type", qtype)
        if not isinstance(self.double_quant, bool):
            raise ValueError(f"quantization.double_quant must be true or false, got {self.double_quant!r}")
        object.__setattr__(self, "compute_dtype", _dtype_name(self.compute_dtype, COMPUTE_DTYPES, "compute_dtype"))
        if self.quant_storage is not None:
            object.__setattr__(
                self, "quant_storage", _dtype_name(self.quant_storage, QUANT_STORAGE_DTYPES, "quant_storage")
            )

    @classmethod
    def from_any(cls, value: Any) -> QuantizationSettings | None:
        """None -> None; "nf4" / "fp4" -> defaults with that type; a mapping (dict / DictConfig)
        with a subset of the fields; or a QuantizationSettings."""
        if value is None:
            return None
        if isinstance(value, QuantizationSettings):
            return value
        if isinstance(value, str):
            if value.lower() not in QUANT_TYPES:
                raise ValueError(
                    f"model.quantization={value!r}; use null, one of {list(QUANT_TYPES)}, or a mapping "
                    f"with keys {[f.name for f in fields(cls)]}"
                )
            return cls(type=value)
        if isinstance(value, Mapping):
            return from_mapping(cls, value, "quantization")
        raise TypeError(f"quantization must be None, 'nf4', 'fp4' or a mapping, got {type(value).__name__}")

    @property
    def compute_torch_dtype(self) -> torch.dtype:
        return COMPUTE_DTYPES[self.compute_dtype]

    @property
    def storage_torch_dtype(self) -> torch.dtype:
        return QUANT_STORAGE_DTYPES[self.quant_storage or "uint8"]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def bnb_config(self):
        """The ``transformers.BitsAndBytesConfig`` for ``from_pretrained(quantization_config=...)``."""
        from transformers import BitsAndBytesConfig

        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=self.type,
            bnb_4bit_use_double_quant=self.double_quant,
            bnb_4bit_compute_dtype=self.compute_torch_dtype,
            bnb_4bit_quant_storage=self.storage_torch_dtype,
        )


def _linear4bit_class():
    # 4-bit layers exist only once bitsandbytes is imported (by transformers for 4-bit weights, or
    # by peft): asking an unimported bitsandbytes would import it into every full-weight run.
    bnb = sys.modules.get("bitsandbytes")
    return None if bnb is None else bnb.nn.Linear4bit


def linear4bit_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """(name, module) of every bitsandbytes ``Linear4bit`` inside ``model`` (through any wrapper)."""
    cls = _linear4bit_class()
    if cls is None:
        return []
    return [(n, m) for n, m in model.named_modules() if isinstance(m, cls)]


def is_quantized(model: torch.nn.Module) -> bool:
    """True if ``model`` (possibly peft / DDP / compile wrapped) holds 4-bit bitsandbytes layers."""
    cls = _linear4bit_class()
    return cls is not None and any(isinstance(m, cls) for m in model.modules())


_logged_cpu_fix = False


def disable_cpu_inference_repacking(model: torch.nn.Module) -> int:
    """Work around a bitsandbytes 0.50 CPU bug; returns the number of 4-bit layers patched.

    On CPUs with AVX512-BF16, ``Linear4bit.forward`` in eval mode with an input that does not
    require grad (any ``torch.no_grad()`` forward or ``generate``) permanently repacks the weight
    into an inference-only layout (``quant_state.packing_format_for_cpu``). Later *training*
    forwards then take the inference kernel, which has no backward to the layer input: bias-free
    (Llama / Qwen3) layers give silently WRONG LoRA gradients, and layers with a bias (Qwen2)
    crash with "a view of a leaf Variable that requires grad is being used in an in-place
    operation". RL alternates exactly these (eval + generate, then train), see
    tests/test_qlora.py. Setting ``support_avx512bf16_for_cpu = False`` keeps the training
    layout; with it, sampling-time and training-time forwards also use the same kernel, so their
    log-probs agree exactly. The attribute only matters for CPU inputs: harmless on GPUs.

    Apply it right after loading, before any forward: the repacking is lossy (it rounds the
    per-block absmax to bfloat16 and drops the double quantisation), and bitsandbytes' inverse
    (also run by ``state_dict()``) is best-effort. Layers found already repacked are converted
    back with that inverse, with a warning.
    """
    global _logged_cpu_fix
    patched = repacked = 0
    for _, module in linear4bit_modules(model):
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
            patched += 1
        weight = getattr(module, "weight", None)
        state = getattr(weight, "quant_state", None)
        if state is not None and getattr(state, "packing_format_for_cpu", False):
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, state)
            module.quant_state = weight.quant_state
            repacked += 1
    if repacked:
        log.warning(
            "bitsandbytes: %d Linear4bit layers had already been repacked into the CPU inference layout "
            "(lossy: absmax rounded to bfloat16); converted back. Call disable_cpu_inference_repacking "
            "right after loading, before any no-grad forward.",
            repacked,
        )
    if patched and not _logged_cpu_fix:
        _logged_cpu_fix = True
        log.info(
            "bitsandbytes: disabled the AVX512-BF16 CPU inference repacking on %d Linear4bit layers "
            "(it corrupts LoRA gradients after a no-grad eval forward; see prerl.models.quant)",
            patched,
        )
    return patched


def cast_linear4bit_biases(model: torch.nn.Module) -> None:
    """Cast each Linear4bit bias to the layer's compute dtype now, as bitsandbytes would do in
    place on the first forward (see the module docstring)."""
    for _, module in linear4bit_modules(model):
        bias = getattr(module, "bias", None)
        dtype = getattr(module, "compute_dtype", None)
        if bias is not None and dtype is not None and bias.dtype != dtype:
            bias.data = bias.data.to(dtype)


def prepare_quantized_model(model: torch.nn.Module) -> None:
    """Post-load fix-ups of a freshly loaded 4-bit model (before LoRA is applied)."""
    disable_cpu_inference_repacking(model)
    cast_linear4bit_biases(model)


def dense_weight(module: torch.nn.Module) -> torch.Tensor:
    """The weight of a (possibly 4-bit) linear layer as a dense tensor: de-quantised for a
    bitsandbytes Linear4bit (exactly the weight its training forward uses), else the weight."""
    cls = _linear4bit_class()
    weight = module.weight
    if cls is not None and isinstance(module, cls):
        import bitsandbytes.functional as F

        if getattr(weight.quant_state, "packing_format_for_cpu", False):
            raise RuntimeError(
                "this Linear4bit is in bitsandbytes' CPU inference layout; call "
                "disable_cpu_inference_repacking(model) first"
            )
        return F.dequantize_4bit(weight.data, weight.quant_state)
    return weight.detach()
