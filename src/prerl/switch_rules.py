"""When DSRL leaves its NSR-PreRL warm-up: adaptive switch rules on a logged metric.

The paper switches at a fixed step S. Whether P(y|x) has saturated, or NSR has started to prune
rare valid paths, may show earlier or later in the curves, so a rule can watch a training metric
(each optimizer step's logged value) and ask for the switch when it crosses a threshold:

* ``threshold``: the window mean of the metric is above (``direction: above``) or below a value,
  e.g. ``train/accuracy`` above 0.5;
* ``growth``: the window mean has grown (or shrunk) by a relative amount since the first window,
  e.g. ``train/response_len_mean`` 30% longer than at the start (the paper: long warm-ups make
  responses too long and hurt phase 2);
* ``plateau``: the window mean has improved by less than ``min_delta`` over the previous window,
  ``patience`` times in a row, e.g. batch accuracy no longer rising.
The fixed step stays the default; with a rule, ``switch_step`` is the latest step at which the
switch happens anyway and ``min_step`` the earliest at which a rule may trigger it.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any

RULES = ("threshold", "growth", "plateau")


@dataclass
class SwitchRule:
    """A rule on one metric; ``update`` is called with each optimizer step's value.

    Args:
        rule: ``threshold`` | ``growth`` | ``plateau``.
        metric: the logged metric it watches (e.g. ``train/response_len_mean``).
        value: the threshold (``threshold``) or the relative change (``growth``, e.g. 0.3).
        direction: ``above`` or ``below`` (``threshold``, ``growth``; ``plateau``: the direction of
            improvement).
        window: steps averaged (non-finite values are skipped).
        patience: consecutive non-improving windows before ``plateau`` fires.
        min_delta: the improvement below which a window counts as a plateau.
        min_step: no switch before this many updates.
    """

    rule: str
    metric: str
    value: float = 0.0
    direction: str = "above"
    window: int = 4
    patience: int = 2
    min_delta: float = 0.0
    min_step: int = 1
    # trigger state (saved in checkpoints)
    history: deque = field(default_factory=deque)
    reference: float | None = None
    previous: float | None = None
    stale: int = 0
    seen: int = 0
    fired_at: int | None = None

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise ValueError(f"objective.adaptive_switch.rule={self.rule!r}; choose one of {RULES}")
        if self.direction not in ("above", "below"):
            raise ValueError(f"objective.adaptive_switch.direction={self.direction!r}; choose above or below")
        for name in ("window", "patience", "min_step"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"objective.adaptive_switch.{name} must be >= 1, got {getattr(self, name)}")
        self.history = deque(self.history, maxlen=int(self.window))

    def _crossed(self, mean: float, bound: float) -> bool:
        return mean >= bound if self.direction == "above" else mean <= bound

    def update(self, step: int, value: float) -> bool:
        """Record the metric of optimizer step ``step`` (1-based); True when the switch is due."""
        if self.fired_at is not None:
            return True
        if value is None or not math.isfinite(value):
            return False
        self.history.append(float(value))
        self.seen += 1
        if len(self.history) < self.window:
            return False
        mean = sum(self.history) / len(self.history)
        fire = False
        if self.rule == "threshold":
            fire = self._crossed(mean, self.value)
        elif self.rule == "growth":
            if self.reference is None:
                self.reference = mean
            sign = 1.0 if self.direction == "above" else -1.0
            fire = self.reference != 0 and self._crossed(mean, self.reference * (1.0 + sign * self.value))
        elif self.seen % self.window == 0:  # plateau: each completed, non-overlapping window
            if self.previous is not None:
                gain = (mean - self.previous) * (1.0 if self.direction == "above" else -1.0)
                self.stale = self.stale + 1 if gain < self.min_delta else 0
                fire = self.stale >= self.patience
            self.previous = mean
        if fire and step >= self.min_step:
            self.fired_at = step
            return True
        return False

    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history), "reference": self.reference, "previous": self.previous,
                "stale": self.stale, "seen": self.seen, "fired_at": self.fired_at}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = deque(state["history"], maxlen=int(self.window))
        self.reference, self.previous = state["reference"], state["previous"]
        self.stale, self.seen, self.fired_at = int(state["stale"]), int(state["seen"]), state["fired_at"]
