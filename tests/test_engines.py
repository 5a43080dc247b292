"""Rollout engines: the HF engine's layout, and what the update does with another engine's
log-probs (recomputed old log-probs, mismatch metrics, truncated importance sampling)."""

import functools
import math

import lightning as L
import pytest
import torch

from helpers import PatternReward, make_datamodule, make_module, make_trainer
from prerl.engines import ENGINES, HFEngine, build_engine
from prerl.engines.base import Generation
from prerl.objectives import ConditionalRL, MarginalNSR
from prerl.scoring import score_responses

OFFSET = 0.5


class OffsetEngine(HFEngine):
    """HF sampling that reports the policy's own log-probs plus ``offset``: a stand-in for an
    engine whose numerics differ from the trainer's by a known amount."""

    def __init__(self, offset: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        self.offset = offset
        self.syncs = 0

    def sync_weights(self, policy):
        self.syncs += 1

    def generate(self, prompt_ids, prompt_mask, num_samples, *args, **kwargs) -> Generation:
        out = super().generate(prompt_ids, prompt_mask, num_samples, *args, **kwargs)
        rep = lambda t: t.repeat_interleave(num_samples, dim=0)  # noqa: E731
        with torch.no_grad():
            lp, _ = score_responses(self._policy(), rep(prompt_ids), rep(prompt_mask), out.response_ids, out.response_mask)
        out.logprobs = (lp + self.offset) * out.response_mask
        return out


if "offset" not in ENGINES.names():
    ENGINES.register("offset")(OffsetEngine)


def _train(objective, engine="hf", offset=0.0, correction=None, steps=1, pattern=(1, 0)):
    module = make_module(
        objective, reward=PatternReward(pattern), diagnostics_every_n_steps=0, max_new_tokens=10,
        rollout={"engine": engine, "engine_options": {"offset": offset} if engine == "offset" else {}},
        update={"micro_batch_size": 4, "max_grad_norm": 1e9, "rollout_correction": correction},
        optimizer=functools.partial(torch.optim.SGD, lr=0.5),
    )
    L.seed_everything(0)
    module.configure_model()
    before = {k: v.detach().clone() for k, v in module.policy.named_parameters()}
    trainer = make_trainer(steps)
    trainer.fit(module, datamodule=make_datamodule(module.tokenizer))
    delta = {k: v.detach() - before[k] for k, v in module.policy.named_parameters()}
    return module, trainer.callback_metrics, delta


def test_unknown_engine_is_a_clear_error():
    with pytest.raises(ValueError, match=r"module.rollout.engine='sglang' .* one of"):
        make_module(ConditionalRL(), rollout={"engine": "sglang"})


def test_hf_engine_layout(tiny_tokenizer):
    from helpers import tiny_spec
    from prerl.rollout import response_mask_from_ids

    policy = tiny_spec().build_model().train()
    engine = build_engine("hf", policy=lambda: policy, tokenizer=tiny_tokenizer)
    ids = torch.tensor([[0, 0, 5, 6], [7, 8, 9, 10]])
    torch.manual_seed(0)
    out = engine.generate(ids, (ids != 0).long(), 3, 6, 1.0, 1.0, 0, 4)  # 4 sequences per call: 2 calls
    assert out.response_ids.shape[0] == 6 and out.response_mask.shape == out.response_ids.shape
    assert out.logprobs is None and policy.training  # sampled in eval mode, then left in train mode
    assert torch.all(out.response_ids[out.response_mask == 0] == tiny_tokenizer.pad_token_id)
    mask, truncated = response_mask_from_ids(out.response_ids, [tiny_tokenizer.eos_token_id])
    assert torch.equal(out.truncated, truncated)
    assert torch.equal(out.response_mask[~out.truncated], mask[~out.truncated])


@pytest.mark.parametrize("objective", [ConditionalRL(advantage="w_reinforce"), MarginalNSR(convention="fixed")],
                         ids=["conditional", "marginal"])
def test_engine_logprobs_equal_to_the_policy_change_nothing(objective):
    _, _, plain = _train(objective)
    module, metrics, same = _train(objective, engine="offset", offset=0.0, correction="tis")
    for key in plain:
        torch.testing.assert_close(same[key], plain[key], atol=1e-6, rtol=1e-5)
    assert float(metrics["train/rollout_mismatch/mean_abs_log_ratio"]) < 1e-5
    assert module.engine.syncs == 1  # synced after the update


def test_truncated_importance_sampling_weights_an_off_policy_engine():
    """The engine reports log-probs 0.5 above the trainer's: every token's weight is exp(-0.5), so
    with SGD (an update linear in the gradient) the change is exp(-0.5) times the uncorrected one."""
    _, _, plain = _train(ConditionalRL(advantage="w_reinforce"))
    _, metrics, off = _train(ConditionalRL(advantage="w_reinforce"), engine="offset", offset=OFFSET)
    _, _, corrected = _train(ConditionalRL(advantage="w_reinforce"), engine="offset", offset=OFFSET, correction="tis")
    assert float(metrics["train/rollout_mismatch/mean_abs_log_ratio"]) == pytest.approx(OFFSET, abs=1e-5)
    assert float(metrics["train/rollout_mismatch/max_ratio"]) == pytest.approx(math.exp(-OFFSET), rel=1e-4)
    for key in plain:
        torch.testing.assert_close(off[key], plain[key], atol=1e-6, rtol=1e-5)  # correction off: unchanged
        torch.testing.assert_close(corrected[key], plain[key] * math.exp(-OFFSET), atol=1e-6, rtol=1e-4)
    assert any(v.abs().sum() > 0 for v in plain.values())


def test_a_batch_without_learning_signal_is_a_zero_update_with_an_engines_samples():
    """Every group all-wrong: no row carries a gradient, the update forwards a zero-weight placeholder row,
    which has neither old nor reference log-probs (it once raised a TypeError with vLLM's samples,
    at the first such batch of a study run); the parameters must not move."""
    module, _, delta = _train(ConditionalRL(), engine="offset", steps=2, pattern=(0,))
    assert module.global_step == 2
    assert all(float(v.abs().max()) == 0.0 for v in delta.values())


def _greedy(engine, ids, mask, num_samples=2, chunk=None):
    out = engine.generate(ids, mask, num_samples, 8, 0.0, 1.0, 0, chunk)
    return out.response_ids * out.response_mask, out.response_mask, out.truncated


def _prompts(tok):
    texts = ["hi", "a much longer prompt than the others", "mid length one", "x"]
    enc = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    width = max(map(len, enc))
    ids = torch.tensor([[tok.pad_token_id] * (width - len(e)) + e for e in enc])
    mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in enc])
    return ids, mask


