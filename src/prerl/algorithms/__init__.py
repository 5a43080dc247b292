"""The algorithm vocabulary: advantages, sample filters, losses. Pure tensor functions only."""

from prerl.algorithms.advantages import ADVANTAGES, is_correct
from prerl.algorithms.filters import FILTERS
from prerl.algorithms.losses import (
    AGG_MODES,
    aggregate,
    clipped_surrogate,
    entropy_from_logits,
    kl_penalty,
    masked_mean,
    token_logprobs,
)

__all__ = [
    "ADVANTAGES",
    "AGG_MODES",
    "FILTERS",
    "aggregate",
    "clipped_surrogate",
    "entropy_from_logits",
    "is_correct",
    "kl_penalty",
    "masked_mean",
    "token_logprobs",
]
