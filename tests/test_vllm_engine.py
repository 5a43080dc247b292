"""The optional vLLM rollout engine (prerl.engines.vllm, docs/engines.md).

Most tests need vLLM and run in its own environment (``bash scripts/setup_vllm.sh``)::

    .venv-vllm/bin/python -m pytest tests/test_vllm_engine.py

In the project's .venv (CI) they are skipped; what runs there: building ``vllm`` without vLLM is a
clear install error, and the weight export the sync sends (HF names, LoRA merged) is right.

The tiny model here has head_dim 64 (hidden 128, 2 heads): vLLM's CPU attention rejects the
default tiny model's head_dim 16 ("Unsupported CPU attention configuration: head_dim=16").
Its LM head is sharpened and its end token made likely (``_shaped_policy``), so greedy decoding has
clear margins and responses end within a few tokens: a random 259-token model is nearly uniform.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

from helpers import torchrun_workers
from prerl.engines import build_engine
from prerl.engines.vllm import hf_name, hf_state_dict
from prerl.models import LoraSettings, TinyModelSpec, build_tiny_tokenizer, merged_state_dict
from prerl.scoring import score_responses

HAVE_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(
    not HAVE_VLLM, reason="vllm is not installed in this environment (build it with `bash scripts/setup_vllm.sh`, "
                          "then run .venv-vllm/bin/python -m pytest tests/test_vllm_engine.py)",
)
SPEC = dict(hidden_size=128, num_heads=2, num_kv_heads=1, num_layers=2, intermediate_size=256, max_position_embeddings=256)
OPTIONS = dict(max_model_len=256, kv_cache_memory_bytes=64 << 20, enforce_eager=True)
EOS, PAD = 2, 0
MAX_NEW = 16


def _shaped_policy(spec: TinyModelSpec, tokenizer, eos_prob: float = 0.05) -> torch.nn.Module:
    """The spec's policy with logits 8x sharper and the end token at about ``eos_prob`` per step
    on the model's own samples (calibrated on them): sampled responses then both end and get
    truncated within 16 tokens, and greedy margins are clear."""
    policy = spec.build_model().eval()
    base = policy.get_base_model() if hasattr(policy, "get_base_model") else policy
    head = base.lm_head.weight
    ids, mask = _prompts(tokenizer, 8)
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        head.mul_(8.0)
        head[EOS] = 0
        torch.manual_seed(0)
        out = build_engine("hf", policy=lambda: policy, tokenizer=tokenizer).generate(ids, mask, 4, 24, 1.0, 1.0, 0)
        full = torch.cat([ids.repeat_interleave(4, 0), out.response_ids], 1)
        full_mask = torch.cat([mask.repeat_interleave(4, 0), out.response_mask], 1)
        hidden = base(input_ids=full, attention_mask=full_mask, output_hidden_states=True).hidden_states[-1]
        hidden = hidden[:, ids.shape[1]:][out.response_mask.bool()]
        direction = hidden.mean(0)
        lo, hi = 0.0, 1e4
        for _ in range(60):  # bisect the scale of the end token's row for the wanted mean probability
            mid = (lo + hi) / 2
            head[EOS] = mid * direction
            p = torch.softmax(hidden @ head.T, -1)[:, EOS].mean()
            lo, hi = (mid, hi) if p < eos_prob else (lo, mid)
    return policy


def _prompts(tokenizer, n: int = 4):
    texts = [f"<|im_start|>user\n{'What is ' * (i % 3)}{i} + {2 * i}?<|im_end|>\n<|im_start|>assistant\n" for i in range(n)]
    enc = tokenizer(texts, padding=True, return_tensors="pt", add_special_tokens=False)
    assert (enc["attention_mask"][:, 0] == 0).any(), "the prompts should be left-padded to different lengths"
    return enc["input_ids"], enc["attention_mask"]


def check_layout(out, n_rows: int, max_new: int, eos=(EOS,), pad=PAD) -> None:
    """The Generation contract (prerl.engines.base): every engine must satisfy it."""
    ids, mask, truncated = out.response_ids, out.response_mask, out.truncated
    assert ids.dtype == torch.long and mask.dtype == torch.long and truncated.dtype == torch.bool
    assert ids.shape == mask.shape and ids.shape[0] == n_rows and truncated.shape == (n_rows,)
    assert 1 <= ids.shape[1] <= max_new
    assert ids.shape[1] == int(mask.sum(1).max())  # as wide as the longest response
    is_eos = torch.isin(ids, torch.tensor(eos)) & (mask == 1)
    for r in range(n_rows):
        n = int(mask[r].sum())
        assert mask[r, :n].eq(1).all() and mask[r, n:].eq(0).all()  # a prefix mask
        assert ids[r, n:].eq(pad).all()
        if truncated[r]:
            assert n == max_new and not is_eos[r].any()
        else:
            assert is_eos[r, n - 1] and not is_eos[r, : n - 1].any()  # through the first end token
    if out.logprobs is not None:
        assert out.logprobs.dtype == torch.float32 and out.logprobs.shape == ids.shape
        assert out.logprobs[mask == 0].eq(0).all() and (out.logprobs[mask == 1] <= 0).all()


def _greedy(engine, ids, mask, max_new=MAX_NEW):
    return engine.generate(ids, mask, 1, max_new, 0.0, 1.0, 0)


def _rows(out) -> list[list[int]]:
    return [row[: int(m.sum())].tolist() for row, m in zip(out.response_ids, out.response_mask)]


def _assert_greedy_agrees(policy, hf_out, vllm_out, ids, mask, tol=1e-3):
    """Identical greedy tokens, except after a near-tie (|top1 - top2| logit < tol under the HF
    policy at the first differing position), where CPU kernels may legitimately pick either."""
    for r, (a, b) in enumerate(zip(_rows(hf_out), _rows(vllm_out))):
        if a == b:
            continue
        k = next(i for i, (x, y) in enumerate(zip(a + [-1], b + [-2])) if x != y)
        prefix = torch.cat([ids[r][mask[r].bool()], torch.tensor(a[:k], dtype=torch.long)])[None]
        with torch.no_grad():
            top = policy(input_ids=prefix).logits[0, -1].topk(2).values
        margin = float(top[0] - top[1])
        assert margin < tol, f"row {r}: greedy differs at token {k} where HF's margin is {margin:.4f}: {a} vs {b}"


# --------------------------------------------------------------------------- CI (no vLLM needed)
@pytest.mark.skipif(HAVE_VLLM, reason="vllm is installed here: the missing-install error cannot be shown")
def test_building_vllm_without_vllm_is_a_clear_install_error(tiny_tokenizer):
    policy = TinyModelSpec().build_model()
    with pytest.raises(ImportError, match=r"needs the 'vllm' package.*scripts/setup_vllm\.sh"):
        build_engine("vllm", policy=lambda: policy, tokenizer=tiny_tokenizer, synced_gpus=lambda: False)


def test_vllm_refuses_refill_false_before_it_needs_vllm(tiny_tokenizer):
    # refill: true (the main job's hf option) is what vLLM always does; false cannot be honoured.
    policy = TinyModelSpec().build_model()
    with pytest.raises(ValueError, match="vLLM always refills"):
        build_engine("vllm", policy=lambda: policy, tokenizer=tiny_tokenizer, refill=False)
    if not HAVE_VLLM:  # refill: true gets past the option check to the install error
        with pytest.raises(ImportError, match="needs the 'vllm' package"):
            build_engine("vllm", policy=lambda: policy, tokenizer=tiny_tokenizer, refill=True)


def test_only_the_rotary_reload_warning_of_a_weight_sync_is_dropped():
    import logging

    from prerl.engines.vllm import _not_rotary_reload_warning

    def record(layer):  # as vllm/model_executor/model_loader/reload/layerwise.py logs it
        return logging.LogRecord("vllm", logging.WARNING, "layerwise.py", 266, "%s: Failed to load weights", (layer,), None)

    assert not _not_rotary_reload_warning(record("RotaryEmbedding"))
    assert _not_rotary_reload_warning(record("QKVParallelLinear"))


def test_the_registry_knows_vllm_without_importing_it():
    import sys

    from prerl.engines import ENGINES

    assert "vllm" in ENGINES.names()
    if not HAVE_VLLM:
        assert "vllm" not in sys.modules


def test_hf_names_strip_every_wrapper():
    assert hf_name("base_model.model.model.layers.0.mlp.up_proj.weight") == "model.layers.0.mlp.up_proj.weight"
    assert hf_name("module._fsdp_wrapped_module.model.layers.1._fsdp_wrapped_module._checkpoint_wrapped_module"
                   ".self_attn.q_proj.weight") == "model.layers.1.self_attn.q_proj.weight"
    assert hf_name("_orig_mod.lm_head.weight") == "lm_head.weight"


def test_synced_weights_are_the_plain_models_state_dict():
    policy = TinyModelSpec(**SPEC).build_model()
    state = hf_state_dict(policy)
    assert state.keys() == policy.state_dict().keys()
    for k, v in policy.state_dict().items():
        assert torch.equal(state[k], v)


def test_synced_lora_weights_are_merged_under_hf_names():
    policy = TinyModelSpec(**SPEC, lora=LoraSettings(r=4, alpha=8)).build_model()
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)  # B = 0 at init: make the adapters do something
    state = hf_state_dict(policy)
    plain = TinyModelSpec(**SPEC).build_model()
    assert state.keys() == plain.state_dict().keys()
    expected = merged_state_dict(policy)
    for k in state:
        torch.testing.assert_close(state[k], expected[k])
    # the merged weights compute what the peft policy computes
    plain.load_state_dict(state)
    ids = torch.randint(3, 259, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, policy(input_ids=ids).logits, atol=1e-5, rtol=1e-4)
    base_only = hf_state_dict(policy, merge_lora=False)
    assert base_only.keys() == state.keys()
    assert not torch.equal(base_only["model.layers.0.self_attn.q_proj.weight"], state["model.layers.0.self_attn.q_proj.weight"])


class _FakeLLM:
    """Records the calls the engine makes on ``vllm.LLM``."""

    def __init__(self):
        self.calls = []

    def sleep(self, level):
        self.calls.append(("sleep", level))

    def wake_up(self, tags=None):
        self.calls.append(("wake_up", tags))

    def collective_rpc(self, fn, args=()):
        self.calls.append(("reload", len(args[0])))

    def reset_prefix_cache(self):
        self.calls.append(("reset_prefix_cache",))


@pytest.mark.parametrize("level", [1, 2])
def test_sleep_mode_wakes_the_weights_for_the_sync_and_the_kv_cache_for_the_rollout(level):
    """The sleep / wake sequence around an update (GPU only in practice; checked here on a fake)."""
    from prerl.engines.vllm import VLLMEngine

    policy = TinyModelSpec(**SPEC).build_model()
    engine = VLLMEngine.__new__(VLLMEngine)
    engine.llm, engine.sleep_mode, engine.sleep_level, engine.lora_mode = _FakeLLM(), True, level, "merged"
    engine._asleep, engine._needs_sync, engine.syncs = None, False, 0
    engine.sleep()  # after a rollout: the update runs with the engine's memory free
    assert engine.llm.calls == [("sleep", level)] and engine._needs_sync == (level == 2)
    engine.sync_weights(policy)  # after the update: weights wake, KV cache still asleep
    n = len(policy.state_dict())
    assert engine.llm.calls[1:] == [("wake_up", ["weights"]), ("reload", n)] and not engine._needs_sync
    engine._wake(None)  # the next rollout: the KV cache wakes, its stale prefix entries go
    assert engine.llm.calls[3:] == [("wake_up", ["kv_cache"]), ("reset_prefix_cache",)] and engine._asleep is None
    engine.sleep_mode = False
    engine.sleep()  # without sleep mode (CPU): nothing
    engine.sync_weights(policy)
    assert engine.llm.calls[5:] == [("reload", n), ("reset_prefix_cache",)]


def _fsdp_worker(out: str) -> None:
    """Run by torchrun on 2 CPU processes (test below): each rank gathers the FSDP1-sharded policy
    (one unit per block, activation checkpointing, as prerl.fsdp wraps it) with ``hf_state_dict``
    and compares it with the unsharded policy's; plain and LoRA (merged)."""
    import functools
    import json

    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointImpl, apply_activation_checkpointing, checkpoint_wrapper)
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank()
    result = {}
    for name, kwargs in (("plain", {}), ("lora", {"lora": LoraSettings(r=4, alpha=8)})):
        def build():
            policy = TinyModelSpec(**SPEC, **kwargs).build_model()
            with torch.no_grad():
                for n, p in policy.named_parameters():
                    if "lora_B" in n:
                        p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))) * 0.1)
            return policy

        reference = hf_state_dict(build())
        sharded = FSDP(build(), auto_wrap_policy=functools.partial(transformer_auto_wrap_policy,
                                                                   transformer_layer_cls={LlamaDecoderLayer}),
                       device_id=torch.device("cpu"), use_orig_params=True)
        apply_activation_checkpointing(sharded, checkpoint_wrapper_fn=functools.partial(
            checkpoint_wrapper, checkpoint_impl=CheckpointImpl.NO_REENTRANT),
            check_fn=lambda m: isinstance(m, LlamaDecoderLayer))
        gathered = hf_state_dict(sharded)
        result[name] = {
            "same_keys": sorted(gathered) == sorted(reference),
            "max_diff": max(float((gathered[k].float() - reference[k].float()).abs().max()) for k in reference),
        }
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_fsdp1_shards_are_gathered_on_every_rank(tmp_path):
    """Under FSDP1 each rank gathers the full HF state dict for its own colocated engine."""
    for rank, result in enumerate(torchrun_workers(__file__, tmp_path, timeout=600)):
        for name in ("plain", "lora"):
            assert result[name]["same_keys"], (rank, name)
            assert result[name]["max_diff"] < 1e-6, (rank, name, result[name])


