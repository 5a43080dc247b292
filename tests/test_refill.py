"""The hf engine with refilled rows (``engine_options.refill``, prerl.engines.refill): the same
sampling as ``generate``, and rows that ended stop being decoded."""

import logging

import pytest
import torch

from helpers import tiny_spec
from prerl.engines import build_engine
from prerl.engines.refill import refill_generate
from prerl.padding import right_pad
from prerl.scoring import score_responses
from test_vllm_engine import _prompts, _shaped_policy  # a tiny policy whose end token is likely (calibrated)


def _engines(policy, tokenizer):
    plain = build_engine("hf", policy=lambda: policy, tokenizer=tokenizer)
    return plain, build_engine("hf", policy=lambda: policy, tokenizer=tokenizer, refill=True)


def _decoded_rows(model):
    """Counts the rows of every one-token (decoding) forward of ``model``."""
    counts = []
    hook = model.register_forward_pre_hook(
        lambda _, args, kwargs: counts.append(kwargs["input_ids"].shape[0]) if kwargs["input_ids"].shape[1] == 1 else None,
        with_kwargs=True)
    return counts, hook


@pytest.mark.parametrize("rows", [None, 5, 2], ids=["all-rows", "5-rows", "2-rows"])
def test_greedy_tokens_equal_generate(tiny_tokenizer, rows):
    """Greedy responses of varied lengths (end ids chosen among generate's own tokens so rows end
    at different steps) are token for token those of ``generate``, however many rows decode at once."""
    policy = tiny_spec().build_model()
    ids, mask = _prompts(tiny_tokenizer, 5)
    plain, refill = _engines(policy, tiny_tokenizer)
    free = plain.generate(ids, mask, 2, 20, 0.0, 1.0, 0).response_ids  # no end token met
    policy.generation_config.eos_token_id = [int(free[r, c]) for r, c in ((0, 3), (4, 1), (6, 8), (8, 11))]
    a, b = plain.generate(ids, mask, 2, 20, 0.0, 1.0, 0, rows), refill.generate(ids, mask, 2, 20, 0.0, 1.0, 0, rows)
    lengths = a.response_mask.sum(1)
    assert lengths.min() < 6 and lengths.max() == 20  # rows end early and late
    for x, y in zip((a.response_ids, a.response_mask, a.truncated), (b.response_ids, b.response_mask, b.truncated)):
        assert torch.equal(x, y)
    assert b.logprobs is None and policy.training


def test_sampled_tokens_have_the_policys_logprobs_and_finished_rows_stop_costing(tiny_tokenizer):
    """Sampling at T = 0.7: the log-prob of each drawn token under the distribution it was drawn
    from equals a plain forward's over the whole response (so refilled rows see their own prompt,
    positions and cache); only unfinished rows are decoded: sum(length - 1) row-steps where
    generate decodes rows x (longest - 1) per call; sampling follows torch's seed."""
    policy = _shaped_policy(tiny_spec(), tiny_tokenizer, eos_prob=0.05)
    ids, mask = _prompts(tiny_tokenizer, 6)
    G, T, max_rows, eos = 4, 24, 8, [tiny_tokenizer.eos_token_id]
    counts, hook = _decoded_rows(policy)
    torch.manual_seed(0)
    tokens, logprobs = refill_generate(policy, ids, mask, G, T, 0.7, 1.0, 0, eos, max_rows)
    refill_steps = sum(counts)
    counts.clear()
    generated = _engines(policy, tiny_tokenizer)[0].generate(ids, mask, G, T, 0.7, 1.0, 0, max_rows)
    hook.remove()
    lengths = torch.tensor([len(t) for t in tokens])
    assert lengths.min() <= 3 and lengths.max() == T and (lengths < T).float().mean() > 0.7  # an RL-like mix
    assert refill_steps == int((lengths - 1).sum())
    # generate's calls: 2 prompts each, longest prompts first; each decodes 8 rows to its longest
    longest = generated.response_mask.sum(1).view(-1, G).amax(1)[torch.sort(mask.sum(1), descending=True, stable=True).indices]
    assert sum(counts) == int((max_rows * (longest.view(-1, 2).amax(1) - 1)).sum())
    assert refill_steps < 0.6 * sum(counts)

    response_mask = right_pad([[1] * len(t) for t in tokens], 0, torch.long)
    rep = lambda t: t.repeat_interleave(G, dim=0)  # noqa: E731
    with torch.no_grad():
        reference, _ = score_responses(policy, rep(ids), rep(mask), right_pad(tokens, 0, torch.long), response_mask,
                                       temperature=0.7)
    torch.testing.assert_close(right_pad(logprobs, 0.0, torch.float32), reference, atol=2e-5, rtol=1e-5)
    torch.manual_seed(0)
    assert refill_generate(policy, ids, mask, G, T, 0.7, 1.0, 0, eos, max_rows)[0] == tokens


def test_refill_under_sharding_samples_with_generate_and_says_so_once(tiny_tokenizer, monkeypatch, caplog):
    """Sharded ranks must decode in step, which refill cannot do: the engine samples with generate
    (greedy tokens equal) and logs that once, instead of dropping the option silently."""
    import prerl.engines.hf as hf

    real = hf.generate  # one process here: generate's synced_gpus would need a process group
    monkeypatch.setattr(hf, "generate", lambda *args, **kwargs: real(*args, **{**kwargs, "synced_gpus": False}))
    policy = tiny_spec().build_model()
    ids, mask = _prompts(tiny_tokenizer, 3)
    sharded = build_engine("hf", policy=lambda: policy, tokenizer=tiny_tokenizer, refill=True, synced_gpus=lambda: True)
    plain = build_engine("hf", policy=lambda: policy, tokenizer=tiny_tokenizer)
    with caplog.at_level(logging.WARNING, logger="prerl.engines.hf"):
        outs = [sharded.generate(ids, mask, 2, 6, 0.0, 1.0, 0) for _ in range(2)]
    assert caplog.text.count("refill is off") == 1
    expected = plain.generate(ids, mask, 2, 6, 0.0, 1.0, 0).response_ids
    assert all(torch.equal(out.response_ids, expected) for out in outs)
