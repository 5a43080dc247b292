"""The hf engine's bf16 sampling view (``engine_options.sampling_weights``, prerl.engines.sampling_weights):
the tokens of today's autocast path, the cast made once per rollout and dropped after it."""

import gc
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import prerl.engines.sampling_weights as sampling_weights
from helpers import tiny_spec, torchrun_workers
from prerl.engines import build_engine
from prerl.models import LoraSettings
from test_vllm_engine import _prompts

MAX_NEW = 12


def _greedy(policy, tokenizer, ids, mask, autocast=False, **options):
    engine = build_engine("hf", policy=lambda: policy, tokenizer=tokenizer, **options)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = engine.generate(ids, mask, 2, MAX_NEW, 0.0, 1.0, 0, 4)
    return out.response_ids


def _watch_weights(module: torch.nn.Module):
    """The dtype of ``module.weight`` at each forward, and weak references to the weights seen."""
    seen, refs = [], []

    def hook(mod, _):
        seen.append(mod.weight.dtype)
        refs.append(weakref.ref(mod.weight))

    return seen, refs, module.register_forward_pre_hook(hook)


@pytest.mark.parametrize("options", [{}, {"refill": True}], ids=["generate", "refill"])
def test_bf16_view_gives_the_autocast_tokens_and_is_dropped_after_the_rollout(tiny_tokenizer, options):
    spec = tiny_spec(lora=LoraSettings(r=4, alpha=8))
    policy = spec.build_model().train()
    torch.manual_seed(0)
    with torch.no_grad():  # LoRA's B starts at 0: make the adapters count
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    ids, mask = _prompts(tiny_tokenizer, 4)
    reference = _greedy(policy, tiny_tokenizer, ids, mask, autocast=True, **options)  # bf16-mixed today
    assert not torch.equal(reference, _greedy(policy, tiny_tokenizer, ids, mask, **options))  # bf16 matters here
    params = dict(policy.named_parameters())
    head = policy.get_base_model().lm_head
    seen, refs, hook = _watch_weights(head)
    for autocast in (False, True):  # the option autocasts itself; inside training's autocast too
        assert torch.equal(_greedy(policy, tiny_tokenizer, ids, mask, autocast, sampling_weights="bfloat16", **options),
                           reference)
    hook.remove()
    assert set(seen) == {torch.bfloat16}  # every matmul sees the bf16 view: autocast has nothing to cast
    gc.collect()
    assert all(r() is None for r in refs)  # no bf16 copy outlives its rollout
    assert all(p is params[n] and p.dtype == torch.float32 for n, p in policy.named_parameters())
    assert policy.training


