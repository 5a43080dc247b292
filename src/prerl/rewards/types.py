"""The result type every reward returns, and the protocol rewards follow."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch

__all__ = ["RewardResult", "Reward"]


@dataclass
class RewardResult:
    """Outcome of scoring ``N`` responses.

    rewards:   float tensor of shape (N,); the built-in rewards give 0. or 1. (accuracy metrics count
               reward > 0.5), plug-in rewards may give any finite value.
    timeouts:  how many of the N verifications hit the time limit (their reward is 0).
    extracted: the answer string pulled out of each response, ``None`` when none was found.
    errors:    how many of the N responses made the reward raise and were scored 0 instead
               (``reward.on_error=zero``, see :func:`prerl.rewards.build_reward`).
    """

    rewards: torch.Tensor
    timeouts: int = 0
    extracted: list[str | None] = field(default_factory=list)
    errors: int = 0

    def __post_init__(self) -> None:
        if self.rewards.dim() != 1:
            raise ValueError(f"rewards must be 1-D, got shape {tuple(self.rewards.shape)}")
        if self.extracted and len(self.extracted) != self.rewards.numel():
            raise ValueError(
                f"extracted has {len(self.extracted)} entries for {self.rewards.numel()} rewards"
            )

    def __len__(self) -> int:
        return self.rewards.numel()


@runtime_checkable
class Reward(Protocol):
    """``reward(responses, problems) -> RewardResult``; ``problems[i]`` is the problem of ``responses[i]``."""

    def __call__(self, responses: list[str], problems: list[dict]) -> RewardResult: ...


def check_lengths(responses: list[str], problems: list[dict]) -> None:
    if len(responses) != len(problems):
        raise ValueError(
            f"got {len(responses)} responses but {len(problems)} problems; pass one problem per "
            "response (repeat each problem once per sampled response)"
        )