# --------------------------------------------------------------------------- with vLLM
@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer(model_max_length=256)


@pytest.fixture(scope="module")
def engines(tokenizer):
    """(policy, hf engine, vllm engine, process state before / after building vLLM)."""
    import random

    import numpy as np

    if not HAVE_VLLM:
        pytest.skip("vllm is not installed")
    policy = _shaped_policy(TinyModelSpec(**SPEC), tokenizer)
    hf = build_engine("hf", policy=lambda: policy, tokenizer=tokenizer)
    torch.manual_seed(123)
    before = (torch.random.get_rng_state(), random.getstate(), np.random.get_state()[1].copy(),
              torch.get_num_threads(), torch.set_num_threads)
    engine = build_engine("vllm", policy=lambda: policy, tokenizer=tokenizer, synced_gpus=lambda: False, **OPTIONS)
    after = (torch.random.get_rng_state(), random.getstate(), np.random.get_state()[1].copy(),
             torch.get_num_threads(), torch.set_num_threads)
    yield policy, hf, engine, before, after
    engine.close()


@needs_vllm
def test_building_vllm_leaves_the_process_alone(engines):
    """vLLM seeds every RNG, drops torch to one thread and replaces torch.set_num_threads while it
    starts: the engine restores all of it, so training is unaffected."""
    _, _, engine, before, after = engines
    assert torch.equal(before[0], after[0]) and before[1] == after[1] and (before[2] == after[2]).all()
    assert before[3] == after[3] and after[4] is before[4]
    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"


