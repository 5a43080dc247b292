"""The LightningModule's settings (``module.rollout``, ``module.update``, ``module.validation``),
each value checked when the config is built, before any model exists: one line naming the key,
its value and what is allowed."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


def require(ok: bool, key: str, value: Any, allowed: str) -> None:
    """A one-line settings error naming the key, its value and what is allowed."""
    if not ok:
        raise ValueError(f"{key}={value!r} is not allowed: {allowed}")


def _positive(prefix: str, settings: Any, *names: str, optional: tuple[str, ...] = ()) -> None:
    for name in names + optional:
        value = getattr(settings, name)
        if value is None and name in optional:
            continue
        require(isinstance(value, int) and not isinstance(value, bool) and value >= 1, f"{prefix}.{name}", value,
                "an integer >= 1" + (" or null" if name in optional else ""))


@dataclass
class RolloutConfig:
    """How responses are sampled for training (docs/method.md: 8 responses at T = 1.0)."""

    group_size: int = 8
    max_new_tokens: int = 8192
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    generation_batch_size: int | None = None
    engine: str = "hf"
    engine_options: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        _positive("module.rollout", self, "group_size", "max_new_tokens", optional=("generation_batch_size",))
        # Training needs samples: T = 0 is greedy (G identical responses, no signal); T < 0 negates the logits.
        require(self.temperature > 0, "module.rollout.temperature", self.temperature,
                "> 0 (training samples G responses per prompt; the paper uses 1.0)")
        require(0 < self.top_p <= 1, "module.rollout.top_p", self.top_p, "in (0, 1]; 1.0 = off")
        require(isinstance(self.top_k, int) and self.top_k >= 0, "module.rollout.top_k", self.top_k, ">= 0; 0 = off")
        from prerl.engines import ENGINES

        require(self.engine in ENGINES.names(), "module.rollout.engine", self.engine, f"one of {ENGINES.names()}")


@dataclass
class UpdateConfig:
    """How a rollout batch is turned into optimizer updates (PreRL: one update per batch)."""

    epochs: int = 1
    mini_batches: int = 1
    micro_batch_size: int = 8
    max_tokens_per_micro_batch: int | None = None
    logprob_chunk_tokens: int | None = 1024
    skip_zero_advantage: bool = True
    max_grad_norm: float = 1.0
    recompute_old_logprobs: str = "auto"
    rollout_correction: str | None = None
    rollout_correction_cap: float = 2.0

    def __post_init__(self) -> None:
        _positive("module.update", self, "epochs", "mini_batches", "micro_batch_size",
                  optional=("max_tokens_per_micro_batch", "logprob_chunk_tokens"))
        require(self.max_grad_norm > 0, "module.update.max_grad_norm", self.max_grad_norm, "> 0 (the paper: 1.0)")
        require(self.recompute_old_logprobs in ("auto", "always"), "module.update.recompute_old_logprobs",
                self.recompute_old_logprobs, "'auto' or 'always'")
        require(self.rollout_correction in (None, "tis"), "module.update.rollout_correction", self.rollout_correction,
                "null or tis (truncated importance sampling)")
        require(self.rollout_correction_cap >= 1, "module.update.rollout_correction_cap", self.rollout_correction_cap,
                ">= 1")


@dataclass
class ValidationConfig:
    """avg@k validation on the held-out split (PreRL reports Avg@32 at T = 1.0)."""

    samples_per_problem: int = 4
    max_new_tokens: int = 8192
    temperature: float = 1.0
    top_p: float = 1.0
    generation_batch_size: int | None = None
    entropy: bool = False

    def __post_init__(self) -> None:
        _positive("module.validation", self, "samples_per_problem", "max_new_tokens", optional=("generation_batch_size",))
        require(self.temperature >= 0, "module.validation.temperature", self.temperature, ">= 0; 0 = greedy")
        require(0 < self.top_p <= 1, "module.validation.top_p", self.top_p, "in (0, 1]; 1.0 = off")
