"""Verifiable rewards: ``reward(responses, problems) -> RewardResult``.

- :class:`MathVerifyReward`   -- math-verify, gold first, strict last-``\\boxed{}`` extraction, counted timeouts.
- :class:`MathStringReward`   -- the authors' reward: last ``\\boxed{}``, MATH string normalisation, equality.
- :class:`ReasoningGymReward` -- extraction + the reasoning-gym task's own scorer.
- :class:`DispatchReward`     -- routes by ``problem["verifier"]`` (the default reward).
- :func:`build_reward`        -- ``cfg.reward`` -> checked callable; classes and plain functions
                                 (user plug-ins, see docs/rewards.md), ``on_error``, ``timeout_s``.
"""

from .dispatch import DispatchReward
from .extraction import extract_answer, last_answer_tag, last_boxed, last_number
from .gym_reward import ReasoningGymReward
from .math_string_reward import MathStringReward
from .math_verify_reward import MathVerifyReward, TimeoutException
from .plugin import PluginReward, RewardContractError, RewardError, build_reward
from .types import Reward, RewardResult

__all__ = [
    "DispatchReward",
    "MathStringReward",
    "MathVerifyReward",
    "PluginReward",
    "ReasoningGymReward",
    "Reward",
    "RewardContractError",
    "RewardError",
    "RewardResult",
    "TimeoutException",
    "build_reward",
    "extract_answer",
    "last_answer_tag",
    "last_boxed",
    "last_number",
]