@needs_vllm
def test_an_unsupported_cpu_head_dim_fails_at_build(tokenizer):
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        pytest.skip("CPU backend only")
    policy = TinyModelSpec().build_model()  # head_dim 16
    with pytest.raises(ValueError, match="head_dim=16"):
        build_engine("vllm", policy=lambda: policy, tokenizer=tokenizer, **OPTIONS)


@needs_vllm
def test_both_engines_return_the_same_layout(engines, tokenizer):
    policy, hf, engine, *_ = engines
    ids, mask = _prompts(tokenizer)
    torch.manual_seed(0)
    outs = {"hf": hf.generate(ids, mask, 3, MAX_NEW, 1.0, 1.0, 0), "vllm": engine.generate(ids, mask, 3, MAX_NEW, 1.0, 1.0, 0)}
    for name, out in outs.items():
        check_layout(out, 12, MAX_NEW)
    assert outs["hf"].logprobs is None
    # both engines end some responses and truncate others at this eos rate
    for out in outs.values():
        assert out.truncated.any() and (~out.truncated).any()
    # greedy: the G rows of a prompt are identical, rows grouped by prompt
    g = engine.generate(ids, mask, 3, MAX_NEW, 0.0, 1.0, 0)
    check_layout(g, 12, MAX_NEW)
    rows = _rows(g)
    assert all(rows[3 * i] == rows[3 * i + 1] == rows[3 * i + 2] for i in range(4))


