"""The rollout-engine interface and its registry."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from prerl.algorithms.registry import Registry

ENGINES: Registry = Registry("rollout engine")


@dataclass
class Generation:
    """G sampled responses for each of B prompts, rows grouped by prompt (N = B * G).

    Attributes:
        response_ids: (N, T) right-padded with the pad id after the first end token.
        response_mask: (N, T) 1 through the first end token (all 1 when truncated).
        truncated: (N,) bool, no end token within ``max_new_tokens``.
        logprobs: (N, T) float32 log-probs of the sampled tokens under the engine's own
            numerics (0 on padding), or None when the engine does not report them (``hf``).
    """

    response_ids: torch.Tensor
    response_mask: torch.Tensor
    truncated: torch.Tensor
    logprobs: torch.Tensor | None = None


class RolloutEngine(Protocol):
    """Samples responses for a batch of prompts; owns no training state."""

    def generate(
        self,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        num_samples: int,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        top_k: int,
        generation_batch_size: int | None,
    ) -> Generation:
        """prompt_ids, prompt_mask: (B, P) left-padded -> a Generation of B * num_samples rows."""
        ...

    def sync_weights(self, policy: torch.nn.Module) -> None:
        """Make the engine sample from ``policy``'s current weights (after each update)."""
        ...


def build_engine(name: str, **kwargs: Any) -> RolloutEngine:
    """The engine registered as ``name`` (``hf``, ``vllm``), built with ``kwargs``."""
    return ENGINES.get(name)(**kwargs)
