"""The memory estimator (``tools/memory_estimate.py``) against real objects on CPU, its mapping
from Hydra configs (``tools/estimate_config.py``), and the GPU presets' hardware declarations.

* parameter counts: exact, against transformers models built from the same configs (on the meta
  device for the big presets, real tensors for tiny ones) and against the real SmolLM2 checkpoint;
* LoRA parameter count: exact, against peft; NF4 bytes: exact, against bitsandbytes;
* KV cache: exact, against a ``DynamicCache`` after ``generate``;
* per-layer saved activations: exact (up to 0.1%: peft's 8-byte scaling scalars), against what
  autograd saves (``saved_tensors_hooks``, de-duplicated by storage), in five precision setups;
* logits / log-softmax bytes per element (plain and chunked) and the whole micro-batch peak:
  against the CPU allocator's peak from ``torch.profiler`` memory events (the stated factor:
  estimate / measured within [0.95, 1.25]);
* the config mapping: global vs per-rank batch, token budget, chunked log-probs, validation
  generation batch; every experiment that declares ``hardware`` fits it.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import struct
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from tools.estimate_config import (
    TINY_VOCAB,
    estimate_run,
    geometry_from_model_config,
    setup_from_config,
)
from tools.estimate_config import compose_config as _compose
from tools.logits_bytes import CASES as LOGITS_CASES
from tools.logits_bytes import cpu_peak_and_end
from tools.logits_bytes import measure as measure_logits
from tools.memory_estimate import (
    MODEL_PRESETS,
    ActivationMode,
    GiB,
    TrainingSetup,
    activation_mode,
    estimate_memory,
    geometry_from_config,
    kv_cache_bytes,
    layer_activation_bytes,
    lora_parameter_count,
    max_generation_batch,
    model_geometry,
    nf4_tensor_bytes,
    parameter_counts,
)

ROOT = Path(__file__).resolve().parents[1]


@functools.lru_cache(maxsize=None)
def _compose_cached(overrides: tuple[str, ...]):
    return _compose(list(overrides))


def compose_config(overrides):
    """Composed train config (cached: a composition takes ~0.25 s; callers must not mutate it)."""
    return _compose_cached(tuple(overrides))

TINY = dict(hidden_size=128, intermediate_size=352, num_attention_heads=4, num_key_value_heads=2,
            head_dim=48, vocab_size=512)


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _hf_config(model_type: str, **kw):
    from transformers import AutoConfig

    return AutoConfig.for_model(model_type, **kw)


def _build(model_type: str, dtype=torch.bfloat16, seed: int = 0, **kw):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = _hf_config(model_type, attn_implementation="sdpa", **kw)
    return AutoModelForCausalLM.from_config(cfg).to(dtype)


def _component(name: str) -> str:
    if "embed_tokens" in name:
        return "embed_tokens"
    if name.startswith("lm_head"):
        return "lm_head"
    if "q_norm" in name or "k_norm" in name:
        return "qk_norm"
    if "self_attn" in name:
        return "attention"
    if ".mlp." in name:
        return "mlp"
    if "layernorm" in name:
        return "layer_norms"
    if name.startswith("model.norm"):
        return "final_norm"
    raise AssertionError(f"unexpected parameter {name}")


def _counts_by_component(model) -> dict[str, int]:
    out: dict[str, int] = {}
    for name, p in model.named_parameters():  # tied weights appear once
        key = _component(name)
        out[key] = out.get(key, 0) + p.numel()
    return out


# ------------------------------------------------------------------------------ parameter counts
TINY_VARIANTS = [
    ("llama", dict(attention_bias=True, mlp_bias=True, tie_word_embeddings=False)),
    ("llama", dict(tie_word_embeddings=True)),
    ("mistral", dict(tie_word_embeddings=False)),
    ("qwen2", dict(tie_word_embeddings=True)),
    ("qwen2", dict(tie_word_embeddings=False, head_dim=None)),
    ("qwen3", dict(attention_bias=True, tie_word_embeddings=False)),
    ("qwen3", dict(tie_word_embeddings=True)),
]


@pytest.mark.parametrize("model_type,extra", TINY_VARIANTS)
def test_parameter_counts_match_tiny_transformers_models(model_type, extra):
    kw = {**TINY, "num_hidden_layers": 2, **extra}
    kw = {k: v for k, v in kw.items() if v is not None}
    model = _build(model_type, torch.float32, **kw)
    cfg = model.config
    counts = parameter_counts(geometry_from_config(cfg))  # from the PretrainedConfig object
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    real = _counts_by_component(model)
    for key in ("embed_tokens", "attention", "mlp", "layer_norms", "final_norm"):
        assert counts[key] == real[key], key
    assert counts["qk_norm"] == real.get("qk_norm", 0)
    assert counts["lm_head"] == real.get("lm_head", 0)
    assert (counts["lm_head"] == 0) == bool(cfg.tie_word_embeddings)


@pytest.mark.parametrize("name", sorted(MODEL_PRESETS))
def test_presets_match_transformers_exactly(name):
    """The built-in configs, built by transformers (meta device: no memory) from the same values."""
    from transformers import AutoModelForCausalLM

    preset = dict(MODEL_PRESETS[name])
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(_hf_config(preset.pop("model_type"), **preset))
    counts = parameter_counts(model_geometry(name))
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert counts == {**counts, **{k: v for k, v in _counts_by_component(model).items()}}


def test_published_totals():
    """Totals the model cards round: Qwen3-1.7B 1.7B (1.4B non-embedding), Qwen3-4B 4.0B (3.6B
    non-embedding), Qwen3-8B 8.2B, Qwen2.5-1.5B 1.54B, Qwen2.5-7B 7.61B, SmolLM2-135M 134.5M."""
    totals = {n: parameter_counts(model_geometry(n))["total"] for n in MODEL_PRESETS}
    assert totals["qwen3-4b"] == 4_022_468_096
    for name, total, body in (("qwen3-4b", 4.0, 3.6), ("qwen3-1.7b", 1.7, 1.4)):
        c = parameter_counts(model_geometry(name))
        assert (round(c["total"] / 1e9, 1), round((c["total"] - c["embed_tokens"]) / 1e9, 1)) == (total, body)
    assert round(totals["qwen3-8b"] / 1e9, 1) == 8.2
    assert round(totals["qwen2.5-1.5b"] / 1e9, 2) == 1.54
    assert round(totals["qwen2.5-7b"] / 1e9, 2) == 7.62  # 7,615,616,512 ("7.61B" truncated)
    assert totals["smollm2-135m"] == 134_515_008


@pytest.mark.slow
def test_real_smollm2_checkpoint_parameter_count(smollm2_dir):
    folder = Path(smollm2_dir)
    weights = folder / "model.safetensors"
    with weights.open("rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    real = sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")
    assert parameter_counts(geometry_from_config(folder))["total"] == real
    assert parameter_counts(model_geometry("smollm2-135m"))["total"] == real


def test_config_sources_and_errors(tmp_path):
    cfg = {"model_type": "qwen3", **TINY, "num_hidden_layers": 3, "tie_word_embeddings": False}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    a = geometry_from_config(cfg)
    assert geometry_from_config(tmp_path / "config.json") == a
    assert parameter_counts(geometry_from_config(tmp_path)) == parameter_counts(a)
    assert model_geometry("Qwen3-4B").hidden_size == 2560
    with pytest.raises(ValueError, match="not supported"):
        geometry_from_config({**cfg, "model_type": "mixtral"})
    with pytest.raises(FileNotFoundError):
        geometry_from_config(tmp_path / "missing.json")


def test_lora_parameter_count_matches_peft():
    from peft import LoraConfig, get_peft_model

    model = _build("qwen2", torch.float32, **{**TINY, "num_hidden_layers": 2})
    g = geometry_from_config(model.config)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert trainable == lora_parameter_count(g, 4)
    # Qwen3-4B r=16 all-linear: 33,030,144 adapters
    assert lora_parameter_count(model_geometry("qwen3-4b"), 16) == 33_030_144


@pytest.mark.parametrize("shape", [(192, 128), (100, 37), (512, 512 * 70), (33,)])
@pytest.mark.parametrize("double_quant", [True, False])
def test_nf4_bytes_match_bitsandbytes(shape, double_quant):
    bnbf = pytest.importorskip("bitsandbytes.functional")
    w = torch.randn(*shape, dtype=torch.bfloat16)
    packed, st = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=double_quant, quant_type="nf4")
    tensors = [packed, st.absmax, st.code]
    if double_quant:
        tensors += [st.state2.absmax, st.state2.code, st.offset]
    assert sum(t.untyped_storage().nbytes() for t in tensors) == nf4_tensor_bytes(w.numel(), double_quant=double_quant)


# ------------------------------------------------------------------------------------- KV cache
def test_kv_cache_matches_dynamic_cache():
    model = _build("qwen3", torch.bfloat16, **{**TINY, "num_hidden_layers": 3}).eval()
    B, P, new = 3, 10, 7
    ids = torch.randint(3, 512, (B, P))
    mask = torch.ones(B, P, dtype=torch.long)
    mask[0, :3] = 0  # left padding, as in rollouts
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                         do_sample=False, return_dict_in_generate=True, pad_token_id=0, eos_token_id=None)
    cache = getattr(out, "cache", None) or out.past_key_values
    real = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    g = geometry_from_config(model.config)
    # The cache holds prompt + new - 1 positions (the last sampled token is never fed back).
    assert real == kv_cache_bytes(g, B, P + new - 1, dtype_bytes=2)
    assert kv_cache_bytes(model_geometry("qwen3-4b"), 1, 1) == 147_456  # 144 KiB per token


# ---------------------------------------------------------------------------------- activations
def _saved_bytes(model, M: int, L: int, autocast: bool) -> int:
    """Bytes of the distinct storages autograd saves in a forward (parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen.setdefault(s.data_ptr(), s.nbytes())
        return t

    torch.manual_seed(1)
    ids = torch.randint(0, TINY["vocab_size"], (M, L))
    mask = torch.ones(M, L, dtype=torch.long)
    mask[0, :5] = 0
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    return sum(seen.values())


def _quantize_nf4(model):
    import bitsandbytes as bnb

    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, lin in list(parent.named_children()):
                if isinstance(lin, torch.nn.Linear):
                    q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                          compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4")
                    q.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False,
                                                 compress_statistics=True, quant_type="nf4")
                    if lin.bias is not None:
                        q.bias = torch.nn.Parameter(lin.bias.data.clone(), requires_grad=False)
                    q = q.to("cpu")
                    q.support_avx512bf16_for_cpu = False  # see shared/docs/environment.md
                    setattr(parent, name, q)
    return model