@needs_vllm
def test_greedy_outputs_are_those_of_hf(engines, tokenizer):
    policy, hf, engine, *_ = engines
    ids, mask = _prompts(tokenizer, 8)
    a, b = _greedy(hf, ids, mask, 24), _greedy(engine, ids, mask, 24)
    _assert_greedy_agrees(policy, a, b, ids, mask)
    assert sum(x == y for x, y in zip(_rows(a), _rows(b))) >= 7
    assert torch.equal(a.truncated, b.truncated) or sum(_rows(a)[i] != _rows(b)[i] for i in range(8)) > 0


@needs_vllm
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_vllm_logprobs_are_the_policys(engines, tokenizer, temperature):
    """vLLM's log-probs of the sampled tokens equal the trainer's recomputed log softmax(logits / T)."""
    policy, _, engine, *_ = engines
    ids, mask = _prompts(tokenizer)
    out = engine.generate(ids, mask, 4, MAX_NEW, temperature, 1.0, 0)
    rep = lambda t: t.repeat_interleave(4, dim=0)  # noqa: E731
    with torch.no_grad():
        lp, _ = score_responses(policy, rep(ids), rep(mask), out.response_ids, out.response_mask, temperature=temperature)
    m = out.response_mask.bool()
    assert (lp[m] - out.logprobs[m]).abs().max() < 2e-3
    # greedy reports the raw (T = 1) log-probs of the argmax tokens
    g = _greedy(engine, ids, mask)
    with torch.no_grad():
        lp, _ = score_responses(policy, ids, mask, g.response_ids, g.response_mask)
    assert (lp - g.logprobs)[g.response_mask.bool()].abs().max() < 2e-3


