"""P(y) diagnostics the authors log: top-1/2/3 and end-of-response probabilities under the
question-free context (train/marginal_probs/*, with the cross-space diagnostics)."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch

from helpers import make_datamodule, make_module, make_trainer
from prerl.algorithms import summarize_logits
from prerl.objectives import ConditionalRL, MarginalRL
from prerl.scoring import score_and_summarize, score_responses
from test_scoring import _policy, _rollout


def test_summarize_logits_by_hand():
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    entropy = -(p * p.log()).sum().item()
    assert summarize_logits(p.log(), torch.tensor(1), [3]).tolist() == pytest.approx(
        [math.log(0.3), entropy, 0.5, 0.3, 0.15, 0.05], rel=1e-5)
    assert summarize_logits(p.log(), torch.tensor(1), [0, 3])[5].item() == pytest.approx(0.55)  # end tokens: summed
    hot = p.sqrt() / p.sqrt().sum()  # temperature 2: p ** (1/2), renormalised
    got = summarize_logits(p.log(), torch.tensor(2), [1], temperature=2.0)
    assert got.tolist() == pytest.approx(
        [hot[2].log().item(), -(hot * hot.log()).sum().item(), *hot[:3].tolist(), hot[1].item()], rel=1e-5)


def test_scored_with_the_question_free_context_as_a_plain_forward_gives_them():
    tok, model = _policy()
    eos = tok.eos_token_id
    responses = [[70, 71, 72, eos], [80, 81, eos], [90, 91, 92, 93, 94]]  # the last one truncated
    rollout = _rollout(tok, ["q one", "a longer question two", "three"], responses, eos)
    batch = MarginalRL().select(rollout, torch.zeros(3), torch.ones(3, dtype=torch.bool))
    args = (model, batch.prefix_ids, batch.prefix_mask, batch.response_ids, batch.response_mask)
    with torch.no_grad():
        lp, ent = score_responses(*args, with_entropy=True)
    plain = score_and_summarize(*args, [eos])
    chunked = score_and_summarize(*args, [eos], chunk_tokens=2)
    for got in (plain, chunked):
        torch.testing.assert_close(got[0], lp, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got[1], ent, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got[2], plain[2], rtol=1e-5, atol=1e-6)
    ctx = rollout.context_ids[0].tolist()
    for i, response in enumerate(responses):  # the context, then the response, positions from 0
        with torch.no_grad():
            probs = model(input_ids=torch.tensor([ctx + response])).logits[0].float().softmax(-1)
        for t in range(len(response)):
            p = probs[len(ctx) - 1 + t]
            expected = [*p.topk(3).values.tolist(), p[eos].item()]
            assert plain[2][i, t].tolist() == pytest.approx(expected, rel=1e-4, abs=1e-6)
        assert plain[2][i, len(response):].abs().sum() == 0  # padding


def test_logged_with_the_cross_space_diagnostics():
    module = make_module(ConditionalRL(), cross_space_diagnostics_every_n_steps=1, update={"micro_batch_size": 3})
    L.seed_everything(0)
    trainer = make_trainer(1)
    trainer.fit(module, datamodule=make_datamodule(module.tokenizer))
    m = {k: float(trainer.callback_metrics[f"train/marginal_probs/{k}"]) for k in ("top1", "top2", "top3", "eos")}
    assert 1 >= m["top1"] >= m["top2"] >= m["top3"] > 0 and m["top1"] + m["top2"] + m["top3"] <= 1 + 1e-6
    assert 0 < m["eos"] < 1 and not any(math.isnan(v) for v in m.values())
