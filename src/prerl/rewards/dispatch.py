"""Route each (response, problem) pair to the reward named by ``problem["verifier"]``."""

from __future__ import annotations

from typing import Mapping

import torch

from .types import Reward, RewardResult, check_lengths

__all__ = ["DispatchReward"]


class DispatchReward:
    """The default reward: ``verifier == "math"`` -> ``math``; ``"reasoning_gym"`` -> ``reasoning_gym``.

    Each sub-reward is called once per call with the sub-batch of its problems (order kept),
    and the results are scattered back into the original order. ``extra`` maps further
    verifier names to rewards. A problem whose verifier has no reward raises ValueError.
    """

    def __init__(
        self,
        math: Reward | None = None,
        reasoning_gym: Reward | None = None,
        extra: Mapping[str, Reward] | None = None,
    ) -> None:
        self.routes: dict[str, Reward] = {}
        if math is not None:
            self.routes["math"] = math
        if reasoning_gym is not None:
            self.routes["reasoning_gym"] = reasoning_gym
        for name, reward in (extra or {}).items():
            self.routes[str(name)] = reward
        if not self.routes:
            raise ValueError("DispatchReward needs at least one sub-reward")

    def __call__(self, responses: list[str], problems: list[dict]) -> RewardResult:
        check_lengths(responses, problems)
        groups: dict[str, list[int]] = {}
        for i, problem in enumerate(problems):
            verifier = problem.get("verifier")
            if verifier not in self.routes:
                raise ValueError(
                    f"problem {problem.get('id', '?')!r} has verifier {verifier!r}, but this "
                    f"DispatchReward only handles {sorted(self.routes)}"
                )
            groups.setdefault(verifier, []).append(i)
        rewards = torch.zeros(len(responses), dtype=torch.float32)
        extracted: list[str | None] = [None] * len(responses)
        timeouts = errors = 0
        for verifier, idx in groups.items():
            res = self.routes[verifier]([responses[i] for i in idx], [problems[i] for i in idx])
            if res.rewards.numel() != len(idx):
                raise RuntimeError(
                    f"reward for verifier {verifier!r} returned {res.rewards.numel()} rewards for {len(idx)} responses"
                )
            rewards[torch.tensor(idx, dtype=torch.long)] = res.rewards.to(torch.float32).cpu()
            for j, i in enumerate(idx):
                extracted[i] = res.extracted[j] if res.extracted else None
            timeouts += int(res.timeouts)
            errors += int(getattr(res, "errors", 0))
        return RewardResult(rewards, timeouts, extracted, errors)

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={v!r}" for k, v in self.routes.items())
        return f"DispatchReward({inner})"
