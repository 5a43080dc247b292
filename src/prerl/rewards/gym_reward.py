"""Reward for reasoning-gym problems: extract the answer, then score it with the task's own scorer.

The scorer is ``score_answer(answer, entry)`` of the reasoning-gym dataset class that
generated the problem (``entry["metadata"]["source_dataset"]``). When the problem records the
generator config it came from (``meta["rg_config"]``, written by ``ReasoningGymSource``), the
scorer is built from that config, because a few tasks (e.g. puzzle24) read their config
while scoring; otherwise ``reasoning_gym.get_score_answer_fn`` (default config) is used.
Scores in [0, 1] are binarised: reward 1 iff score >= ``threshold`` (default 1.0, i.e. only a
fully correct answer counts; several scorers give partial credit, e.g. basic_arithmetic gives
len(gold)/len(answer) when the gold is a substring of the answer).
"""

from __future__ import annotations

import json
import logging
from typing import Any, Callable, Literal

import torch

from .extraction import extract_answer
from .types import RewardResult, check_lengths

logger = logging.getLogger(__name__)

__all__ = ["ReasoningGymReward"]


def _rg():
    try:
        import reasoning_gym
    except ImportError as e:  # pragma: no cover - declared dependency
        raise ImportError("ReasoningGymReward needs reasoning-gym: pip install reasoning-gym==0.1.25") from e
    return reasoning_gym


class ReasoningGymReward:
    """Binary reward for reasoning-gym problems.

    Args:
        extraction: how the answer is pulled from the response: "boxed" (last ``\\boxed{}``),
            "answer_tag" (last ``<answer>...</answer>``) or "last_number" (lenient).
        threshold: reward 1 iff the task scorer returns a score >= threshold.
    """

    def __init__(
        self,
        extraction: Literal["boxed", "answer_tag", "last_number"] = "boxed",
        threshold: float = 1.0,
    ) -> None:
        extract_answer("", extraction)  # validates the mode name
        self.extraction = extraction
        self.threshold = float(threshold)
        self._scorers: dict[str, Callable[[str | None, dict], float]] = {}

    def _entry(self, problem: dict) -> dict:
        meta = problem.get("meta") or {}
        if "metadata" in meta and "answer" in meta:
            return meta
        raise ValueError(
            f"problem {problem.get('id', '?')!r} has no reasoning-gym entry in problem['meta'] "
            "(expected the generator's entry with 'answer' and 'metadata'); build it with "
            "prerl.data.ReasoningGymSource"
        )

    def scorer_for(self, entry: dict) -> Callable[[str | None, dict], float]:
        rg = _rg()
        name = entry["metadata"].get("source_dataset")
        if not name:
            raise ValueError("reasoning-gym entry has no metadata['source_dataset']; cannot pick a scorer")
        config = entry.get("rg_config")
        use_config = isinstance(config, dict) and entry.get("rg_task") == name
        key = name + ("|" + json.dumps(config, sort_keys=True, default=str) if use_config else "")
        fn = self._scorers.get(key)
        if fn is None:
            if use_config:
                fn = rg.create_dataset(name, **config).score_answer
            else:
                fn = rg.get_score_answer_fn(name)
            self._scorers[key] = fn
        return fn

    def score(self, answer: str | None, entry: dict) -> float:
        return float(self.scorer_for(entry)(answer, entry))

    def __call__(self, responses: list[str], problems: list[dict]) -> RewardResult:
        check_lengths(responses, problems)
        rewards: list[float] = []
        extracted: list[str | None] = []
        for response, problem in zip(responses, problems):
            entry = self._entry(problem)
            answer = extract_answer(response, self.extraction)
            extracted.append(answer)
            if answer is None:
                rewards.append(0.0)
                continue
            try:
                s = self.score(answer, entry)
            except Exception:  # a scorer crashing on a malformed answer is a wrong answer
                logger.debug("reasoning-gym scorer raised on %r", answer[:200], exc_info=True)
                s = 0.0
            rewards.append(1.0 if s >= self.threshold else 0.0)
        return RewardResult(torch.tensor(rewards, dtype=torch.float32), 0, extracted)

    def __repr__(self) -> str:
        return f"ReasoningGymReward(extraction={self.extraction!r}, threshold={self.threshold})"

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_scorers"] = {}  # bound methods of dataset objects: rebuild lazily
        return state
