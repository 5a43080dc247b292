"""Binary correctness reward for math answers, verified with HuggingFace ``math-verify``.

Protocol for one response:
  1. Extraction (strict, the default): the answer is the content of the LAST ``\\boxed{...}``
     in the response (nested braces allowed). A response without a complete boxed answer
     gets reward 0: "The answer is 72" without a box earns nothing. With
     ``strict_boxed=False`` math-verify's own lenient extraction (LaTeX environments,
     "final answer is ...", plain expressions) is applied to the whole response instead.
  2. Parsing: the gold string and the extracted answer are parsed the same, lenient way:
     first as inline math ``$...$``, then as ``\\boxed{...}``; the first attempt that yields a
     sympy object wins, otherwise the normalised string is kept (strings only ever equal
     identical strings). So golds like ``72``, ``\\frac{1}{2}``, ``\\left(3, \\frac{\\pi}{2}\\right)``
     and ``10\\%`` all parse. Parsed golds are cached.
  3. Verification: ``math_verify.verify(gold, prediction)`` -- gold FIRST (the function is
     asymmetric on purpose), for every (gold, prediction) candidate pair; any match -> 1.

Timeouts. math-verify's own timeouts use ``signal.alarm`` with whole seconds and, with the
default ``raise_on_error=False``, swallow the timeout and return False, so a caller cannot
count them. We therefore switch math-verify's internal timers off and run the whole
parse+verify of one response under OUR timer (``prerl.rewards.time_limit``: ``signal.setitimer``,
sub-second resolution) that raises math-verify's ``TimeoutException`` (a ``BaseException``!).
It is caught explicitly: reward 0 and ``timeouts += 1``.

Off the main thread signals cannot be used. ``off_main_thread="no_timeout"`` (default) then
verifies WITHOUT any time limit (a one-time warning is logged); ``"error"`` raises a
RuntimeError instead. Rewards are normally computed in the Lightning training loop on the
main thread of each process, where the timeout is active.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import torch

from .extraction import last_boxed
from .time_limit import signals_usable, time_limit
from .types import RewardResult, check_lengths

logger = logging.getLogger(__name__)

__all__ = ["MathVerifyReward", "TimeoutException"]


try:
    import math_verify
    from math_verify import grader as _mv_grader
    from math_verify import parser as _mv_parser
    from math_verify.errors import TimeoutException
except ImportError as e:  # pragma: no cover - dependency is declared in pyproject
    raise ImportError(
        "prerl.rewards needs math-verify: pip install 'math-verify>=0.8,<0.10'"
    ) from e

# We provide the timeout ourselves (see module docstring); silence math-verify's one-time
# "Timeout is disabled ..." warning, which is about its internal timers that we switch off.
_mv_grader.TIMEOUT_WARNING_SHOWN = True
_mv_parser.TIMEOUT_WARNING_SHOWN = True


class MathVerifyReward:
    """Reward 1 iff math-verify says the (strictly boxed) answer equals the gold answer.

    Args:
        timeout_s: wall-clock limit for parsing + verifying one response (main thread only).
        strict_boxed: only the last ``\\boxed{}`` counts (default); False = math-verify's
            lenient extraction over the whole response.
        float_rounding, numeric_precision, strict: passed to ``math_verify.verify``.
        gold_field: key of the problem dict holding the gold answer string.
        off_main_thread: "no_timeout" (verify without a limit, warn once) or "error".
    """

    def __init__(
        self,
        timeout_s: float | None = 5.0,
        strict_boxed: bool = True,
        float_rounding: int = 6,
        numeric_precision: int = 15,
        strict: bool = True,
        gold_field: str = "answer",
        off_main_thread: Literal["no_timeout", "error"] = "no_timeout",
    ) -> None:
        if off_main_thread not in ("no_timeout", "error"):
            raise ValueError(f"off_main_thread must be 'no_timeout' or 'error', got {off_main_thread!r}")
        self.timeout_s = None if timeout_s is None else float(timeout_s)
        self.strict_boxed = bool(strict_boxed)
        self.float_rounding = int(float_rounding)
        self.numeric_precision = int(numeric_precision)
        self.strict = bool(strict)
        self.gold_field = gold_field
        self.off_main_thread = off_main_thread
        self._warned_thread = False
        self._extraction_config = [math_verify.LatexExtractionConfig(), math_verify.ExprExtractionConfig()]
        self._gold_cache: dict[str, list[Any]] = {}
        self._gold_cache_size = 65536

    # ------------------------------------------------------------------ parsing
    def _parse(self, text: str) -> list[Any]:
        try:
            return math_verify.parse(
                text,
                extraction_config=self._extraction_config,
                parsing_timeout=None,  # our own timer covers it
                raise_on_error=True,  # otherwise math-verify swallows our TimeoutException
            )
        except Exception:  # a parse failure is "nothing parsed"; TimeoutException propagates
            logger.debug("math-verify could not parse %r", text[:200], exc_info=True)
            return []

    def _parse_answer(self, answer: str) -> list[Any]:
        """Parse a bare answer string (gold or extracted box content) leniently."""
        answer = answer.strip()
        if not answer:
            return []
        flat = " ".join(answer.split("\n"))
        string_only: list[Any] = []
        for wrapped in (f"${flat}$", f"\\boxed{{{answer}}}"):
            parsed = self._parse(wrapped)
            if any(not isinstance(p, str) for p in parsed):
                return parsed
            if parsed and not string_only:
                string_only = parsed
        return string_only or [answer]

    def _parse_gold(self, gold: str) -> list[Any]:
        cached = self._gold_cache.get(gold)
        if cached is None:
            cached = self._parse_answer(gold)
            if len(self._gold_cache) >= self._gold_cache_size:
                self._gold_cache.clear()
            self._gold_cache[gold] = cached
        return cached

    def _verify(self, gold: list[Any], pred: list[Any]) -> bool:
        # Same as math_verify.verify(gold_list, pred_list) with raise_on_error=False, except
        # that a TimeoutException propagates instead of being swallowed.
        for g in gold:
            for t in pred:
                try:
                    if math_verify.verify(
                        g,
                        t,
                        float_rounding=self.float_rounding,
                        numeric_precision=self.numeric_precision,
                        strict=self.strict,
                        timeout_seconds=None,
                        raise_on_error=True,
                    ):
                        return True
                except Exception:
                    logger.debug("math-verify comparison failed", exc_info=True)
        return False

    # ------------------------------------------------------------------ scoring
    def _timeout_for_this_thread(self) -> float | None:
        if signals_usable():
            return self.timeout_s
        if self.timeout_s and self.off_main_thread == "error":
            raise RuntimeError(
                "MathVerifyReward was called off the main thread, where its signal-based "
                "timeout cannot work; call it from the main thread or construct it with "
                "off_main_thread='no_timeout' (verification then runs without a time limit)"
            )
        if self.timeout_s and not self._warned_thread:
            logger.warning(
                "MathVerifyReward called off the main thread: verifying WITHOUT a timeout "
                "(signal.setitimer only works on the main thread)"
            )
            self._warned_thread = True
        return None

    def score_one(self, response: str, gold: str, timeout_s: float | None) -> tuple[float, str | None, bool]:
        """Return (reward, extracted answer, timed_out) for one response."""
        if self.strict_boxed:
            extracted = last_boxed(response)
            if extracted is None:
                return 0.0, None, False
        else:
            extracted = None
        try:
            with time_limit(timeout_s, TimeoutException):
                gold_parsed = self._parse_gold(str(gold))
                if self.strict_boxed:
                    pred_parsed = self._parse_answer(extracted)
                else:
                    pred_parsed = self._parse(response)
                    if pred_parsed:
                        strs = [p for p in pred_parsed if isinstance(p, str)]
                        extracted = strs[0] if strs else str(pred_parsed[0])
                ok = bool(gold_parsed) and bool(pred_parsed) and self._verify(gold_parsed, pred_parsed)
        except TimeoutException:
            logger.debug("math-verify timed out on gold %r", str(gold)[:100])
            return 0.0, extracted, True
        return (1.0 if ok else 0.0), extracted, False

    def __call__(self, responses: list[str], problems: list[dict]) -> RewardResult:
        check_lengths(responses, problems)
        timeout_s = self._timeout_for_this_thread()
        rewards: list[float] = []
        extracted: list[str | None] = []
        timeouts = 0
        for response, problem in zip(responses, problems):
            try:
                gold = problem[self.gold_field]
            except KeyError:
                raise KeyError(
                    f"problem {problem.get('id', '?')!r} has no gold field {self.gold_field!r}"
                ) from None
            r, ext, timed_out = self.score_one(response, gold, timeout_s)
            rewards.append(r)
            extracted.append(ext)
            timeouts += int(timed_out)
        return RewardResult(
            rewards=torch.tensor(rewards, dtype=torch.float32),
            timeouts=timeouts,
            extracted=extracted,
        )

    def __repr__(self) -> str:
        return (
            f"MathVerifyReward(timeout_s={self.timeout_s}, strict_boxed={self.strict_boxed}, "
            f"float_rounding={self.float_rounding}, numeric_precision={self.numeric_precision}, "
            f"strict={self.strict})"
        )

