"""Batch assembly. Pure functions: no tokenizer, no I/O."""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["left_pad", "collate_prompts"]


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """LEFT-pad token id lists to the longest one.

    Returns (ids, mask), both LongTensor (B, P); mask is 1 on real tokens, 0 on padding.
    """
    if len(seqs) == 0:
        raise ValueError("left_pad got an empty batch")
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s) == 0:
            raise ValueError(f"row {i} of the batch is an empty sequence")
        ids[i, width - len(s):] = torch.as_tensor(list(s), dtype=torch.long)
        mask[i, width - len(s):] = 1
    return ids, mask


def collate_prompts(items: Sequence[dict], pad_token_id: int, context_ids: Sequence[int]) -> dict:
    """Items ``{"prompt_ids": list[int], "problem": dict}`` -> a batch dict:

    prompt_ids  LongTensor (B, P), left-padded with ``pad_token_id``
    prompt_mask LongTensor (B, P), 1 for real tokens
    context_ids LongTensor (B, C), the marginal context repeated per row
    problems    list[dict] of length B
    """
    prompt_ids, prompt_mask = left_pad([it["prompt_ids"] for it in items], pad_token_id)
    ctx = torch.as_tensor(list(context_ids), dtype=torch.long).unsqueeze(0).expand(len(items), -1).clone()
    return {
        "prompt_ids": prompt_ids,
        "prompt_mask": prompt_mask,
        "context_ids": ctx,
        "problems": [it["problem"] for it in items],
    }