def test_length_bucketing_and_chunks_keep_the_batch_order_and_the_outputs(tiny_tokenizer):
    """Each prompt, alone and unpadded, gives the same greedy response as inside a bucketed,
    chunked batch, in the batch's row order."""
    from helpers import tiny_spec

    policy = tiny_spec().build_model()
    engine = build_engine("hf", policy=lambda: policy, tokenizer=tiny_tokenizer)
    ids, mask = _prompts(tiny_tokenizer)
    batch_ids, batch_mask, _ = _greedy(engine, ids, mask, chunk=4)  # 2 prompts x 2 per call
    for p in range(len(ids)):
        alone = ids[p : p + 1, -int(mask[p].sum()):]
        one_ids, one_mask, _ = _greedy(engine, alone, torch.ones_like(alone))
        T = one_ids.shape[1]
        assert torch.equal(batch_ids[2 * p : 2 * p + 2, :T], one_ids), p
        assert torch.equal(batch_mask[2 * p : 2 * p + 2].sum(1), one_mask.sum(1))


@pytest.mark.slow
def test_static_cache_and_compiled_decoding_give_the_same_greedy_responses(tiny_tokenizer):
    from helpers import tiny_spec

    policy = tiny_spec().build_model()
    ids, mask = _prompts(tiny_tokenizer)
    results = [
        _greedy(build_engine("hf", policy=lambda: policy, tokenizer=tiny_tokenizer, **options), ids, mask)
        for options in ({}, {"static_cache": True}, {"compile": True})
    ]
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b[:, : a.shape[1]] if a.dim() == 2 else b)
