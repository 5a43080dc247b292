"""``TinyModelSpec``: a small random Llama / Qwen2 decoder for tests and CPU smoke runs."""

from __future__ import annotations

import tempfile
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .spec import ModelSpec
from .tokenizer import build_tiny_tokenizer

ARCHS = ("llama", "qwen2")


class TinyModelSpec(ModelSpec):
    """A randomly initialised decoder built from a transformers config, with the byte-level
    ChatML tokenizer of :func:`prerl.models.tokenizer.build_tiny_tokenizer` (vocab 259).
    Same seed -> bit-identical weights; building takes milliseconds.

    Args:
        arch: "llama" (no attention bias) or "qwen2" (q/k/v bias, like Qwen models).
        hidden_size, num_layers, num_heads, num_kv_heads, intermediate_size,
        max_position_embeddings: the usual decoder dimensions.
        tie_word_embeddings: share input embeddings and LM head.
        attention_dropout: dropout on the attention probabilities in train mode (tests of
            ``module.disable_dropout``).
        **common: see :class:`ModelSpec` (dtype, lora, gradient_checkpointing, ...).
    """

    def __init__(
        self,
        arch: str = "llama",
        hidden_size: int = 64,
        num_layers: int = 2,
        num_heads: int = 4,
        num_kv_heads: int = 2,
        intermediate_size: int = 128,
        max_position_embeddings: int = 1024,
        tie_word_embeddings: bool = False,
        attention_dropout: float = 0.0,
        seed: int = 0,
        dtype: str = "float32",
        **common: Any,
    ) -> None:
        super().__init__(dtype=dtype, seed=seed, **common)
        if arch not in ARCHS:
            raise ValueError(f"arch={arch!r}; use one of {list(ARCHS)}")
        if hidden_size % num_heads or num_heads % num_kv_heads:
            raise ValueError(
                f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads}) and "
                f"num_heads by num_kv_heads ({num_kv_heads})"
            )
        self.arch = arch
        self.hidden_size = int(hidden_size)
        self.num_layers = int(num_layers)
        self.num_heads = int(num_heads)
        self.num_kv_heads = int(num_kv_heads)
        self.intermediate_size = int(intermediate_size)
        self.max_position_embeddings = int(max_position_embeddings)
        self.tie_word_embeddings = bool(tie_word_embeddings)
        self.attention_dropout = float(attention_dropout)

    @property
    def name(self) -> str:
        return f"tiny-{self.arch}-h{self.hidden_size}-l{self.num_layers}"

    def _repr_fields(self) -> dict[str, Any]:
        return {"arch": self.arch, "hidden_size": self.hidden_size, "num_layers": self.num_layers, "seed": self.seed}

    def context_length(self) -> int:
        return self.max_position_embeddings

    def build_tokenizer(self) -> PreTrainedTokenizerBase:
        return build_tiny_tokenizer(model_max_length=self.max_position_embeddings)

    def model_config(self, tokenizer: PreTrainedTokenizerBase):
        """The transformers config (LlamaConfig / Qwen2Config) of the tiny model."""
        from transformers import LlamaConfig, Qwen2Config

        common = dict(
            vocab_size=len(tokenizer),
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            intermediate_size=self.intermediate_size,
            max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=self.tie_word_embeddings,
            attention_dropout=self.attention_dropout,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            initializer_range=0.02,
        )
        if self.arch == "llama":
            return LlamaConfig(**common)
        return Qwen2Config(**common, use_sliding_window=False)

    def _build_base_model(self, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
        from transformers import AutoModelForCausalLM

        config = self.model_config(tokenizer)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            model = AutoModelForCausalLM.from_config(
                config, dtype=self.dtype, attn_implementation=self.attn_implementation
            )
        if self.quantization is None:
            return model
        # 4-bit: go through the exact path real checkpoints take (from_pretrained with a
        # BitsAndBytesConfig): save the random weights to a temp folder and reload them quantised.
        # bitsandbytes' quantisation is deterministic, so same seed -> bit-identical 4-bit weights.
        # device_map cpu: like the unquantised tiny model (transformers would otherwise put a 4-bit
        # model on the current CUDA device); Lightning moves it to the accelerator later.
        with tempfile.TemporaryDirectory(prefix="prerl-tiny-") as tmp:
            model.save_pretrained(tmp)
            del model
            model = AutoModelForCausalLM.from_pretrained(
                tmp,
                dtype=self.dtype,
                attn_implementation=self.attn_implementation,
                device_map={"": "cpu"},
                **self._quantization_kwargs(),
            )
        model.config._name_or_path = ""  # like from_config: no folder to point at (it is gone)
        model.name_or_path = ""
        return model
