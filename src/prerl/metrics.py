"""Rollout statistics for logging: pure functions of rewards, masks and log-probs."""

from __future__ import annotations

import math

import torch

from prerl.algorithms import is_correct, masked_mean


def group_outcomes(rewards: torch.Tensor, group_size: int) -> dict[str, torch.Tensor]:
    """Fractions of groups whose responses are all right, all wrong, or mixed.

    Args:
        rewards: (N,) grouped contiguously, N = num_groups * group_size.
    Returns:
        ``groups_all_correct``, ``groups_all_wrong``, ``groups_mixed``: scalars summing to 1.
    """
    right = is_correct(rewards).view(-1, group_size).float().mean(dim=1)
    all_correct = (right == 1).float().mean()
    all_wrong = (right == 0).float().mean()
    return {
        "groups_all_correct": all_correct,
        "groups_all_wrong": all_wrong,
        "groups_mixed": 1.0 - all_correct - all_wrong,
    }


def rollout_metrics(
    rewards: torch.Tensor, group_size: int, response_mask: torch.Tensor, truncated: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Reward, accuracy, group outcomes and response lengths of one rollout batch.

    Args:
        rewards: (N,) float.
        response_mask: (N, T).
        truncated: (N,) bool.
    """
    lengths = response_mask.sum(dim=1).float()
    return {
        "reward_mean": rewards.float().mean(),
        "accuracy": is_correct(rewards).float().mean(),
        **group_outcomes(rewards, group_size),
        "response_len_mean": lengths.mean(),
        "response_len_max": lengths.max(),
        "truncated_frac": truncated.float().mean(),
    }


def space_diagnostics(
    cond_logprobs: torch.Tensor,
    marg_logprobs: torch.Tensor,
    cond_entropy: torch.Tensor,
    marg_entropy: torch.Tensor,
    mask: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """Compare the two spaces on the same responses. All inputs (N, T); mask (N, T).

    Returns mean per-token entropy under each context and the mean log-prob gap
    log P(y_t | x, y_<t) - log P(y_t | c, y_<t) (positive: the question makes y more likely).
    """
    return {
        "entropy_conditional": masked_mean(cond_entropy, mask),
        "entropy_marginal": masked_mean(marg_entropy, mask),
        "logprob_gap": masked_mean(cond_logprobs - marg_logprobs, mask),
    }


def engine_mismatch(
    behaviour_logprobs: torch.Tensor, engine_logprobs: torch.Tensor, mask: torch.Tensor
) -> dict[str, torch.Tensor]:
    """How far the rollout engine's log-probs are from the training policy's on the same tokens.

    Args:
        behaviour_logprobs, engine_logprobs: (N, T); mask: (N, T) response tokens.
    Returns:
        ``mean_abs_log_ratio`` (token mean of |log pi_train - log pi_engine|) and ``max_ratio``
        (the largest pi_train / pi_engine).
    """
    log_ratio = (behaviour_logprobs - engine_logprobs).masked_fill(mask == 0, 0.0)
    return {
        "mean_abs_log_ratio": masked_mean(log_ratio.abs(), mask),
        "max_ratio": torch.exp(log_ratio.masked_fill(mask == 0, float("-inf")).max()) if mask.any() else torch.tensor(1.0),
    }


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: 1 - C(n-c, k) / C(n, k), in product form.

    (Chen et al. 2021; the product avoids overflowing binomials for large n.)
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))
