"""Sampling in which finished rows stop costing (``hf`` engine, ``engine_options.refill: true``).

``generate`` decodes every row of a call until the longest one ends: with RL's length mix (most
responses short, a few run to ``max_new_tokens``) most decoded row-steps are padding. Here a row
leaves the batch as soon as it ends, and the next pending (prompt, sample) row takes its place:
its prompt is prefilled on its own and its KV cache joins the running batch, left-padded to the
batch's cache length (the mask hides the padding, position ids are the row's own), as ``generate``
itself lays out left-padded prompts. At most ``max_rows`` rows decode at once (the KV cache's
memory knob, as ``generation_batch_size`` is for ``generate``).

Sampling is ``generate``'s: float32 logits of the last position, the same warpers (temperature,
top-k, top-p) under the same conditions, softmax and ``torch.multinomial`` on torch's default
generator (argmax when greedy). Only the order in which random numbers are drawn differs.

transformers' own continuous batching (``generate_batch``) was tried first: see docs/engines.md.
"""

from __future__ import annotations

from collections import deque
from typing import Sequence

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer
from transformers.generation import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper
from transformers.modeling_outputs import CausalLMOutputWithPast

from prerl.padding import trim_left_padding

# transformers 5.20 renamed ``past_key_values`` to ``cache`` (forward argument and output); vLLM's
# environment (scripts/setup_vllm.sh) pins transformers < 5.20.
_CACHE = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def sampling_warpers(temperature: float, top_p: float, top_k: int) -> LogitsProcessorList:
    """The logits warpers ``generate`` applies for these settings (in its order)."""
    warpers = LogitsProcessorList()
    if temperature > 0 and temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(temperature))
    if temperature > 0 and top_k:
        warpers.append(TopKLogitsWarper(top_k=top_k))
    if temperature > 0 and top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p=top_p))
    return warpers


def _left_pad(t: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    """Zeros prepended along ``dim`` up to ``length``."""
    missing = length - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)


class _Batch:
    """The rows decoding together: their KV cache (B, heads, L, head_dim) per layer, mask (B, L),
    the position of each row's next input token (B,) and the logits of its next token (B, V)."""

    def __init__(self, rows: list[int], cache: DynamicCache, mask: torch.Tensor, positions: torch.Tensor,
                 logits: torch.Tensor):
        for layer in cache.layers:
            if type(layer) is not DynamicLayer:  # sliding-window / quantized layers keep other state
                raise ValueError(f"engine_options.refill needs a full-attention dynamic KV cache, not {type(layer).__name__}")
        self.rows, self.cache, self.mask, self.positions, self.logits = rows, cache, mask, positions, logits

    def keep(self, keep: torch.Tensor) -> None:
        """Keep the rows where ``keep`` (B,) is True, and drop cache columns no kept row attends to."""
        self.rows = [r for r, k in zip(self.rows, keep.tolist()) if k]
        index = keep.nonzero().squeeze(1)
        used = self.mask[index].any(dim=0).nonzero()
        start = int(used[0]) if len(used) else self.mask.shape[1]
        self.mask = self.mask[index, start:]
        self.positions, self.logits = self.positions[index], self.logits[index]
        for layer in self.cache.layers:
            layer.keys = layer.keys[index, :, start:]
            layer.values = layer.values[index, :, start:]

    def join(self, other: "_Batch") -> None:
        """Append ``other``'s rows, both caches left-padded to the longer one."""
        length = max(self.mask.shape[1], other.mask.shape[1])
        self.mask = torch.cat([_left_pad(self.mask, length, 1), _left_pad(other.mask, length, 1)])
        self.rows += other.rows
        self.positions = torch.cat([self.positions, other.positions])
        self.logits = torch.cat([self.logits, other.logits])
        for mine, theirs in zip(self.cache.layers, other.cache.layers):
            mine.keys = torch.cat([_left_pad(mine.keys, length, 2), _left_pad(theirs.keys, length, 2)])
            mine.values = torch.cat([_left_pad(mine.values, length, 2), _left_pad(theirs.values, length, 2)])


@torch.no_grad()
def refill_generate(
    model,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    num_samples: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    top_k: int,
    eos_token_ids: Sequence[int],
    max_rows: int,
    order: torch.Tensor | None = None,
) -> tuple[list[list[int]], list[list[float]]]:
    """Sample ``num_samples`` responses per prompt, at most ``max_rows`` rows decoding at once.

    Args:
        model: a Hugging Face causal LM (or peft wrapper) in eval mode.
        prompt_ids, prompt_mask: (B, P) left-padded prompts.
        temperature: 0 means greedy; top_k 0 and top_p 1 are off (as in ``prerl.rollout.generate``).
        order: (B,) the order in which prompts start (default: the batch's).
    Returns:
        tokens: B * num_samples token lists, rows grouped by prompt in the batch's order; each
            ends with its first end token or has ``max_new_tokens`` tokens.
        logprobs: the log-probs of those tokens under the distribution they were drawn from
            (softmax of the warped float32 logits; of the raw logits when greedy).
    """
    order = torch.arange(len(prompt_ids)) if order is None else order.cpu()
    pending = deque(int(p) * num_samples + g for p in order for g in range(num_samples))
    tokens: list[list[int]] = [[] for _ in range(len(prompt_ids) * num_samples)]
    logprobs: list[list[float]] = [[] for _ in tokens]
    warpers = sampling_warpers(temperature, top_p, top_k)
    eos = torch.tensor(list(eos_token_ids), device=prompt_ids.device)
    batch: _Batch | None = None
    while pending or batch is not None:
        free = max_rows - (len(batch.rows) if batch is not None else 0)
        if pending and free > 0:
            newcomers = [pending.popleft() for _ in range(min(free, len(pending)))]
            prompts = torch.tensor([r // num_samples for r in newcomers], device=prompt_ids.device)
            ids, mask = trim_left_padding(prompt_ids[prompts], prompt_mask[prompts])
            # generate's position ids: padding at 0, the prompt at 0..n-1
            positions = (mask.cumsum(dim=1) - 1).masked_fill(mask == 0, 0)
            out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
            joining = _Batch(newcomers, out[_CACHE], mask, positions[:, -1] + 1, out.logits[:, -1].float())
            if batch is None:
                batch = joining
            else:
                batch.join(joining)
        scores = warpers(None, batch.logits) if warpers else batch.logits
        probs = torch.softmax(scores, dim=-1)
        next_tokens = torch.multinomial(probs, num_samples=1).squeeze(1) if temperature > 0 else scores.argmax(dim=-1)
        drawn = probs.gather(1, next_tokens[:, None]).squeeze(1).log()
        for row, token, logprob in zip(batch.rows, next_tokens.tolist(), drawn.tolist()):
            tokens[row].append(token)
            logprobs[row].append(logprob)
        lengths = torch.tensor([len(tokens[r]) for r in batch.rows], device=next_tokens.device)
        going = ~torch.isin(next_tokens, eos) & (lengths < max_new_tokens)
        if not bool(going.all()):
            batch.keep(going)
            next_tokens = next_tokens[going]
            if not batch.rows:
                batch = None
                continue
        batch.mask = torch.cat([batch.mask, batch.mask.new_ones(len(batch.rows), 1)], dim=1)
        out = model(input_ids=next_tokens[:, None], attention_mask=batch.mask, position_ids=batch.positions[:, None],
                    use_cache=True, logits_to_keep=1, **{_CACHE: batch.cache})
        batch.logits = out.logits[:, -1].float()
        batch.positions = batch.positions + 1
    return tokens, logprobs