# name, model_type, weight dtype, TrainingSetup fields
ACTIVATION_CASES = [
    ("full-bf16", "qwen3", torch.bfloat16, dict(preset="full", dtype="bf16", autocast=False)),
    ("full-fp32-autocast", "llama", torch.float32, dict(preset="full", dtype="fp32", autocast=True)),
    ("lora-bf16", "qwen2", torch.bfloat16, dict(preset="lora", dtype="bf16", lora_r=8, autocast=False)),
    ("lora-bf16-autocast", "qwen3", torch.bfloat16, dict(preset="lora", dtype="bf16", lora_r=8, autocast=True)),
    ("qlora-nf4", "qwen3", torch.bfloat16, dict(preset="qlora", dtype="bf16", lora_r=8, autocast=False)),
]


@pytest.mark.parametrize("case,model_type,dtype,fields", ACTIVATION_CASES, ids=[c[0] for c in ACTIVATION_CASES])
def test_layer_activations_match_autograd_saved_tensors(case, model_type, dtype, fields):
    """Per-layer saved bytes = (2-layer model) - (1-layer model), measured exactly."""
    M, L = 2, 64
    setup = TrainingSetup(**fields)
    mode = activation_mode(setup)
    measured = []
    for layers in (1, 2):
        kw = {**TINY, "num_hidden_layers": layers}
        if model_type == "qwen2":
            kw.pop("head_dim")
        model = _build(model_type, dtype, **kw)
        if case.startswith("qlora"):
            pytest.importorskip("bitsandbytes")
            model = _quantize_nf4(model)
        if setup.preset != "full":
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(model, LoraConfig(r=setup.lora_r, target_modules="all-linear", task_type="CAUSAL_LM"))
        model.train()
        measured.append(_saved_bytes(model, M, L, setup.autocast))
        g = geometry_from_config(model.config if setup.preset == "full" else model.base_model.model.config)
    per_layer = measured[1] - measured[0]
    g1 = replace(g, num_layers=1)
    # Autocast saves the bf16 copy of each fp32 weight it casts: the estimator books these as
    # "autocast bf16 copies" (static), not as activations.
    if setup.preset == "full" and setup.autocast and dtype == torch.float32:
        per_layer -= 2 * parameter_counts(g1)["linear"]
    if setup.preset != "full" and setup.autocast:
        per_layer -= 2 * lora_parameter_count(g1, setup.lora_r)
    estimate = layer_activation_bytes(g, mode, M, L)
    assert per_layer == pytest.approx(estimate, rel=1e-3), (case, per_layer, estimate)


