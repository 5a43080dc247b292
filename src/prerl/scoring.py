"""Log-prob scoring of responses after a prefix: the prompt (conditional, P(y|x)) or the
question-free context (marginal, P(y)).

Both spaces share one layout: a left-padded prefix followed by a right-padded response.
Position ids count real tokens only, so a prefix-free row starts at position 0 and a
left-padded prompt is positioned as if it were unpadded.

With ``chunk_tokens`` the LM head is swapped, for the duration of one forward, for a head that
turns its input straight into log-probs chunk by chunk (``chunked_token_logprobs``), so the model's
"logits" output is (N, T+1, 1 or 2) instead of (N, T+1, V). The swap happens inside the model's
own forward, so FSDP gathers the head's (possibly sharded) weight and hooks its output as usual.
"""

from __future__ import annotations

import contextlib

import torch

from prerl.algorithms import chunked_token_logprobs, entropy_from_logits, summarize_logits, token_logprobs
from prerl.models.params import unwrap_policy


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


def check_chunkable(policy: torch.nn.Module) -> None:
    """Raise if the policy's logits are not a plain linear map of the head's input (then the
    chunked path would score something else than the model's distribution)."""
    model = unwrap_policy(policy)
    head = model.get_output_embeddings()
    if type(head) is not torch.nn.Linear:
        raise ValueError(
            f"module.update.logprob_chunk_tokens needs a plain nn.Linear LM head, this model has "
            f"{type(head).__name__}; set module.update.logprob_chunk_tokens=null"
        )
    for key in ("final_logit_softcapping", "logit_scale", "output_multiplier_scale"):
        if getattr(model.config, key, None) not in (None, 1.0):
            raise ValueError(
                f"the model post-processes its logits ({key}={getattr(model.config, key)}); "
                "set module.update.logprob_chunk_tokens=null"
            )


@contextlib.contextmanager
def _chunked_head(policy, labels, mask, temperature: float, chunk_tokens: int, with_entropy: bool):
    """Swap the LM head's forward for one that returns (N, T+1, 1|2) log-probs [and entropies]."""
    head = unwrap_policy(policy).get_output_embeddings()
    had_own = "forward" in head.__dict__
    previous = head.__dict__.get("forward")

    def forward(hidden: torch.Tensor) -> torch.Tensor:
        # hidden (N, T+1, H): positions P-1 .. P+T-1 predict the T response tokens; the last
        # position predicts past the response and is not scored.
        logprobs, entropy = chunked_token_logprobs(
            hidden[:, :-1], head.weight, labels, mask, temperature, chunk_tokens, with_entropy, head.bias
        )
        values = logprobs.unsqueeze(-1) if entropy is None else torch.stack([logprobs, entropy], dim=-1)
        return torch.nn.functional.pad(values, (0, 0, 0, 1))

    head.forward = forward
    try:
        yield
    finally:
        if had_own:
            head.forward = previous
        else:
            del head.forward


def score_responses(
    policy,
    prefix_ids: torch.Tensor,
    prefix_mask: torch.Tensor,
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
    temperature: float = 1.0,
    with_entropy: bool = False,
    chunk_tokens: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log-probs (and entropies) of the response tokens given the prefix.

    Only the logits that predict response tokens are computed (``logits_to_keep``), so the
    vocabulary projection never runs over prefix positions; with ``chunk_tokens`` only over real
    (unpadded) response tokens, ``chunk_tokens`` at a time.

    Args:
        policy: a Hugging Face causal LM (or a peft / FSDP wrapper of one).
        prefix_ids, prefix_mask: (N, P) left-padded; P >= 1.
        response_ids, response_mask: (N, T) right-padded.
        temperature: logits are divided by it (the sampling temperature).
        with_entropy: also return the entropy of each predictive distribution.
        chunk_tokens: None: one (N, T, V) logits tensor; else the memory-light chunked head.
    Returns:
        logprobs (N, T) float32 (0 where response_mask is 0), entropy (N, T) float32 or None.
    """
    if prefix_ids.shape[1] < 1:
        raise ValueError("the prefix needs at least one token to predict the first response token")
    input_ids, attention_mask, position_ids = join_prefix_response(
        prefix_ids, prefix_mask, response_ids, response_mask
    )
    inputs = dict(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=False,
        logits_to_keep=response_ids.shape[1] + 1,
    )
    if chunk_tokens:
        with _chunked_head(policy, response_ids, response_mask, temperature, chunk_tokens, with_entropy):
            values = policy(**inputs).logits[:, :-1].float()
        return values[..., 0], (values[..., 1] if with_entropy else None)
    logits = policy(**inputs).logits[:, :-1]
    logprobs = token_logprobs(logits, response_ids, temperature) * response_mask
    entropy = entropy_from_logits(logits, temperature) * response_mask if with_entropy else None
    return logprobs, entropy


@torch.no_grad()
def score_and_summarize(
    policy,
    prefix_ids: torch.Tensor,
    prefix_mask: torch.Tensor,
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
    stop_ids: list[int],
    temperature: float = 1.0,
    chunk_tokens: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``score_responses`` with entropies, plus each position's top-1/2/3 probabilities and
    probability of ending the response (``summarize_logits``), from the same no-grad forward.

    Returns:
        logprobs (N, T), entropy (N, T), summary (N, T, 4), float32, 0 where response_mask is 0.
    """
    input_ids, attention_mask, position_ids = join_prefix_response(prefix_ids, prefix_mask, response_ids, response_mask)
    inputs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
                  logits_to_keep=response_ids.shape[1] + 1)
    if not chunk_tokens:
        values = summarize_logits(policy(**inputs).logits[:, :-1], response_ids, stop_ids, temperature)
        values = values * response_mask.unsqueeze(-1)
        return values[..., 0], values[..., 1], values[..., 2:]
    head = unwrap_policy(policy).get_output_embeddings()
    had_own, previous = "forward" in head.__dict__, head.__dict__.get("forward")

    def forward(hidden: torch.Tensor) -> torch.Tensor:
        # As _chunked_head: only the real response positions are projected, chunk_tokens at a time.
        n, t, h = hidden[:, :-1].shape
        where = response_mask.reshape(-1).nonzero().squeeze(1)
        states = hidden[:, :-1].reshape(n * t, h).index_select(0, where)
        targets = response_ids.reshape(-1).index_select(0, where)
        pieces = [
            summarize_logits(torch.nn.functional.linear(states[i : i + chunk_tokens], head.weight, head.bias),
                             targets[i : i + chunk_tokens], stop_ids, temperature)
            for i in range(0, targets.numel(), chunk_tokens)
        ]
        values = torch.cat(pieces) if pieces else hidden.new_zeros(0, 6, dtype=torch.float32)
        out = values.new_zeros(n * t, 6).index_copy(0, where, values).view(n, t, 6)
        return torch.nn.functional.pad(out, (0, 0, 0, 1))

    head.forward = forward
    try:
        values = policy(**inputs).logits[:, :-1].float()
    finally:
        if had_own:
            head.forward = previous
        else:
            del head.forward
    return values[..., 0], values[..., 1], values[..., 2:]