@needs_vllm
def test_sampling_statistics_match_hf(engines, tokenizer):
    """First-token frequencies over many samples match the policy's probabilities for both engines
    (each of the 10 likeliest tokens within 4.5 standard errors), and the mean log-prob of sampled
    responses under the policy agrees between the engines."""
    policy, hf, engine, *_ = engines
    ids, mask = _prompts(tokenizer, 2)
    g = 1000
    with torch.no_grad():
        probs = torch.softmax(policy(input_ids=ids, attention_mask=mask).logits[:, -1].float(), -1)
    torch.manual_seed(1)
    for name, out in (("vllm", engine.generate(ids, mask, g, 1, 1.0, 1.0, 0)), ("hf", hf.generate(ids, mask, g, 1, 1.0, 1.0, 0))):
        first = out.response_ids[:, 0].view(2, g)
        for i in range(2):
            freq = torch.bincount(first[i], minlength=probs.shape[1]).float() / g
            top = probs[i].topk(10).indices
            z = (freq[top] - probs[i, top]) / (probs[i, top] * (1 - probs[i, top]) / g).sqrt()
            assert z.abs().max() < 4.5, f"{name}, prompt {i}: first-token frequencies off by {z.abs().max():.1f} sigma"
    # top-k = 1 samples the argmax
    out = engine.generate(ids, mask, 8, 1, 1.0, 1.0, 1)
    assert (out.response_ids[:, 0].view(2, 8) == probs.argmax(-1)[:, None]).all()

    def mean_logprob(out, n):
        rep = lambda t: t.repeat_interleave(n, dim=0)  # noqa: E731
        with torch.no_grad():
            lp, _ = score_responses(policy, rep(ids), rep(mask), out.response_ids, out.response_mask)
        return float(lp.sum() / out.response_mask.sum())

    torch.manual_seed(2)
    v, h = mean_logprob(engine.generate(ids, mask, 64, 8, 1.0, 1.0, 0), 64), mean_logprob(hf.generate(ids, mask, 64, 8, 1.0, 1.0, 0), 64)
    assert abs(v - h) < 0.25, (v, h)


@needs_vllm
def test_sampling_follows_torchs_global_seed(engines, tokenizer):
    _, _, engine, *_ = engines
    ids, mask = _prompts(tokenizer)
    torch.manual_seed(7)
    a = engine.generate(ids, mask, 4, MAX_NEW, 1.0, 1.0, 0)
    torch.manual_seed(7)
    b = engine.generate(ids, mask, 4, MAX_NEW, 1.0, 1.0, 0)
    c = engine.generate(ids, mask, 4, MAX_NEW, 1.0, 1.0, 0)
    assert torch.equal(a.response_ids, b.response_ids) and torch.equal(a.logprobs, b.logprobs)
    assert not torch.equal(b.response_ids, c.response_ids)


