"""Splitting an update batch into micro-batches: by row count, or packed under a token budget.

A micro-batch costs rows x (its longest prefix + its longest response) padded tokens, so rows are
sorted by length first: neighbours have similar lengths and little padding. With a token budget
(verl's dynamic batch size) they are then packed greedily, so an 8k-token response and a 50-token
one never share a padded micro-batch. The split never changes the update: losses are normalised
by the counts of the whole mini-batch (see ``aggregate``).
"""

from __future__ import annotations

import torch


def micro_batch_indices(
    prefix_lengths: torch.Tensor,
    response_lengths: torch.Tensor,
    max_rows: int,
    max_tokens: int | None = None,
) -> list[torch.Tensor]:
    """Row indices of each micro-batch.

    Args:
        prefix_lengths, response_lengths: (M,) real tokens of each row's prefix and response.
        max_rows: at most this many rows per micro-batch.
        max_tokens: None splits the sorted rows every ``max_rows`` rows; else each micro-batch
            holds at most this many padded tokens (a row longer than the budget is alone in its
            micro-batch).
    Rows are sorted from the longest response down (ties: the longest prefix first).
    Returns:
        a list of (m_i,) long tensors that together cover every row exactly once.
    """
    if max_rows < 1:
        raise ValueError(f"max_rows must be >= 1, got {max_rows}")
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1 or None, got {max_tokens}")
    rows = response_lengths.shape[0]
    device = response_lengths.device
    # Longest responses first, so each micro-batch's padded width is set by its first row.
    order = sorted(range(rows), key=lambda i: (-int(response_lengths[i]), -int(prefix_lengths[i])))
    if max_tokens is None:
        return [torch.tensor(order[s : s + max_rows], dtype=torch.long, device=device) for s in range(0, rows, max_rows)]
    groups: list[list[int]] = []
    width_p = width_r = 0
    for i in order:
        p, r = int(prefix_lengths[i]), int(response_lengths[i])
        if groups and len(groups[-1]) < max_rows:
            wp, wr = max(width_p, p), max(width_r, r)
            if (len(groups[-1]) + 1) * (wp + wr) <= max_tokens:
                groups[-1].append(i)
                width_p, width_r = wp, wr
                continue
        groups.append([i])
        width_p, width_r = p, r
    return [torch.tensor(g, dtype=torch.long, device=device) for g in groups]
