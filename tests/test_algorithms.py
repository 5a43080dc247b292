"""Advantages, filters, clipped surrogate and aggregation: hand-computed values and plain loops."""

import math

import pytest
import torch

from prerl.algorithms import ADVANTAGES, FILTERS, aggregate, clipped_surrogate, kl_penalty, token_logprobs
from prerl.metrics import group_outcomes, pass_at_k


# ------------------------------------------------------------------ advantages, hand-computed
def test_grpo_hand_computed():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    adv = ADVANTAGES.get("grpo")(r, group_size=4)
    std = torch.tensor([1.0, 0, 0, 0]).std()  # Bessel: sqrt(0.25) = 0.5
    assert std.item() == pytest.approx(0.5)
    expected = torch.tensor([0.75, -0.25, -0.25, -0.25]) / (0.5 + 1e-6)
    torch.testing.assert_close(adv[:4], expected)
    torch.testing.assert_close(adv[4:], torch.zeros(4))  # all-correct group: no signal


def test_mean_nsr_psr_wreinforce_hand_computed():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0])
    torch.testing.assert_close(ADVANTAGES.get("mean")(r, 4), torch.tensor([0.75, -0.25, -0.25, -0.25]))
    torch.testing.assert_close(ADVANTAGES.get("nsr")(r, 4), torch.tensor([0.0, -1.0, -1.0, -1.0]))
    torch.testing.assert_close(ADVANTAGES.get("psr")(r, 4), torch.tensor([1.0, 0.0, 0.0, 0.0]))
    torch.testing.assert_close(ADVANTAGES.get("w_reinforce")(r, 4), torch.tensor([0.1, -1.0, -1.0, -1.0]))
    torch.testing.assert_close(
        ADVANTAGES.get("w_reinforce")(r, 4, positive_weight=0.5), torch.tensor([0.5, -1.0, -1.0, -1.0])
    )


