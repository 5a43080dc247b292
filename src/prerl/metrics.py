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

    Returns mean per-token entropy under each context (``rollout_entropy/<space>``: every response
    of the rollout, unlike the update's ``entropy/<space>`` over the rows it trains on) and the mean
    log-prob gap log P(y_t | x, y_<t) - log P(y_t | c, y_<t) (positive: the question makes y more likely).
    """
    return {
        "rollout_entropy/conditional": masked_mean(cond_entropy, mask),
        "rollout_entropy/marginal": masked_mean(marg_entropy, mask),
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


def pass_at_k_ks(n: int) -> list[int]:
    """The k of a pass@k curve from n samples: 1, 2, 4, ... up to n, and n itself."""
    if n < 1:
        raise ValueError(f"need n >= 1 samples, got {n}")
    ks = [1 << i for i in range(n.bit_length()) if 1 << i <= n]
    return ks if ks[-1] == n else ks + [n]


def pass_at_k_matrix(n, correct_counts, ks) -> torch.Tensor:
    """Unbiased pass@k of every problem at every k, vectorised: (P, K) float64.

    The product form of :func:`pass_at_k`, ``1 - prod_{i=n-c+1}^{n} (1 - k / i)`` (1 where
    ``n - c < k``, exactly 0 where c = 0), over all problems at once, one k at a time.

    Args:
        n: samples per problem, an int or one per problem (P,).
        correct_counts: correct samples per problem c, (P,).
        ks: the k values (K,); each must satisfy 1 <= k <= n of every problem.
    """
    c = torch.as_tensor(correct_counts, dtype=torch.float64).reshape(-1, 1)
    n_t = torch.as_tensor(n, dtype=torch.float64).reshape(-1, 1).expand_as(c)
    ks = [int(k) for k in ks]
    if not ks:
        raise ValueError("need at least one k")
    if bool((c < 0).any() or (c > n_t).any() or (c != c.round()).any() or (n_t != n_t.round()).any()):
        raise ValueError(f"need integers 0 <= c <= n, got n={n}, correct_counts={correct_counts}")
    n_min = int(n_t.min()) if n_t.numel() else 0
    if any(k < 1 or k > n_min for k in ks):
        raise ValueError(f"need 1 <= k <= n for every problem, got ks={ks}, n={n}")
    n_max = int(n_t.max()) if n_t.numel() else 0
    i = torch.arange(1, n_max + 1, dtype=torch.float64).reshape(1, -1)  # (1, n_max)
    in_product = (i > n_t - c) & (i <= n_t)  # (P, n_max): i = n-c+1 .. n
    out = torch.empty(c.shape[0], len(ks), dtype=torch.float64)
    for j, k in enumerate(ks):
        terms = torch.where(in_product, 1.0 - k / i, torch.ones_like(i))
        passed = 1.0 - terms.prod(dim=1)
        out[:, j] = torch.where((n_t - c).reshape(-1) < k, torch.ones_like(passed), passed)
    return out


def pass_at_k_curve(n, correct_counts, ks=None) -> dict[int, float]:
    """Mean unbiased pass@k over problems for each k (default :func:`pass_at_k_ks` of n).

    ``pass_at_k_curve(4, [1, 0, 4])`` -> ``{1: 0.4167, 2: 0.5, 4: 0.6667}``; pass@1 is the mean
    accuracy c / n (avg@n).
    """
    counts = torch.as_tensor(correct_counts, dtype=torch.float64).reshape(-1)
    if counts.numel() == 0:
        raise ValueError("pass_at_k_curve needs at least one problem")
    if ks is None:
        n_min = int(torch.as_tensor(n).min())
        ks = pass_at_k_ks(n_min)
    ks = [int(k) for k in ks]
    means = pass_at_k_matrix(n, counts, ks).mean(dim=0)
    return {k: float(v) for k, v in zip(ks, means)}
