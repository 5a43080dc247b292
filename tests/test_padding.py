"""The shared padding layouts of the engines (prerl.padding)."""

import torch

from prerl.padding import (
    cat_right_padded,
    end_at_first_eos,
    grouped_rows,
    responses_from_lists,
    trim_left_padding,
    unpad_prompts,
)

PAD, EOS = 0, 2


def test_prompts_lose_only_their_padding():
    ids = torch.tensor([[0, 0, 5, 6], [0, 7, 8, 9], [0, 0, 0, 4]])
    mask = (ids != 0).long()
    assert unpad_prompts(ids, mask) == [[5, 6], [7, 8, 9], [4]]
    trimmed, trimmed_mask = trim_left_padding(ids, mask)
    assert torch.equal(trimmed, ids[:, 1:]) and torch.equal(trimmed_mask, mask[:, 1:])


def test_lists_and_generated_ids_give_the_same_layout():
    """A list engine (vLLM, the refill loop) and ``generate`` (rows run on after their end token)
    produce the same tensors."""
    lists = [[5, EOS], [3, 4, 6], [7, EOS, 9]]  # ended; truncated at 3; tokens after an end token
    generated = torch.tensor([[5, EOS, 8], [3, 4, 6], [7, EOS, 9]])
    a = responses_from_lists(lists, [EOS], PAD)
    b = end_at_first_eos(generated, [EOS], PAD)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert a[0].tolist() == [[5, EOS, PAD], [3, 4, 6], [7, EOS, PAD]]
    assert a[2].tolist() == [False, True, False]
    # a short row without an end token (stopped for another reason) is masked to its length only
    ids, mask, truncated = responses_from_lists([[5], [3, EOS]], [EOS], PAD)
    assert mask.tolist() == [[1, 0], [1, 1]] and truncated.tolist() == [True, False]


def test_batches_of_different_widths_concatenate_and_unsort():
    a = (torch.tensor([[1, 2]]), torch.tensor([[1, 1]]), torch.tensor([True]))
    b = (torch.tensor([[3, EOS, PAD], [4, 5, EOS]]), torch.tensor([[1, 1, 0], [1, 1, 1]]), torch.tensor([False, False]))
    ids, mask, truncated = cat_right_padded([a, b], (PAD, 0, False))
    assert ids.tolist() == [[1, 2, PAD], [3, EOS, PAD], [4, 5, EOS]] and mask[0].tolist() == [1, 1, 0]
    assert truncated.tolist() == [True, False, False]
    # prompts generated in the order (2, 0, 1), 2 rows each: rows back in the batch's order
    generated = torch.tensor([20, 21, 0, 1, 10, 11])
    assert generated[grouped_rows(torch.tensor([2, 0, 1]), 2)].tolist() == [0, 1, 10, 11, 20, 21]
