"""The algorithm vocabulary: advantages, sample filters, log-probs, losses. Pure tensor functions only."""

from prerl.algorithms.advantages import ADVANTAGES, is_correct
from prerl.algorithms.filters import FILTERS
from prerl.algorithms.logprobs import chunked_token_logprobs, entropy_from_logits, summarize_logits, token_logprobs
from prerl.algorithms.losses import (
    AGG_MODES,
    aggregate,
    clipped_surrogate,
    kl_penalty,
    masked_mean,
    truncated_is_weights,
)

__all__ = [
    "ADVANTAGES",
    "AGG_MODES",
    "FILTERS",
    "aggregate",
    "chunked_token_logprobs",
    "clipped_surrogate",
    "entropy_from_logits",
    "is_correct",
    "kl_penalty",
    "masked_mean",
    "summarize_logits",
    "token_logprobs",
    "truncated_is_weights",
]