def _loop_advantage(name, rewards, G):
    out = []
    for g in range(len(rewards) // G):
        grp = [float(x) for x in rewards[g * G : (g + 1) * G]]
        mean = sum(grp) / G
        std = math.sqrt(sum((x - mean) ** 2 for x in grp) / (G - 1))
        for x in grp:
            right = x > 0.5
            out.append(
                {
                    "grpo": (x - mean) / (std + 1e-6),
                    "mean": x - mean,
                    "nsr": 0.0 if right else -1.0,
                    "psr": 1.0 if right else 0.0,
                    "w_reinforce": 0.1 if right else -1.0,
                }[name]
            )
    return torch.tensor(out)


@pytest.mark.parametrize("name", ["grpo", "mean", "nsr", "psr", "w_reinforce"])
def test_advantages_match_plain_loop(name):
    gen = torch.Generator().manual_seed(0)
    for G in (2, 4, 8):
        rewards = torch.randint(0, 2, (6 * G,), generator=gen).float()
        torch.testing.assert_close(ADVANTAGES.get(name)(rewards, G), _loop_advantage(name, rewards, G), atol=1e-5, rtol=1e-5)


def test_bad_group_layout_and_names_raise():
    with pytest.raises(ValueError, match="divisible"):
        ADVANTAGES.get("mean")(torch.zeros(5), 2)
    with pytest.raises(ValueError, match="group_size >= 2"):
        ADVANTAGES.get("grpo")(torch.zeros(4), 1)
    with pytest.raises(ValueError, match="unknown advantage estimator 'gae'.*grpo"):
        ADVANTAGES.get("gae")


def test_authors_nsr_convention_drops_uniform_groups():
    r = torch.tensor([0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 1.0])  # all-wrong, all-right, mixed
    keep = FILTERS.get("negative")(ADVANTAGES.get("mean")(r, 3))
    assert keep.tolist() == [False] * 6 + [False, True, False]
    keep_fixed = FILTERS.get("negative")(ADVANTAGES.get("nsr")(r, 3))
    assert keep_fixed.tolist() == [True, True, True, False, False, False, False, True, False]


def test_filters():
    a = torch.tensor([-0.5, 0.0, 0.25])
    assert FILTERS.get("all")(a).tolist() == [True, True, True]
    assert FILTERS.get("negative")(a).tolist() == [True, False, False]
    assert FILTERS.get("positive")(a).tolist() == [False, False, True]
    assert FILTERS.get("nonzero")(a).tolist() == [True, False, True]


# ------------------------------------------------------------------ clipped surrogate
def test_surrogate_hand_computed():
    lp = torch.log(torch.tensor([[1.5, 0.5, 1.0]]))
    old = torch.zeros(1, 3)
    loss, clipped = clipped_surrogate(lp, old, torch.tensor([1.0]), 0.2, 0.2)
    # A > 0: min(r A, clip(r) A) -> r = 1.5 clipped to 1.2; r = 0.5 not clipped (0.5 < 0.8 * 1)
    torch.testing.assert_close(loss, -torch.tensor([[1.2, 0.5, 1.0]]))
    assert clipped.tolist() == [[True, False, False]]
    loss, clipped = clipped_surrogate(lp, old, torch.tensor([-1.0]), 0.2, 0.2)
    # A < 0: max(-rA, -clip(r)A) -> r=1.5: max(1.5, 1.2)=1.5; r=0.5: max(0.5, 0.8)=0.8 (clipped)
    torch.testing.assert_close(loss, torch.tensor([[1.5, 0.8, 1.0]]))
    assert clipped.tolist() == [[False, True, False]]


def test_dual_clip_bounds_negative_advantage_loss():
    lp = torch.log(torch.tensor([[20.0, 2.0]]))
    loss, clipped = clipped_surrogate(lp, torch.zeros(1, 2), torch.tensor([-1.0]), 0.2, 0.2, dual_clip=10.0)
    torch.testing.assert_close(loss, torch.tensor([[10.0, 2.0]]))  # 20 capped at c * |A| = 10
    assert clipped.tolist() == [[True, False]]
    with pytest.raises(ValueError, match="dual_clip"):
        clipped_surrogate(lp, torch.zeros(1, 2), torch.tensor([-1.0]), dual_clip=0.5)


def _loop_surrogate(lp, old, adv, lo, hi, c):
    out = torch.zeros_like(lp)
    for i in range(lp.shape[0]):
        for t in range(lp.shape[1]):
            r = math.exp(lp[i, t] - old[i, t])
            a = float(adv[i])
            v = max(-a * r, -a * min(max(r, 1 - lo), 1 + hi))
            if c is not None and a < 0:
                v = min(v, -c * a)
            out[i, t] = v
    return out


@pytest.mark.parametrize("dual_clip", [None, 3.0])
def test_surrogate_matches_plain_loop(dual_clip):
    gen = torch.Generator().manual_seed(1)
    lp = torch.randn(5, 7, generator=gen) * 0.5 - 1
    old = lp + torch.randn(5, 7, generator=gen) * 0.5
    adv = torch.randn(5, generator=gen)
    loss, _ = clipped_surrogate(lp, old, adv, 0.2, 0.28, dual_clip)
    torch.testing.assert_close(loss, _loop_surrogate(lp, old, adv, 0.2, 0.28, dual_clip), atol=1e-5, rtol=1e-5)


def test_on_policy_gradient_is_reinforce():
    """With ratio 1 the gradient of the surrogate is -A * grad log p (REINFORCE)."""
    lp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    loss, _ = clipped_surrogate(lp, lp.detach(), torch.tensor([-0.5]))
    loss.sum().backward()
    torch.testing.assert_close(lp.grad, torch.tensor([[0.5, 0.5]]))  # positive: descent lowers log p


# ------------------------------------------------------------------ aggregation
def _loop_aggregate(loss, mask, mode, norm_length):
    rows = []
    tok_sum, tok_n = 0.0, 0.0
    for i in range(loss.shape[0]):
        vals = [float(loss[i, t]) for t in range(loss.shape[1]) if mask[i, t]]
        tok_sum += sum(vals)
        tok_n += len(vals)
        if vals:
            rows.append(sum(vals) / len(vals) if mode == "seq-mean-token-mean" else sum(vals) / norm_length)
    if mode == "token-mean":
        return tok_sum / max(tok_n, 1)
    if mode == "seq-mean-token-sum-norm":
        return sum(rows)  # verl: no division by the number of sequences
    return sum(rows) / max(len(rows), 1)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_aggregate_matches_plain_loop_and_split_invariance(mode):
    gen = torch.Generator().manual_seed(2)
    loss = torch.randn(6, 9, generator=gen)
    mask = (torch.rand(6, 9, generator=gen) > 0.3).long()
    mask[2] = 0  # a row with no kept token
    full = aggregate(loss, mask, mode, norm_length=9)
    assert float(full) == pytest.approx(_loop_aggregate(loss, mask, mode, 9), abs=1e-6)
    # Summing micro-batches with the mini-batch's counts equals the whole.
    counts = dict(num_tokens=mask.sum(), num_seqs=(mask.sum(1) > 0).sum(), norm_length=9)
    parts = sum(aggregate(loss[i : i + 2], mask[i : i + 2], mode, **counts) for i in range(0, 6, 2))
    torch.testing.assert_close(parts, full)


def test_aggregate_hand_computed_and_errors():
    loss = torch.tensor([[1.0, 3.0, 0.0], [2.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert float(aggregate(loss, mask, "token-mean")) == pytest.approx(2.0)
    assert float(aggregate(loss, mask, "seq-mean-token-mean")) == pytest.approx(2.0)  # (2 + 2) / 2
    # verl: (sum of token sums) / horizon, no division by the 2 sequences
    assert float(aggregate(loss, mask, "seq-mean-token-sum-norm", norm_length=4)) == pytest.approx((4 + 2) / 4)
    assert float(aggregate(loss, mask, "seq-mean-token-sum-norm")) == pytest.approx((4 + 2) / 3)  # horizon T
    assert float(aggregate(loss, torch.zeros_like(mask), "token-mean")) == 0.0
    with pytest.raises(ValueError, match="unknown loss aggregation"):
        aggregate(loss, mask, "sum")


# ------------------------------------------------------------------ log-probs, KL, metrics
def test_token_logprobs_and_temperature():
    logits = torch.randn(2, 3, 11)
    labels = torch.randint(0, 11, (2, 3))
    expected = torch.log_softmax(logits / 0.7, -1).gather(-1, labels[..., None])[..., 0]
    torch.testing.assert_close(token_logprobs(logits, labels, 0.7), expected)


def test_kl_estimators():
    lp, ref = torch.tensor([[-1.0]]), torch.tensor([[-1.5]])
    assert float(kl_penalty(lp, ref, "k1")) == pytest.approx(0.5)
    assert float(kl_penalty(lp, ref, "k2")) == pytest.approx(0.125)
    assert float(kl_penalty(lp, ref, "k3")) == pytest.approx(math.exp(-0.5) - 1 + 0.5)
    with pytest.raises(ValueError, match="KL estimator"):
        kl_penalty(lp, ref, "k4")


def test_group_outcomes():
    out = group_outcomes(torch.tensor([1.0, 1, 0, 0, 1, 0]), 2)
    assert [float(out[k]) for k in ("groups_all_correct", "groups_all_wrong", "groups_mixed")] == pytest.approx([1 / 3] * 3)


def test_pass_at_k_unbiased_estimator():
    assert pass_at_k(10, 0, 5) == 0.0
    assert pass_at_k(10, 6, 5) == 1.0  # n - c < k
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(10, 3, 2) == pytest.approx(1 - math.comb(7, 2) / math.comb(10, 2))
    assert pass_at_k(256, 10, 64) == pytest.approx(1 - math.comb(246, 64) / math.comb(256, 64))
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)
