"""A reward that ignores correctness: Bernoulli(p) per response.

Two uses: smoke runs of the update path with models that never solve anything (tiny random
models), and the random-reward control of "Spurious Rewards: Rethinking Training Signals in
RLVR" (Shao et al. 2025). It is never a default.

The draw is a hash of (seed, problem id, response), not a stateful RNG, so the reward is a pure
function of its inputs: a run resumed from a checkpoint sees the same rewards as an
uninterrupted one.
"""

from __future__ import annotations

import hashlib

import torch

from .types import RewardResult, check_lengths

__all__ = ["RandomReward"]


class RandomReward:
    """Reward 1 with probability ``p``, decided by a seeded hash of the problem id and response."""

    def __init__(self, p: float = 0.5, seed: int = 0) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must be in [0, 1], got {p}")
        self.p = float(p)
        self.seed = int(seed)

    def _uniform(self, response: str, problem: dict) -> float:
        digest = hashlib.sha256(f"{self.seed}\x00{problem.get('id')}\x00{response}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2.0**64

    def __call__(self, responses: list[str], problems: list[dict]) -> RewardResult:
        check_lengths(responses, problems)
        rewards = torch.tensor([float(self._uniform(r, p) < self.p) for r, p in zip(responses, problems)])
        return RewardResult(rewards=rewards, timeouts=0, extracted=[None] * len(responses))
