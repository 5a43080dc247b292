"""Advantage estimators: pure tensor functions of the rewards of one rollout batch.

Rewards are laid out group by group: rows ``g * G .. g * G + G - 1`` are the G responses to
prompt g. Every estimator maps rewards ``(N,)`` to advantages ``(N,)`` with ``N = num_groups * G``.
Formulas follow ``docs/method.md`` (table "Advantages").
"""

from __future__ import annotations

import torch

from prerl.algorithms.registry import Registry

ADVANTAGES: Registry = Registry("advantage estimator")


def _groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(
            f"rewards must be 1-D with a length divisible by group_size={group_size}, "
            f"got shape {tuple(rewards.shape)}"
        )
    return rewards.float().view(-1, group_size)


def is_correct(rewards: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Which responses count as right. rewards: (N,) -> bool (N,)."""
    return rewards > threshold


@ADVANTAGES.register("grpo")
def grpo_advantage(
    rewards: torch.Tensor, group_size: int, eps: float = 1e-6, unbiased_std: bool = True
) -> torch.Tensor:
    """GRPO: (r - mean_g r) / (std_g r + eps).

    Args:
        rewards: (N,) grouped contiguously.
        group_size: G >= 2.
        eps: added to the std (1e-6 as in GRPO / verl).
        unbiased_std: Bessel-corrected std as ``torch.std`` (verl, the authors' code) if True.
    Returns:
        (N,) advantages; zero for groups whose rewards are all equal.
    """
    if group_size < 2:
        raise ValueError("the grpo advantage needs group_size >= 2 (a std over one sample is undefined)")
    r = _groups(rewards, group_size)
    std = r.std(dim=1, keepdim=True, unbiased=unbiased_std)
    return ((r - r.mean(dim=1, keepdim=True)) / (std + eps)).view(-1)


@ADVANTAGES.register("mean")
def mean_advantage(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """Dr. GRPO / the authors' P(y) term: r - mean_g r. rewards (N,) -> (N,)."""
    r = _groups(rewards, group_size)
    return (r - r.mean(dim=1, keepdim=True)).view(-1)


@ADVANTAGES.register("nsr")
def nsr_advantage(rewards: torch.Tensor, group_size: int, threshold: float = 0.5) -> torch.Tensor:
    """NSR paper: -1 for wrong responses, 0 for right ones (which its filter drops). (N,) -> (N,)."""
    _groups(rewards, group_size)
    return torch.where(is_correct(rewards, threshold), 0.0, -1.0)


@ADVANTAGES.register("psr")
def psr_advantage(rewards: torch.Tensor, group_size: int, threshold: float = 0.5) -> torch.Tensor:
    """NSR paper: +1 for right responses, 0 for wrong ones (which its filter drops). (N,) -> (N,)."""
    _groups(rewards, group_size)
    return torch.where(is_correct(rewards, threshold), 1.0, 0.0)


@ADVANTAGES.register("w_reinforce")
def w_reinforce_advantage(
    rewards: torch.Tensor, group_size: int, positive_weight: float = 0.1, threshold: float = 0.5
) -> torch.Tensor:
    """NSR paper's Weighted-REINFORCE: +lambda for right (lambda = 0.1), -1 for wrong. (N,) -> (N,)."""
    _groups(rewards, group_size)
    return torch.where(is_correct(rewards, threshold), positive_weight, -1.0)
