"""``ModelSpec``: the common base of the model specs that Hydra instantiates from configs/model/.

A spec is a small, picklable description of a policy. It builds the tokenizer
(``build_tokenizer``, called early by train.py so that a bad model path fails before anything
else) and the policy (``build_model``, called by the LightningModule inside ``configure_model``
so that FSDP can shard it later).
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .lora import LoraSettings, apply_lora
from .quant import QuantizationSettings, prepare_quantized_model

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """Map "float32" | "bfloat16" | "float16" (or such a torch dtype itself) to a torch.dtype."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"unsupported dtype {dtype}; use one of {list(DTYPES)}")
        return dtype
    try:
        return DTYPES[str(dtype)]
    except KeyError:
        raise ValueError(f"unsupported dtype {dtype!r}; use one of {list(DTYPES)}") from None


def _plain(value: Any) -> Any:
    """DictConfig / ListConfig (or any Mapping / Sequence) -> plain dict / list, recursively."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, str | bytes):
        return [_plain(v) for v in value]
    return value


class ModelSpec(abc.ABC):
    """Common options of every model spec.

    Args:
        dtype: parameter dtype, "float32" | "bfloat16" | "float16".
        lora: None for full fine-tuning, or a mapping / :class:`LoraSettings`
            (r, alpha, dropout, target_modules="all-linear", bias="none"); with LoRA only the
            adapter parameters are trainable.
        gradient_checkpointing: recompute activations in backward (``use_reentrant=False``).
        attn_implementation: HF attention backend ("sdpa" default, "eager", "flash_attention_2", ...).
        chat_template_kwargs: extra kwargs for ``tokenizer.apply_chat_template`` (e.g.
            ``{"enable_thinking": False}`` for Qwen3), exposed as ``spec.chat_template_kwargs``.
        quantization: None (full-precision base), or 4-bit QLoRA: the shorthand "nf4" / "fp4",
            or a mapping / :class:`~prerl.models.quant.QuantizationSettings` (type, double_quant,
            compute_dtype, quant_storage). The base is loaded through
            ``transformers.BitsAndBytesConfig``; requires ``lora`` (a 4-bit base cannot be
            trained). Parameters that are not quantised (embeddings, norms, LM head) stay in
            ``dtype`` (see :mod:`prerl.models.quant` for why peft's
            ``prepare_model_for_kbit_training`` is not used).
        seed: seed of the RNG used for random initialisation (tiny models, LoRA adapters); the
            global torch RNG is left untouched.
    """

    def __init__(
        self,
        *,
        dtype: str = "float32",
        lora: Mapping[str, Any] | LoraSettings | None = None,
        gradient_checkpointing: bool = False,
        attn_implementation: str = "sdpa",
        chat_template_kwargs: Mapping[str, Any] | None = None,
        quantization: Any = None,
        seed: int = 0,
    ) -> None:
        if attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise ValueError(
                f"attn_implementation={attn_implementation!r}; use one of {list(ATTN_IMPLEMENTATIONS)}"
            )
        self.dtype_name = str(dtype)
        self.dtype = resolve_dtype(dtype)
        self.lora = LoraSettings.from_any(lora)
        self.quantization = QuantizationSettings.from_any(quantization)
        if self.quantization is not None and self.lora is None:
            raise ValueError(
                f"model.quantization={self.quantization.type!r} needs model.lora: a 4-bit quantised base "
                "cannot be trained directly (QLoRA trains LoRA adapters on a frozen 4-bit base). "
                "Set model.lora (e.g. {r: 16, alpha: 32}) or model.quantization=null."
            )
        self.gradient_checkpointing = bool(gradient_checkpointing)
        self.attn_implementation = attn_implementation
        self.chat_template_kwargs: dict[str, Any] = _plain(chat_template_kwargs) if chat_template_kwargs else {}
        self.seed = int(seed)

    # ----------------------------------------------------------------- to be implemented
    @property
    @abc.abstractmethod
    def name(self) -> str:
        """A short human-readable name for logs."""

    @abc.abstractmethod
    def build_tokenizer(self) -> PreTrainedTokenizerBase:
        """The tokenizer, with the conventions of :mod:`prerl.models.tokenizer` applied."""

    @abc.abstractmethod
    def _build_base_model(self, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
        """The plain HF causal LM in ``self.dtype`` with ``self.attn_implementation``, loaded with
        ``quantization_config=self.quantization_config()`` when that is not None."""

    def context_length(self) -> int | None:
        """Longest prompt + response the model takes (its config's ``max_position_embeddings``; the
        tokenizer's ``model_max_length`` is often a placeholder); None when unknown."""
        return None

    def quantization_config(self):
        """The ``transformers.BitsAndBytesConfig`` of ``self.quantization``, or None."""
        return None if self.quantization is None else self.quantization.bnb_config()

    def _quantization_kwargs(self) -> dict[str, Any]:
        """``{"quantization_config": ...}`` for ``from_pretrained`` when quantised, else ``{}``."""
        config = self.quantization_config()
        return {} if config is None else {"quantization_config": config}

    # ----------------------------------------------------------------- common logic
    def build_model(self) -> torch.nn.Module:
        """The policy: an HF causal LM (peft-wrapped if ``lora`` is set) whose
        ``generation_config`` agrees with ``build_tokenizer()`` on eos / pad ids and samples
        from the untruncated distribution (temperature 1, no top-k / top-p).

        With ``quantization`` the 4-bit layers get the bitsandbytes CPU fix
        (:func:`~prerl.models.quant.disable_cpu_inference_repacking`) before anything runs."""
        tokenizer = self.build_tokenizer()
        model = self._build_base_model(tokenizer)
        if self.quantization is not None:
            prepare_quantized_model(model)
        align_generation_config(model, tokenizer)
        if self.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        if self.lora is not None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed)
                model = apply_lora(model, self.lora)
        return model

    def apply_chat_template(
        self,
        tokenizer: PreTrainedTokenizerBase,
        messages: list[dict[str, str]],
        *,
        add_generation_prompt: bool = True,
    ) -> str:
        """Render ``messages`` to a prompt string with this spec's ``chat_template_kwargs``.
        Tokenise the result with ``add_special_tokens=False`` (the template already holds them)."""
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt, **self.chat_template_kwargs
        )

    def _repr_fields(self) -> dict[str, Any]:
        return {}

    def __repr__(self) -> str:
        fields = {
            **self._repr_fields(),
            "dtype": self.dtype_name,
            "lora": self.lora,
            "quantization": self.quantization,
            "gradient_checkpointing": self.gradient_checkpointing,
            "attn_implementation": self.attn_implementation,
            "chat_template_kwargs": self.chat_template_kwargs,
        }
        return f"{type(self).__name__}(" + ", ".join(f"{k}={v!r}" for k, v in fields.items()) + ")"


