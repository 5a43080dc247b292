"""Per-token log-probs and entropies of sampled tokens: pure tensor functions, no model code.

Two paths with the same values. ``token_logprobs`` / ``entropy_from_logits`` take full logits
(N, T, V). ``chunked_token_logprobs`` takes the hidden states that feed the LM head and never holds
more than ``chunk_tokens x V`` logits: each chunk is projected, reduced to its log-prob (and
entropy), and recomputed in backward (activation checkpointing of the head). At paper scale
(vocab 152k, 8k-token responses) the full fp32 logits of one micro-batch are most of the training
peak; chunking bounds them (the idea of Liger Kernel's fused linear cross-entropy, in plain torch).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Log-probability of each label under softmax(logits / temperature).

    Args:
        logits: (N, T, V) the logits that predict each label.
        labels: (N, T) token ids.
        temperature: the sampling temperature (TRL and verl divide logits by it).
    Returns:
        (N, T) float32 log-probs.
    """
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    picked = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of softmax(logits / temperature) at each position. (N, T, V) -> (N, T) float32."""
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    logp = torch.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(dim=-1)


def summarize_logits(
    logits: torch.Tensor, labels: torch.Tensor, stop_ids: list[int], temperature: float = 1.0
) -> torch.Tensor:
    """Log-prob of each label, entropy, and how peaked the distribution is and how likely it ends
    the response there, from one float32 copy of the logits (the memory of the entropy path).

    Args:
        logits: (..., V) the logits that predict each label; labels: (...) token ids;
        stop_ids: the token ids that end a response.
    Returns:
        (..., 6) float32: log-prob, entropy, the largest, second and third probability of
        softmax(logits / temperature), and the summed probability of ``stop_ids``.
    """
    z = logits.float()
    if temperature != 1.0:
        z = z / temperature
    lse = torch.logsumexp(z, dim=-1, keepdim=True)
    logprobs = z.gather(-1, labels.unsqueeze(-1)) - lse
    probs = (z - lse).exp_()
    entropy = lse - (probs * z).sum(dim=-1, keepdim=True)
    stop = probs[..., list(stop_ids)].sum(dim=-1, keepdim=True)
    return torch.cat([logprobs, entropy, probs.topk(3, dim=-1).values, stop], dim=-1)


def _head_chunk(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    temperature: float,
    with_entropy: bool,
) -> torch.Tensor:
    """(K, H) hidden states -> (K, 1) log-probs of ``labels`` (K,), or (K, 2) with the entropy."""
    logits = F.linear(hidden, weight, bias).float()
    if temperature != 1.0:
        logits = logits / temperature
    lse = torch.logsumexp(logits, dim=-1)
    logprobs = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - lse
    if not with_entropy:
        return logprobs.unsqueeze(-1)
    # H = -sum p log p = lse - sum p z, with p = softmax(z)
    entropy = lse - (torch.softmax(logits, dim=-1) * logits).sum(dim=-1)
    return torch.stack([logprobs, entropy], dim=-1)


def chunked_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor,
    temperature: float = 1.0,
    chunk_tokens: int = 1024,
    with_entropy: bool = False,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs (and entropies) of ``labels`` from the LM head's input, ``chunk_tokens`` at a time.

    Only positions where ``mask`` is set are projected (padding costs nothing). Under autograd each
    chunk is checkpointed: its logits are freed after the forward and recomputed in backward.

    Args:
        hidden: (N, T, H) the hidden states that predict ``labels`` (the LM head's input).
        weight: (V, H) the LM head's weight; bias: (V,) or None.
        labels: (N, T) token ids.
        mask: (N, T) 0/1; positions to score.
        temperature: logits are divided by it.
        chunk_tokens: scored positions per chunk (peak logits: chunk_tokens x V fp32).
        with_entropy: also return the entropy of each predictive distribution.
    Returns:
        logprobs (N, T) float32, 0 where ``mask`` is 0; entropy (N, T) float32 or None.
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    N, T, H = hidden.shape
    where = mask.reshape(-1).nonzero().squeeze(1)
    states = hidden.reshape(N * T, H).index_select(0, where)
    targets = labels.reshape(-1).index_select(0, where)
    width = 2 if with_entropy else 1
    use_checkpoint = torch.is_grad_enabled() and (states.requires_grad or weight.requires_grad)
    pieces = []
    for start in range(0, targets.numel(), chunk_tokens):
        args = (states[start : start + chunk_tokens], weight, bias, targets[start : start + chunk_tokens],
                temperature, with_entropy)
        pieces.append(checkpoint(_head_chunk, *args, use_reentrant=False) if use_checkpoint else _head_chunk(*args))
    values = torch.cat(pieces) if pieces else hidden.new_zeros(0, width, dtype=torch.float32)
    out = values.new_zeros(N * T, width).index_copy(0, where, values).view(N, T, width)
    return out[..., 0], (out[..., 1] if with_entropy else None)