def test_activation_modes_of_presets():
    assert activation_mode(TrainingSetup(preset="full", dtype="fp32", autocast=True)) == ActivationMode(
        compute_bytes=2, residual_bytes=4, autocast=True, trainable_base=True)
    # FSDP with param_dtype bf16 (trainer/fsdp.yaml) gathers bf16 parameters: a bf16 residual stream
    fsdp = TrainingSetup(preset="full", gpus=8, fsdp=True, prompts_per_step=8)
    assert activation_mode(fsdp).residual_bytes == 2
    assert activation_mode(replace(fsdp, fsdp_bf16_params=False)).residual_bytes == 4
    assert activation_mode(TrainingSetup(preset="full", autocast=False)).compute_bytes == 4  # pure fp32 (CPU)
    assert activation_mode(TrainingSetup(preset="qlora", dtype="bf16", lora_r=16)).lora_r == 16
    with pytest.raises(ValueError, match="not modelled"):
        TrainingSetup(preset="lora", dtype="fp32", autocast=True)
    with pytest.raises(ValueError, match="do not divide"):
        TrainingSetup(prompts_per_step=128, gpus=3)


# ------------------------------------------------------------------------ measured peaks (CPU)
def _cpu_peak(fn, with_end: bool = False):
    """Peak of the CPU allocator's live bytes while ``fn`` runs, relative to its start (and the
    bytes still live at its end)."""
    peak, live = cpu_peak_and_end(fn)
    return (peak, live) if with_end else peak


