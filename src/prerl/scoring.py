"""Log-prob scoring of responses after a prefix: the prompt (conditional, P(y|x)) or the
question-free context (marginal, P(y)).

Both spaces share one layout: a left-padded prefix followed by a right-padded response.
Position ids count real tokens only, so a prefix-free row starts at position 0 and a
left-padded prompt is positioned as if it were unpadded.
"""

from __future__ import annotations

import torch

from prerl.algorithms import entropy_from_logits, token_logprobs


def join_prefix_response(
    prefix_ids: torch.Tensor,
    prefix_mask: torch.Tensor,
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Concatenate a left-padded prefix and a right-padded response into model inputs.

    Args:
        prefix_ids, prefix_mask: (N, P) left-padded.
        response_ids, response_mask: (N, T) right-padded.
    Returns:
        input_ids (N, P+T), attention_mask (N, P+T), position_ids (N, P+T) counting from 0 at
        each row's first real token.
    """
    input_ids = torch.cat([prefix_ids, response_ids], dim=1)
    attention_mask = torch.cat([prefix_mask, response_mask], dim=1).long()
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    return input_ids, attention_mask, position_ids


def score_responses(
    policy,
    prefix_ids: torch.Tensor,
    prefix_mask: torch.Tensor,
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
    temperature: float = 1.0,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log-probs (and entropies) of the response tokens given the prefix.

    Only the logits that predict response tokens are materialised (``logits_to_keep``), so the
    vocabulary projection never runs over prefix positions.

    Args:
        policy: a Hugging Face causal LM (or a peft / FSDP wrapper of one).
        prefix_ids, prefix_mask: (N, P) left-padded; P >= 1.
        response_ids, response_mask: (N, T) right-padded.
        temperature: logits are divided by it (the sampling temperature).
        with_entropy: also return the entropy of each predictive distribution.
    Returns:
        logprobs (N, T) float32 (0 where response_mask is 0), entropy (N, T) float32 or None.
    """
    if prefix_ids.shape[1] < 1:
        raise ValueError("the prefix needs at least one token to predict the first response token")
    input_ids, attention_mask, position_ids = join_prefix_response(
        prefix_ids, prefix_mask, response_ids, response_mask
    )
    num_response = response_ids.shape[1]
    out = policy(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=False,
        logits_to_keep=num_response + 1,
    )
    logits = out.logits[:, :-1]
    logprobs = token_logprobs(logits, response_ids, temperature) * response_mask
    entropy = entropy_from_logits(logits, temperature) * response_mask if with_entropy else None
    return logprobs, entropy
