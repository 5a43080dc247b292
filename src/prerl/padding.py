"""Padding layouts shared by the rollout engines: left-padded prompts in, right-padded responses out.

Prompts arrive left-padded (so the last column is every prompt's last token); every engine returns
responses right-padded with the pad id after the first end token, with a mask through that token
and a truncated flag (:class:`prerl.engines.base.Generation`). Pure tensor functions.
"""

from __future__ import annotations

from typing import Sequence

import torch


def unpad_prompts(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> list[list[int]]:
    """The prompt tokens without their padding.

    Args:
        prompt_ids, prompt_mask: (B, P) left-padded prompts.
    Returns:
        B token lists, prompt b of length ``prompt_mask[b].sum()``.
    """
    return [row[mask.bool()].tolist() for row, mask in zip(prompt_ids, prompt_mask)]


def trim_left_padding(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the columns that are padding in every row.

    Args:
        prompt_ids, prompt_mask: (B, P) left-padded prompts.
    Returns:
        prompt_ids, prompt_mask: (B, W), W = the longest prompt's length.
    """
    width = int(prompt_mask.sum(dim=1).max())
    return prompt_ids[:, prompt_ids.shape[1] - width :], prompt_mask[:, prompt_mask.shape[1] - width :]


def response_mask_from_ids(
    response_ids: torch.Tensor, eos_token_ids: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask each response through its first end token.

    Args:
        response_ids: (N, T) generated ids (whatever follows the first end token is padding).
        eos_token_ids: ids that end a response.
    Returns:
        mask: (N, T) long, 1 up to and including the first end token (all 1 if none).
        truncated: (N,) bool, True where no end token was generated.
    """
    is_eos = torch.isin(response_ids, torch.tensor(list(eos_token_ids), device=response_ids.device))
    seen_before = (is_eos.long().cumsum(dim=1) - is_eos.long()) > 0
    mask = (~seen_before).long()
    truncated = ~is_eos.any(dim=1)
    return mask, truncated


def end_at_first_eos(
    response_ids: torch.Tensor, eos_token_ids: Sequence[int], pad_token_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The engines' response layout from raw generated ids.

    Args:
        response_ids: (N, T) generated ids, anything after the first end token.
    Returns:
        response_ids: (N, T) with ``pad_token_id`` after the first end token.
        response_mask: (N, T) long, 1 through the first end token (all 1 if none).
        truncated: (N,) bool, no end token.
    """
    mask, truncated = response_mask_from_ids(response_ids, eos_token_ids)
    return response_ids.masked_fill(mask == 0, pad_token_id), mask, truncated


def right_pad(rows: Sequence[Sequence[float]], value: float, dtype: torch.dtype) -> torch.Tensor:
    """Stack lists of different lengths.

    Args:
        rows: N sequences of numbers.
    Returns:
        (N, max(1, longest)) tensor of ``dtype``, row i's numbers first, then ``value``.
    """
    out = torch.full((len(rows), max(1, max((len(r) for r in rows), default=0))), value, dtype=dtype)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(list(row), dtype=dtype)
    return out


def responses_from_lists(
    token_lists: Sequence[Sequence[int]], eos_token_ids: Sequence[int], pad_token_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The engines' response layout from per-row token lists (an engine that returns lists).

    Args:
        token_lists: N responses of any lengths (tokens after a first end token are dropped).
    Returns:
        response_ids: (N, T) right-padded with ``pad_token_id`` after each row's first end token
            or its last token, T = max(1, the longest response through its first end token).
        response_mask: (N, T) long, 1 on the response's tokens.
        truncated: (N,) bool, no end token.
    """
    ids = right_pad(token_lists, pad_token_id, torch.long)
    mask, truncated = response_mask_from_ids(ids, eos_token_ids)
    lengths = torch.tensor([len(tokens) for tokens in token_lists], dtype=torch.long)
    mask = mask * (torch.arange(ids.shape[1]) < lengths[:, None])
    width = max(1, int(mask.sum(dim=1).max()))
    return ids.masked_fill(mask == 0, pad_token_id)[:, :width], mask[:, :width], truncated


def cat_right_padded(pieces: Sequence[Sequence[torch.Tensor]], pad_values: Sequence[float]) -> tuple[torch.Tensor, ...]:
    """Concatenate batches whose (N_i, T_i) tensors differ in T_i, right-padding to the longest.

    Args:
        pieces: per batch, a tuple of tensors with rows first: (N_i, T_i) ones are padded, 1-D
            ones (e.g. truncated flags, (N_i,)) are concatenated as they are.
        pad_values: the padding value of each tuple position (ignored for 1-D tensors).
    Returns:
        one tensor per tuple position, (sum N_i, max T_i) or (sum N_i,).
    """
    if len(pieces) == 1:
        return tuple(pieces[0])
    length = max(t.shape[1] for piece in pieces for t in piece if t.dim() == 2)
    pad = lambda t, v: t if t.dim() == 1 else torch.nn.functional.pad(t, (0, length - t.shape[1]), value=v)  # noqa: E731
    return tuple(torch.cat([pad(piece[k], v) for piece in pieces]) for k, v in enumerate(pad_values))


def grouped_rows(prompt_order: torch.Tensor, num_samples: int) -> torch.Tensor:
    """Where each row of the batch's order lies in rows generated in ``prompt_order``.

    Args:
        prompt_order: (B,) a permutation: position i was generated for prompt ``prompt_order[i]``,
            each prompt's ``num_samples`` rows together.
    Returns:
        (B * num_samples,) indices into the generated rows: row g of prompt p (at p * G + g in the
        batch's order) is at ``inverse[p] * G + g``.
    """
    inverse = torch.empty_like(prompt_order)
    inverse[prompt_order] = torch.arange(len(prompt_order), device=prompt_order.device)
    return (inverse.repeat_interleave(num_samples) * num_samples
            + torch.arange(num_samples, device=prompt_order.device).repeat(len(prompt_order)))
