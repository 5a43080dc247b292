"""A reward that ignores the response: Bernoulli(p) per response.

Two uses: smoke runs of the update path with models that never solve anything (tiny random
models), and the random-reward control of "Spurious Rewards: Rethinking Training Signals in
RLVR" (Shao et al. 2025). It is never a default.
"""

from __future__ import annotations

import torch

from .types import RewardResult, check_lengths

__all__ = ["RandomReward"]


class RandomReward:
    """Reward 1 with probability ``p``, independent of the response, from its own seeded RNG."""

    def __init__(self, p: float = 0.5, seed: int = 0) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must be in [0, 1], got {p}")
        self.p = float(p)
        self.generator = torch.Generator().manual_seed(int(seed))

    def __call__(self, responses: list[str], problems: list[dict]) -> RewardResult:
        check_lengths(responses, problems)
        rewards = (torch.rand(len(responses), generator=self.generator) < self.p).float()
        return RewardResult(rewards=rewards, timeouts=0, extracted=[None] * len(responses))