@pytest.mark.parametrize("case", [c for c in LOGITS_CASES if not c.chunked], ids=lambda c: c.name)
def test_logits_bytes_per_element_measured(case):
    """Plain path: the whole (M, T, V) bf16 logits through token_logprobs / entropy_from_logits."""
    assert measure_logits(case, torch.device("cpu")) == pytest.approx(case.constant, rel=0.05)


@pytest.mark.parametrize("case", [c for c in LOGITS_CASES if c.chunked], ids=lambda c: c.name)
def test_chunked_logits_bytes_per_element_measured(case):
    """Chunked path (``chunked_token_logprobs``, each chunk checkpointed): the peak is one chunk of
    C x V elements, not M x T x V, whatever M x T is (here 4 chunks, then 8)."""
    for tokens in (256, 512):
        # Doubling the response tokens adds only the small (M, T, h) copies: the chunk sets the peak.
        assert measure_logits(case, torch.device("cpu"), tokens=tokens) == pytest.approx(case.constant, rel=0.05)


def _steady_micro_batch_peak(model, vocab: int, prompt: int, response: int, chunk, autocast: bool, M: int = 2) -> int:
    """CPU peak of one forward+backward of M rows through ``score_responses``, in steady state
    (a first step allocates the gradients), optionally under bf16 autocast as Lightning runs it."""
    from prerl.scoring import score_responses

    pid = torch.randint(0, vocab, (M, prompt))
    pmask = torch.ones(M, prompt, dtype=torch.long)
    pmask[0, :4] = 0
    rid = torch.randint(0, vocab, (M, response))
    rmask = torch.ones(M, response, dtype=torch.long)
    rmask[1, -10:] = 0

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast, cache_enabled=False):
            logprobs, _ = score_responses(model, pid, pmask, rid, rmask, chunk_tokens=chunk)
        (-(logprobs * rmask).sum()).backward()

    step()
    return _cpu_peak(step)


@pytest.mark.parametrize("vocab,prompt,response,checkpointing,chunk", [
    (512, 64, 192, False, None),    # activations dominate
    (512, 64, 192, True, None),     # checkpointed: layer inputs + one layer recomputed
    (8192, 32, 96, False, None),    # logits dominate
    (8192, 32, 96, True, 64),       # the same, chunked log-probs (one 64-token chunk of logits), checkpointed
])
def test_micro_batch_peak_within_stated_factor(vocab, prompt, response, checkpointing, chunk):
    """Whole forward+backward of one micro-batch through ``prerl.scoring.score_responses`` (tiny
    Qwen3, bf16, 4 layers), steady state (gradients already allocated, as from the second
    micro-batch on). Stated factor: estimate / measured in [0.95, 1.25]."""
    M = 2
    kw = {**TINY, "num_hidden_layers": 4, "vocab_size": vocab, "tie_word_embeddings": True}
    model = _build("qwen3", torch.bfloat16, **kw).train()
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    measured = _steady_micro_batch_peak(model, vocab, prompt, response, chunk, autocast=False, M=M)
    setup = TrainingSetup(preset="full", dtype="bf16", autocast=False, prompt_len=prompt, response_len=response,
                          prompts_per_step=1, group_size=M, micro_batch=M, gradient_checkpointing=checkpointing,
                          logprob_chunk_tokens=chunk, scoring=None, overhead_gib=0)
    train = estimate_memory({"model_type": "qwen3", **kw, "num_hidden_layers": 4}, setup).phase("training")
    dynamic = sum(b for label, b in train.items if not label.startswith(("weights", "gradients", "AdamW")))
    assert 0.95 <= dynamic / measured <= 1.25, (dynamic, measured)


@pytest.mark.parametrize("vocab,prompt,response,checkpointing,chunk", [
    (512, 64, 192, False, None),    # activations dominate
    (512, 64, 192, True, None),     # checkpointed, as the QLoRA preset
    (8192, 32, 96, True, 64),       # logits dominate, chunked
])
def test_qlora_micro_batch_peak_within_stated_factor(vocab, prompt, response, checkpointing, chunk):
    """The same for QLoRA: NF4 base (bitsandbytes, double quantisation) with peft LoRA r = 8 on every
    Linear, under bf16 autocast as Lightning's bf16-mixed runs it; the dynamic items (dequantisation
    buffer, adapter casts, activations, logits) against the allocator's peak."""
    from peft import LoraConfig, get_peft_model

    M, r = 2, 8
    kw = {**TINY, "num_hidden_layers": 4, "vocab_size": vocab, "tie_word_embeddings": True}
    model = _quantize_nf4(_build("qwen3", torch.bfloat16, **kw))
    model = get_peft_model(model, LoraConfig(r=r, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0))
    model.train()
    if checkpointing:
        model.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    measured = _steady_micro_batch_peak(model, vocab, prompt, response, chunk, autocast=True, M=M)
    setup = TrainingSetup(preset="qlora", dtype="bf16", autocast=True, lora_r=r, prompt_len=prompt,
                          response_len=response, prompts_per_step=1, group_size=M, micro_batch=M,
                          gradient_checkpointing=checkpointing, logprob_chunk_tokens=chunk, scoring=None,
                          overhead_gib=0)
    train = estimate_memory({"model_type": "qwen3", **kw}, setup).phase("training")
    static = ("base Linear", "embeddings", "LoRA adapters", "LoRA gradients", "LoRA AdamW")
    dynamic = sum(b for label, b in train.items if not label.startswith(static))
    assert 0.95 <= dynamic / measured <= 1.25, (dynamic, measured)