def enable_gradient_checkpointing(model: PreTrainedModel) -> None:
    """Non-reentrant activation checkpointing of every decoder layer (works with frozen inputs, i.e.
    LoRA, without ``enable_input_require_grads``). transformers 5 renamed the method."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:  # transformers < 5
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def align_generation_config(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Make ``model.generation_config`` agree with the tokenizer and sample neutrally.

    * eos: the tokenizer's eos first, then any other stop ids the checkpoint declared (Qwen3 lists
      ``<|im_end|>`` and ``<|endoftext|>``); pad: the tokenizer's pad.
    * do_sample, temperature 1, top_p 1, top_k 0: a bare ``generate()`` samples from exactly the
      policy distribution. transformers otherwise applies a silent top_k=50 default (and Qwen3's
      generation_config.json sets top_k=20, top_p=0.95, temperature=0.6), so rollouts would come
      from a truncated distribution instead of the policy the loss scores. Greedy evaluation
      passes ``do_sample=False`` explicitly (no warning is logged then).
    """
    gc = model.generation_config
    eos_ids = [tokenizer.eos_token_id]
    existing = gc.eos_token_id
    for i in existing if isinstance(existing, list) else [existing]:
        if i is not None and i not in eos_ids:
            eos_ids.append(int(i))
    gc.eos_token_id = eos_ids[0] if len(eos_ids) == 1 else eos_ids
    gc.pad_token_id = tokenizer.pad_token_id
    gc.do_sample = True
    gc.temperature = 1.0
    gc.top_p = 1.0
    gc.top_k = 0
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
