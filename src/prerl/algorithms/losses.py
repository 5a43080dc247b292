"""Policy-gradient losses and their aggregation: pure tensor functions, no model code.

Shapes: N responses, T response positions. ``mask`` (N, T) is 1 on the response tokens an
objective trains on (its kept samples, end token included) and 0 on padding.
"""

from __future__ import annotations

from typing import Literal

import torch

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")
AggMode = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]

# log-ratio clamp: exp(20) is far outside any clip range; prevents inf * 0 = nan.
_MAX_LOG_RATIO = 20.0


def clipped_surrogate(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token PPO clipped surrogate loss (to minimise), with optional dual clip.

    loss_t = -min(ratio_t * A, clip(ratio_t, 1 - clip_low, 1 + clip_high) * A), and for A < 0
    with dual clip c: loss_t = min(loss_t, -c * A) (Ye et al. 2020; c = 10 in the PreRL code).

    Args:
        logprobs: (N, T) current log-probs of the sampled tokens (carry the gradient).
        old_logprobs: (N, T) log-probs of the policy that sampled them, same context, no grad.
        advantages: (N,) per response or (N, T) per token.
        clip_low, clip_high: epsilon_low / epsilon_high (0.2 / 0.2 in the PreRL paper).
        dual_clip: c > 1, or None to disable.
    Returns:
        loss: (N, T) per-token loss.
        clipped: (N, T) bool, where the clipped branch was active (for the clip fraction).
    """
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1)
    log_ratio = (logprobs - old_logprobs).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped_loss = -advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    loss = torch.maximum(unclipped, clipped_loss)
    clipped = clipped_loss > unclipped
    if dual_clip is not None:
        if dual_clip <= 1.0:
            raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
        lower = -advantages * dual_clip
        dual_active = (advantages < 0) & (loss > lower)
        loss = torch.where(advantages < 0, torch.minimum(loss, lower), loss)
        clipped = clipped | dual_active
    return loss, clipped


def aggregate(
    loss: torch.Tensor,
    mask: torch.Tensor,
    mode: AggMode = "token-mean",
    num_tokens: float | torch.Tensor | None = None,
    num_seqs: float | torch.Tensor | None = None,
    norm_length: int | None = None,
) -> torch.Tensor:
    """Reduce a per-token loss to a scalar.

    The denominators may be given for a whole mini-batch so that summing the results over its
    micro-batches equals aggregating the mini-batch at once (the split does not change the update).

    Args:
        loss: (N, T) per-token loss.
        mask: (N, T) 0/1 (or bool) tokens that count.
        mode: ``token-mean``: sum / number of counted tokens (PreRL default, DAPO);
            ``seq-mean-token-mean``: mean over sequences of each sequence's token mean (GRPO);
            ``seq-mean-token-sum-norm``: the sum over sequences of each token sum, divided by
            norm_length only, as verl computes it (see the comment in the code).
        num_tokens: denominator of ``token-mean`` (default: mask.sum() here).
        num_seqs: number of sequences for ``seq-mean-token-mean`` (default: rows with any token).
        norm_length: the constant of ``seq-mean-token-sum-norm`` (default: T, the max length).
    Returns:
        scalar loss.
    """
    mask = mask.to(loss.dtype)
    if mode == "token-mean":
        denom = mask.sum() if num_tokens is None else num_tokens
        return (loss * mask).sum() / torch.clamp(torch.as_tensor(denom, dtype=loss.dtype), min=1.0)
    seq_tokens = mask.sum(dim=-1)
    seq_sum = (loss * mask).sum(dim=-1)
    if mode == "seq-mean-token-sum-norm":
        # verl's agg_loss (the authors' code base): sum of the token sums / horizon, with no
        # division by the number of sequences. Dr. GRPO's formula, (1/G) sum_i sum_t l_it / MAX_TOKENS,
        # also divides by the G sequences: the two differ by a constant factor for a fixed batch
        # shape, which AdamW's normalisation absorbs but gradient clipping does not.
        length = loss.shape[-1] if norm_length is None else norm_length
        return seq_sum.sum() / float(length)
    has_tokens = (seq_tokens > 0).to(loss.dtype)
    if num_seqs is None:
        num_seqs = has_tokens.sum()
    num_seqs = torch.clamp(torch.as_tensor(num_seqs, dtype=loss.dtype), min=1.0)
    if mode == "seq-mean-token-mean":
        return (seq_sum / seq_tokens.clamp(min=1.0) * has_tokens).sum() / num_seqs
    raise ValueError(f"unknown loss aggregation {mode!r}; choose one of {AGG_MODES}")


def truncated_is_weights(
    behaviour_logprobs: torch.Tensor, engine_logprobs: torch.Tensor, cap: float = 2.0
) -> torch.Tensor:
    """Truncated importance-sampling weights min(pi_train / pi_engine, cap) of tokens sampled by
    another engine (e.g. vLLM) than the policy being trained (Yao et al. 2025, "Your efficient RL
    framework secretly brings you off-policy RL training"; verl's TIS).

    Args:
        behaviour_logprobs: (N, T) log-probs of the sampled tokens under the training policy.
        engine_logprobs: (N, T) their log-probs under the engine that sampled them.
        cap: the truncation C >= 1.
    Returns:
        (N, T) weights in (0, cap], no gradient.
    """
    log_ratio = (behaviour_logprobs - engine_logprobs).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    return torch.exp(log_ratio).clamp(max=cap).detach()


def kl_penalty(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k3"
) -> torch.Tensor:
    """Per-token KL(pi || pi_ref) estimate from sampled tokens (Schulman's k1 / k2 / k3).

    Args:
        logprobs, ref_logprobs: (N, T).
        estimator: ``k1`` = log r, ``k2`` = (log r)^2 / 2, ``k3`` = exp(-log r) - 1 + log r
            with log r = logprobs - ref_logprobs (``k3`` is verl's "low_var_kl").
    Returns:
        (N, T) per-token penalty.
    """
    log_ratio = (logprobs - ref_logprobs).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio.square()
    if estimator == "k3":
        return torch.exp(-log_ratio) - 1.0 + log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}; choose k1, k2 or k3")


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of values where mask is set; 0 when nothing is. values, mask: same shape -> scalar."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1.0)