def test_adamw_states_follow_the_parameter_dtype():
    """torch's AdamW keeps exp_avg / exp_avg_sq in the parameter dtype (bf16 weights: bf16
    states), which the ``full`` preset books as 2 x weight bytes."""
    p = torch.nn.Parameter(torch.zeros(8, dtype=torch.bfloat16))
    opt = torch.optim.AdamW([p])
    p.grad = torch.ones_like(p)
    opt.step()
    assert {k: v.dtype for k, v in opt.state[p].items() if k != "step"} == {
        "exp_avg": torch.bfloat16, "exp_avg_sq": torch.bfloat16}
    est = estimate_memory("smollm2-135m", TrainingSetup(preset="full", dtype="bf16", response_len=64))
    items = dict(est.phase("optimizer").items)
    assert items["AdamW states (2 x bf16)"] == 4 * est.params["total"]


@pytest.mark.parametrize("grad", [False, True])
def test_lightning_autocast_keeps_a_weight_copy_only_where_backward_saves_it(grad):
    """The autocast items: Lightning's bf16-mixed enters torch.autocast with cache_enabled=False, so
    after a no-grad matmul (generation, scoring) no bf16 weight copy stays alive, while a forward
    with grad (training) keeps the copy that backward needs."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    lin = torch.nn.Linear(512, 1024)
    x = torch.randn(4, 512, requires_grad=True)  # a hidden state: earlier layers want its gradient
    ctx = MixedPrecision("bf16-mixed", "cpu").autocast_context_manager()
    kept = []

    def forward_inside_lightnings_autocast():
        with ctx, torch.set_grad_enabled(grad):
            kept.append(lin(x))

    _, live = _cpu_peak(forward_inside_lightnings_autocast, with_end=True)
    output, weight_copy = 2 * 4 * 1024, 2 * 512 * 1024
    if grad:  # + the bf16 cast of the input, which backward also holds
        assert live == pytest.approx(output + weight_copy + 2 * 4 * 512, rel=0.02)
    else:
        assert live == pytest.approx(output, rel=0.02)


# ------------------------------------------------------------------------ setups and the estimate
def test_fsdp_shards_states_not_activations():
    base = TrainingSetup(preset="full", dtype="fp32", prompts_per_step=1, response_len=1024, micro_batch=1)
    one = estimate_memory("qwen3-4b", base).phase("training")
    eight = estimate_memory("qwen3-4b", replace(base, gpus=8, fsdp=True, prompts_per_step=8)).phase("training")
    t1, t8 = dict(one.items), dict(eight.items)
    w1 = next(v for k, v in t1.items() if k.startswith("weights"))
    w8 = next(v for k, v in t8.items() if k.startswith("weights"))
    assert w1 == pytest.approx(8 * w8)
    assert t1["AdamW states (2 x fp32)"] == pytest.approx(8 * t8["AdamW states (2 x fp32)"])
    ckpt = [k for k in t1 if k.startswith("checkpointed")]
    # fp32 residual under autocast on one GPU, bf16 gathered params under FSDP
    assert t1[ckpt[0]] == 2 * next(v for k, v in t8.items() if k.startswith("checkpointed"))


def test_checkpointing_micro_batch_and_token_budget_move_the_training_peak():
    s = TrainingSetup(preset="lora", dtype="bf16", prompts_per_step=1, response_len=2048, micro_batch=2, scoring=None)

    def train_total(**kw):
        return estimate_memory("qwen3-4b", replace(s, **kw)).phase("training").total

    assert train_total(gradient_checkpointing=False) > 3 * train_total(gradient_checkpointing=True)
    assert train_total(micro_batch=4) > train_total(micro_batch=2) > train_total(micro_batch=1)
    # A token budget bounds rows x length: 6,144 tokens = 2 rows of 1,024 + 2,048, whatever the cap.
    assert replace(s, micro_batch=8, max_tokens_per_micro_batch=6144).micro_rows == 2
    assert train_total(micro_batch=8, max_tokens_per_micro_batch=6144) == train_total(micro_batch=2)
    assert replace(s, max_tokens_per_micro_batch=100).micro_rows == 1  # a longer row goes alone
    # 2 rows of plain logits: 16 B x 2 x 2,049 x 151,936 = 9.3 GiB; one chunk: 20 B x 1,024 x 151,936 = 2.9 GiB
    assert train_total(logprob_chunk_tokens=1024) < train_total() - 6 * GiB


def test_generation_calls_follow_the_module_chunking():
    """``PreRLModule.sample`` sends max(1, batch // samples) whole prompts per generate call."""
    s = TrainingSetup(prompts_per_step=16, group_size=8, generation_batch=32, val_batch=45, val_samples=20)
    assert (s.generation_seqs, replace(s, generation_batch=20).generation_seqs) == (32, 16)
    assert replace(s, generation_batch=4).generation_seqs == 8  # never less than one prompt's group
    assert replace(s, generation_batch=None).generation_seqs == 128
    assert (s.val_problems_per_rank, s.val_generation_seqs) == (45, 900)  # val_generation_batch None: all
    assert replace(s, val_generation_batch=40).val_generation_seqs == 40
    assert replace(s, gpus=8, prompts_per_step=128, val_generation_batch=1000).val_generation_seqs == 6 * 20


# ------------------------------------------------------------------------ config -> setup mapping
def test_config_mapping_global_batch_is_divided_over_ranks():
    s = setup_from_config(compose_config(["experiment=dsrl_qwen3_4b"]))
    assert (s.gpus, s.fsdp, s.fsdp_bf16_params, s.shards) == (8, True, True, 8)
    assert (s.prompts_per_step, s.prompts_per_rank, s.sequences_per_rank) == (128, 16, 128)
    assert (s.preset, s.dtype, s.autocast, s.gradient_checkpointing) == ("full", "fp32", True, True)
    assert (s.prompt_len, s.response_len, s.generation_seqs) == (1024, 8192, 32)
    four = setup_from_config(compose_config(["experiment=dsrl_qwen3_4b", "trainer.devices=4"]))
    assert (four.prompts_per_rank, four.shards) == (32, 4)
    nodes = setup_from_config(compose_config(["experiment=dsrl_qwen3_4b", "trainer.num_nodes=2"]))
    assert (nodes.gpus, nodes.prompts_per_rank) == (16, 8)
    # devices=-1 (all visible GPUs): the declared hardware decides, else an error
    assert setup_from_config(compose_config(["experiment=dsrl_qwen3_4b", "trainer.devices=-1"])).gpus == 8
    with pytest.raises(ValueError, match="hardware.gpus"):
        setup_from_config(compose_config(["experiment=dsrl_qwen3_4b", "trainer.devices=-1", "hardware=null"]))
    ddp = setup_from_config(compose_config(["experiment=dsrl_qwen3_4b", "trainer=gpu", "trainer.devices=8",
                                            "trainer.strategy=ddp"]))
    assert (ddp.fsdp, ddp.shards, ddp.prompts_per_rank) == (False, 1, 16)


def test_config_mapping_of_model_precision_and_objective():
    q = setup_from_config(compose_config(["experiment=qlora_qwen3_4b_24gb"]))
    assert (q.preset, q.lora_r, q.double_quant, q.dtype, q.gpus, q.fsdp) == ("qlora", 16, True, "bf16", 1, False)
    assert q.scoring == "entropy"  # cross_space_diagnostics_every_n_steps: 10
    assert setup_from_config(compose_config(["experiment=qlora_qwen3_4b_24gb", "module.cross_space_diagnostics_every_n_steps=0"])).scoring is None
    kl = setup_from_config(compose_config(["experiment=dsrl_qwen3_4b", "module.cross_space_diagnostics_every_n_steps=0",
                                           "objective.main.kl_coef=0.01"]))
    assert (kl.scoring, kl.kl_reference_copy) == ("logprobs", True)
    est = estimate_memory("qwen3-4b", kl)
    assert any(label.startswith("KL reference") for label, _ in est.phase("training").items)
    cpu = setup_from_config(compose_config(["experiment=smoke"]))
    assert (cpu.preset, cpu.dtype, cpu.autocast, cpu.fsdp, cpu.gradient_checkpointing) == ("full", "fp32", False, False, False)
    two = setup_from_config(compose_config(["experiment=smoke", "trainer=fsdp_cpu"]))
    assert (two.fsdp, two.fsdp_bf16_params, two.gpus) == (True, False, 2)  # 32-true: fp32 compute
    # Without explicit dtypes FSDP follows Lightning's precision plugin: bf16-mixed gathers bf16.
    plugin = setup_from_config(compose_config(["experiment=dsrl_qwen3_4b", "trainer.strategy.mixed_precision_dtypes=null"]))
    assert plugin.fsdp_bf16_params
    fp32 = setup_from_config(compose_config(["experiment=dsrl_qwen3_4b",
                                             "trainer.strategy.mixed_precision_dtypes.param_dtype=float32"]))
    assert not fp32.fsdp_bf16_params and activation_mode(fp32).residual_bytes == 4


def test_config_mapping_token_budget_and_chunked_logprobs():
    base = ["experiment=dsrl_qwen3_4b", "module.update.micro_batch_size=8"]
    budget = setup_from_config(compose_config(base + ["module.update.max_tokens_per_micro_batch=16384"]))
    assert budget.micro_rows == pytest.approx(16384 / 9216)  # at most 16,384 padded tokens
    rows = setup_from_config(compose_config(base + ["module.update.max_tokens_per_micro_batch=null"]))
    assert rows.micro_rows == 8
    short = setup_from_config(compose_config(base + ["module.update.max_tokens_per_micro_batch=16384",
                                                     "module.rollout.max_new_tokens=1024"]))
    assert short.micro_rows == 8  # 8 rows of 2,048 tokens fill the budget exactly
    g = model_geometry("qwen3-4b")
    t_budget = estimate_memory(g, budget).phase("training")
    t_rows = estimate_memory(g, rows).phase("training")
    assert t_budget.total < t_rows.total / 2
    plain = estimate_memory(g, replace(budget, logprob_chunk_tokens=None)).phase("training")
    items = dict(plain.items)
    # plain logits of the budget's rows: 24 B x rows x (T + 1) x V (log-probs and the diagnostics'
    # entropies), the largest item
    assert max(items.values()) == pytest.approx(24 * (16384 / 9216) * 8193 * 151936)
    assert t_budget.total < plain.total / 2
    chunk = estimate_memory(g, replace(budget, scoring="entropy")).phase("no-grad scoring")  # cross-space diagnostics
    assert dict(chunk.items)["one log-prob + entropy chunk (1024 x 151936 x 12 B)"] == 12 * 1024 * 151936


def test_config_mapping_validation_generation_batch():
    run = estimate_run(compose_config(["experiment=dsrl_qwen3_4b"]))
    s = run.estimate.setup
    assert (s.val_batch, s.val_problems_per_rank, s.val_samples, s.val_generation_seqs) == (45, 6, 20, 40)
    kv = dict(run.estimate.phase("validation: last decode").items)["KV cache (40 seqs x 9216 tokens)"]
    assert kv == kv_cache_bytes(model_geometry("qwen3-4b"), 40, 9216)
    # Without a validation batch size all 6 x 20 = 120 sequences go in one call: it does not fit.
    all_at_once = estimate_run(compose_config(["experiment=dsrl_qwen3_4b", "module.validation.generation_batch_size=null"]))
    assert all_at_once.estimate.setup.val_generation_seqs == 120 and not all_at_once.fits_hardware
    assert all_at_once.estimate.peak_phase.name == "validation: last decode step"
    # The default follows the rollout's (configs/module/default.yaml interpolation).
    q = setup_from_config(compose_config(["experiment=qlora_qwen3_4b_24gb"]))
    assert (q.val_generation_batch, q.val_problems_per_rank, q.val_generation_seqs) == (32, 64, 32)
    off = setup_from_config(compose_config(["experiment=smoke", "validate_before=false", "validate_after=false",
                                            "trainer.limit_val_batches=0"]))
    assert off.val_batch == 0 and not any(p.name.startswith("validation") for p in estimate_memory("smollm2-135m", off).phases)


def test_model_geometry_from_model_configs(tmp_path):
    from prerl.models import build_tiny_tokenizer

    def geometry(*overrides):
        return geometry_from_model_config(compose_config(list(overrides)).model)

    assert geometry("model=qwen3_1p7b") == geometry_from_config("qwen3-1.7b", name="qwen3-1.7b")
    assert geometry("model=qwen3_4b_qlora").hidden_size == 2560
    assert geometry("model=smollm2") == geometry_from_config("smollm2-135m", name="smollm2-135m")
    tiny = geometry("model=tiny")
    assert tiny.vocab_size == TINY_VOCAB == len(build_tiny_tokenizer())
    assert (tiny.model_type, tiny.hidden_size, tiny.num_layers, tiny.head_dim) == ("llama", 64, 2, 16)
    cfg = {"model_type": "qwen3", **TINY, "num_hidden_layers": 3}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert geometry("model=hf", f"model.name_or_path={tmp_path}").num_layers == 3
    assert geometry("model=hf", "model.name_or_path=/nowhere/Qwen3-8B").hidden_size == 4096  # by name
    with pytest.raises(ValueError, match="no built-in geometry"):
        geometry("model=hf", "model.name_or_path=/nowhere/Unknown-7B")


# ------------------------------------------------------------------------ GPU presets fit
EXPERIMENTS = sorted(p.stem for p in (ROOT / "configs" / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiments_declaring_hardware_fit_it(experiment):
    """Every GPU experiment declares its hardware, and the estimate fits it with >= 10% headroom
    (fragmentation of the growing KV cache and kernel workspaces beyond the assumed overhead)."""
    cfg = compose_config([f"experiment={experiment}"])
    if cfg.trainer.accelerator == "gpu":
        assert cfg.hardware is not None, f"{experiment} runs on GPUs but declares no hardware"
    if cfg.hardware is None:
        return
    run = estimate_run(cfg)
    assert run.fits_hardware, (experiment, run.peak_gib, run.estimate.peak_phase.name)
    assert run.peak_gib <= 0.9 * cfg.hardware.gpu_memory_gb, (experiment, run.peak_gib)


def test_max_generation_batch_is_the_largest_that_fits():
    run = estimate_run(compose_config(["experiment=qlora_qwen3_4b_24gb", "module.rollout.generation_batch_size=64"]))
    assert not run.fits_hardware
    n = max_generation_batch(run.estimate, 24)
    assert n % 8 == 0 and n >= 8

    def peak(gbs):
        over = ["experiment=qlora_qwen3_4b_24gb", f"module.rollout.generation_batch_size={gbs}",
                "module.validation.generation_batch_size=8"]
        return estimate_run(compose_config(over)).estimate

    assert peak(n).fits(24) and not peak(n + 8).fits(24)
    # Full fine-tuning of the same model on one 24 GB card cannot fit (weights + AdamW alone).
    full = estimate_memory("qwen3-4b", replace(run.estimate.setup, preset="full", dtype="fp32"))
    assert full.phase("optimizer").total > 24 * GiB


def test_qlora_24gb_breakdown():
    est = estimate_run(compose_config(["experiment=qlora_qwen3_4b_24gb"])).estimate
    items = {label: b for p in est.phases for label, b in p.items}
    assert items["KV cache (32 seqs x 3072 tokens)"] == 32 * 3072 * 147_456
    nf4 = items["base Linear weights (NF4 + double-quant stats)"]
    assert 0.51 < nf4 / parameter_counts(model_geometry("qwen3-4b"))["linear"] < 0.52
    assert est.peak_phase.name == "generation: last decode step"


def _cli():
    spec = importlib.util.spec_from_file_location("estimate_memory_cli", ROOT / "scripts" / "estimate_memory.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_cli_verdicts(capsys):
    cli = _cli()
    assert cli.main(["experiment=qlora_qwen3_4b_24gb"]) == 0
    out = capsys.readouterr().out
    assert "VERDICT (1 x 24 GB): FITS" in out and "KV cache (32 seqs x 3072 tokens)" in out
    assert "standard GPUs (GB): 24 fits" in out
    cli.main(["experiment=qlora_qwen3_4b_24gb", "module.rollout.generation_batch_size=64"])
    out = capsys.readouterr().out
    assert "DOES NOT FIT" in out and "try: module.rollout.generation_batch_size <=" in out
    cli.main(["experiment=dsrl_qwen3_4b", "--gpu-memory-gb", "40"])
    assert "VERDICT (40 GB): DOES NOT FIT" in capsys.readouterr().out
    cli.main(["experiment=dsrl_qwen3_4b", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert out["fits_hardware"] is True and out["per_rank"]["prompts"] == 16 and out["peak"] > 0


def test_largest_micro_batch_token_budget_is_the_edge_of_fitting():
    """max_micro_batch_tokens: at the returned budget the training and scoring phases fit, one step
    more and they do not; the whole batch on a huge card; 0 where one row does not fit."""
    from tools.memory_estimate import (
        TOKEN_BUDGET_STEP,
        format_report,
        max_micro_batch_tokens,
    )

    setup = TrainingSetup(preset="full", dtype="fp32", autocast=True, prompts_per_step=8, group_size=8,
                          response_len=4096, prompt_len=512, gradient_checkpointing=True, logprob_chunk_tokens=1024)
    est = estimate_memory("qwen3-1.7b", setup)

    def update_peak(budget: int) -> float:
        trial = estimate_memory("qwen3-1.7b", replace(setup, micro_batch=setup.sequences_per_rank,
                                                      max_tokens_per_micro_batch=budget))
        return max(p.total for p in trial.phases if p.short in ("training", "scoring")) + trial.overhead

    budget = max_micro_batch_tokens(est, 80)
    assert setup.seq_len < budget < setup.sequences_per_rank * setup.seq_len
    assert update_peak(budget) <= 80 * GiB < update_peak(budget + TOKEN_BUDGET_STEP)
    assert max_micro_batch_tokens(est, 10_000) >= setup.sequences_per_rank * setup.seq_len
    assert max_micro_batch_tokens(est, 8) == 0
    assert f"max_tokens_per_micro_batch={budget} " in format_report(est, 80)