class _WeightCasts(TorchDispatchMode):
    """Counts float32 -> bf16 copies of 2-D tensors (weights; activations are 3-D)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten._to_copy.default and args[0].dim() == 2 and args[0].dtype == torch.float32 \
                and out.dtype == torch.bfloat16:
            self.count += 1
        return out


def test_weights_are_cast_once_per_rollout_under_lightnings_autocast(tiny_tokenizer):
    """Lightning's bf16-mixed autocasts with ``cache_enabled=False``: by default every forward
    re-casts every Linear weight (casts grow with the tokens decoded); with the option the casts are
    one per Linear per rollout, whatever its length."""
    policy = tiny_spec().build_model()
    ids, mask = torch.tensor([[5, 6, 7]]), torch.ones(1, 3, dtype=torch.long)
    linears = sum(isinstance(m, torch.nn.Linear) for m in policy.modules())
    casts = {}
    for options in ({}, {"sampling_weights": "bfloat16"}):
        engine = build_engine("hf", policy=lambda: policy, tokenizer=tiny_tokenizer, **options)
        for new in (4, 16):
            with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False), _WeightCasts() as counter:
                assert engine.generate(ids, mask, 1, new, 0.0, 1.0, 0).response_ids.shape[1] == new  # no end met
            casts[bool(options), new] = counter.count
    assert casts == {(False, 4): 4 * linears, (False, 16): 16 * linears, (True, 4): linears, (True, 16): linears}


def test_gathered_copy_samples_the_autocast_tokens(tiny_tokenizer):
    """The sharded path (an unsharded bf16-Linear copy from the gathered state dict) on a plain
    policy with tied embeddings: the same greedy tokens, the policy untouched; the copy is freed."""
    policy = tiny_spec(tie_word_embeddings=True).build_model()
    ids, mask = _prompts(tiny_tokenizer, 4)
    reference = _greedy(policy, tiny_tokenizer, ids, mask, autocast=True)
    with sampling_weights.sampling_view(policy, "bfloat16", True, 8, ids.shape[1] + MAX_NEW, ids.device) as (copy, synced):
        assert copy is not policy and not synced
        assert copy.lm_head.weight.dtype == torch.bfloat16 and copy.model.norm.weight.dtype == torch.float32
        engine = build_engine("hf", policy=lambda: copy, tokenizer=tiny_tokenizer)
        assert torch.equal(engine.generate(ids, mask, 2, MAX_NEW, 0.0, 1.0, 0, 4).response_ids, reference)
        ref = weakref.ref(copy)
        del copy, engine
    gc.collect()
    assert ref() is None
    assert all(p.dtype == torch.float32 for p in policy.parameters())


def test_no_room_for_the_copy_samples_from_the_policy(tiny_tokenizer, monkeypatch, caplog):
    policy = tiny_spec().build_model()
    ids, mask = _prompts(tiny_tokenizer, 4)
    reference = _greedy(policy, tiny_tokenizer, ids, mask, autocast=True)
    monkeypatch.setattr(sampling_weights, "free_memory", lambda device: 1 << 10)
    seen, _, hook = _watch_weights(policy.lm_head)
    with caplog.at_level("INFO", logger="prerl.engines.sampling_weights"):
        assert torch.equal(_greedy(policy, tiny_tokenizer, ids, mask, autocast=True, sampling_weights="bfloat16"),
                           reference)
    hook.remove()
    assert set(seen) == {torch.float32} and "sampling from the policy as it is" in caplog.text
    with pytest.raises(ValueError, match="sampling_weights='float16'"):
        build_engine("hf", policy=lambda: policy, tokenizer=tiny_tokenizer, sampling_weights="float16")


def _fsdp_worker(out: str) -> None:
    """Run by torchrun on 2 CPU processes (test below): each rank samples other prompts (so its
    steps differ from the other rank's) from the FSDP1-sharded policy through the gathered bf16 copy,
    with refill; the greedy tokens are the unsharded policy's under autocast."""
    import functools
    import json
    from pathlib import Path

    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from prerl.models import build_tiny_tokenizer

    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank()
    tokenizer = build_tiny_tokenizer()
    ids, mask = _prompts(tokenizer, 4)
    ids, mask = ids[2 * rank : 2 * rank + 2 - rank], mask[2 * rank : 2 * rank + 2 - rank]  # 2 prompts, then 1
    reference = _greedy(tiny_spec().build_model(), tokenizer, ids, mask, autocast=True)
    sharded = FSDP(tiny_spec().build_model(), auto_wrap_policy=functools.partial(
        transformer_auto_wrap_policy, transformer_layer_cls={LlamaDecoderLayer}), device_id=torch.device("cpu"),
        use_orig_params=True)
    engine = build_engine("hf", policy=lambda: sharded, tokenizer=tokenizer, synced_gpus=lambda: True,
                          sampling_weights="bfloat16", refill=True)
    sharded_forwards = []  # forwards of the FSDP units (each one an all-gather): none while sampling
    for unit in FSDP.fsdp_modules(sharded):
        unit.register_forward_pre_hook(lambda *_: sharded_forwards.append(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        tokens = engine.generate(ids, mask, 2, MAX_NEW, 0.0, 1.0, 0, 4).response_ids
    Path(out, f"rank{rank}.json").write_text(json.dumps({"same": torch.equal(tokens, reference),
                                                         "sharded_forwards": len(sharded_forwards)}))
    torch.distributed.destroy_process_group()


def test_fsdp_ranks_sample_from_a_gathered_copy_at_their_own_pace(tmp_path):
    for result in torchrun_workers(__file__, tmp_path):
        assert result == {"same": True, "sharded_forwards": 0}


if __name__ == "__main__":  # torchrun worker of test_fsdp_ranks_sample_from_a_gathered_copy_at_their_own_pace
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent
    sys.path[:0] = [str(root.parent / "src"), str(root)]
    _fsdp_worker(sys.argv[sys.argv.index("--fsdp-worker") + 1])


def _qlora_policy():
    from prerl.models import TinyModelSpec

    policy = TinyModelSpec(quantization={"type": "nf4", "double_quant": True, "compute_dtype": "float32"},
                           lora={"r": 4, "alpha": 8}).build_model()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # LoRA's B starts at 0: make the adapters count
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return policy


def _count_4bit_matmuls(policy):
    from prerl.models.quant import linear4bit_modules

    calls = []
    hooks = [m.register_forward_pre_hook(lambda *_: calls.append(1)) for _, m in linear4bit_modules(policy)]
    return calls, hooks


@pytest.mark.filterwarnings("ignore:.*quantization_config.*:UserWarning")
def test_qlora_samples_from_a_dequantised_copy_with_the_adapters_merged(tiny_tokenizer):
    """A 4-bit policy with LoRA: no 4-bit matmul while sampling; the copy scores responses as the
    policy does up to bf16 rounding (the adapters count: the base alone is far off); it is freed
    after the rollout and the policy keeps its 4-bit weights and adapters."""
    from prerl.scoring import score_responses

    policy = _qlora_policy()
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    ids, mask = _prompts(tiny_tokenizer, 4)
    calls, hooks = _count_4bit_matmuls(policy)
    out = build_engine("hf", policy=lambda: policy, tokenizer=tiny_tokenizer, sampling_weights="bfloat16").generate(
        ids, mask, 2, MAX_NEW, 1.0, 1.0, 0)
    assert not calls and out.response_mask.sum() > 0
    build_engine("hf", policy=lambda: policy, tokenizer=tiny_tokenizer).generate(ids, mask, 2, MAX_NEW, 1.0, 1.0, 0)
    assert calls  # the check above can fail: without the option, sampling runs the 4-bit layers
    for h in hooks:
        h.remove()
    rep = lambda t: t.repeat_interleave(2, dim=0)  # noqa: E731
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
        trained, _ = score_responses(policy, rep(ids), rep(mask), out.response_ids, out.response_mask)
        with policy.disable_adapter():
            base, _ = score_responses(policy, rep(ids), rep(mask), out.response_ids, out.response_mask)
        with sampling_weights.sampling_view(policy, "bfloat16", False, 8, ids.shape[1] + MAX_NEW, ids.device) as (copy, _):
            assert copy is not policy and copy.lm_head.weight.dtype == torch.bfloat16
            sampled, _ = score_responses(copy, rep(ids), rep(mask), out.response_ids, out.response_mask)
            ref = weakref.ref(copy)
            del copy
    on = out.response_mask.bool()
    assert (sampled - trained)[on].abs().max() < 0.02 < (base - trained)[on].abs().max()
    gc.collect()
    assert ref() is None
    assert all(torch.equal(p, before[n]) for n, p in policy.named_parameters())


@pytest.mark.filterwarnings("ignore:.*quantization_config.*:UserWarning")
def test_qlora_without_room_for_the_copy_samples_in_4_bit(tiny_tokenizer, monkeypatch, caplog):
    policy = _qlora_policy()
    ids, mask = _prompts(tiny_tokenizer, 4)
    monkeypatch.setattr(sampling_weights, "free_memory", lambda device: 1 << 10)
    calls, _ = _count_4bit_matmuls(policy)
    with caplog.at_level("INFO", logger="prerl.engines.sampling_weights"):
        _greedy(policy, tiny_tokenizer, ids, mask, autocast=True, sampling_weights="bfloat16")
    assert calls and "sampling from the policy as it is" in caplog.text