@needs_vllm
def test_weight_sync_makes_vllm_sample_the_updated_policy(engines, tokenizer):
    policy, hf, engine, *_ = engines
    ids, mask = _prompts(tokenizer, 8)
    saved = {k: v.clone() for k, v in policy.state_dict().items()}
    before = _greedy(engine, ids, mask)
    try:
        with torch.no_grad():
            gen = torch.Generator().manual_seed(5)
            for p in policy.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * p.std() * 0.5)
        stale = _greedy(engine, ids, mask)  # vLLM holds its own copy: unchanged until synced
        assert _rows(stale) == _rows(before)
        syncs = engine.syncs
        engine.sync_weights(policy)
        assert engine.syncs == syncs + 1 and engine.last_sync_seconds > 0
        after, expected = _greedy(engine, ids, mask), _greedy(hf, ids, mask)
        assert _rows(after) != _rows(before)
        _assert_greedy_agrees(policy, expected, after, ids, mask)
    finally:
        policy.load_state_dict(saved)
        engine.sync_weights(policy)
    assert _rows(_greedy(engine, ids, mask)) == _rows(before)


@needs_vllm
@pytest.mark.parametrize("mode", ["merged", "request"])
def test_lora_policy(tokenizer, mode):
    """A peft LoRA policy with non-zero adapters: vLLM samples what the peft policy samples, and a
    sync after the adapters moved follows them."""
    policy = _shaped_policy(TinyModelSpec(**SPEC, lora=LoraSettings(r=4, alpha=8)), tokenizer)

    def move_adapters(seed):
        with torch.no_grad():
            gen = torch.Generator().manual_seed(seed)
            for name, p in policy.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.3)

    move_adapters(0)
    hf = build_engine("hf", policy=lambda: policy, tokenizer=tokenizer)
    engine = build_engine("vllm", policy=lambda: policy, tokenizer=tokenizer, lora=mode, **OPTIONS)
    try:
        ids, mask = _prompts(tokenizer, 8)
        a, b = _greedy(hf, ids, mask), _greedy(engine, ids, mask)  # the first rollout syncs the adapters
        _assert_greedy_agrees(policy, a, b, ids, mask)
        with torch.no_grad():
            lp, _ = score_responses(policy, ids, mask, b.response_ids, b.response_mask)
        assert (lp - b.logprobs)[b.response_mask.bool()].abs().max() < 2e-3
        move_adapters(1)
        engine.sync_weights(policy)
        c, d = _greedy(hf, ids, mask), _greedy(engine, ids, mask)
        assert _rows(c) != _rows(a)
        _assert_greedy_agrees(policy, c, d, ids, mask)
    finally:
        engine.close()


@needs_vllm
def test_training_steps_with_the_vllm_engine():
    """Two GRPO steps through Lightning with module.rollout.engine=vllm: the engine syncs before
    the first rollout and after each update, and the update sees vLLM's log-probs."""
    import functools

    import lightning as L

    from helpers import PatternReward, make_datamodule, make_module, make_trainer
    from prerl.objectives import ConditionalRL

    module = make_module(
        ConditionalRL(), reward=PatternReward((1, 0)), diagnostics_every_n_steps=0, max_new_tokens=8,
        spec_kwargs=tuple(SPEC.items()), rollout={"engine": "vllm", "engine_options": dict(OPTIONS)},
        optimizer=functools.partial(torch.optim.SGD, lr=0.1),
    )
    L.seed_everything(0)
    trainer = make_trainer(2)
    trainer.fit(module, datamodule=make_datamodule(module.tokenizer))
    assert module.engine.syncs == 3  # before the first rollout, then after each of the 2 updates
    module.engine.close()


if __name__ == "__main__":  # torchrun worker of test_fsdp1_shards_are_gathered_on_every_rank
    import sys

    sys.path[:0] = [str(Path(__file__).resolve().parents[1] / "src")]
    _fsdp_worker(sys.argv[sys.argv.index("--fsdp-worker") + 1])
