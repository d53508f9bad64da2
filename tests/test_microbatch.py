"""The learner's unshared micro-batching: rows sorted by length, each micro-batch cut to its longest row
(shared prompts and token budgets: tests/test_shared_prompt.py)."""

from __future__ import annotations

import torch

from rlhf.learner.packing import micro_batches
from rlhf.types import TrainBatch


def test_micro_batches_sort_by_length_and_drop_padding():
    # Lengths 2, 5, 3, 4 (right-padded to 5). Sorted longest first: rows 1 (5), 3 (4), 2 (3), 0 (2).
    lengths = [2, 5, 3, 4]
    mask = torch.tensor([[1] * n + [0] * (5 - n) for n in lengths])
    batch = TrainBatch(input_ids=torch.arange(20).view(4, 5), attention_mask=mask,
                       response_mask=mask.float(), advantages=torch.tensor([0.0, 1.0, 2.0, 3.0]),
                       old_logprobs=torch.zeros(4, 5), sample_weight=torch.ones(4))
    parts = micro_batches(batch, 2)
    assert [mb.rows.tolist() for mb in parts] == [[1, 3], [2, 0]]
    assert not any(mb.shared for mb in parts)
    # First micro-batch runs 5 positions, the second only 3: its longest row has 3 tokens.
    assert [mb.input_ids.shape[1] for mb in parts] == [5, 3]
    assert parts[1].input_ids.tolist() == [[10, 11, 12], [0, 1, 2]]
    # Every row is completion from position 0, so the losses read every position (keep_from 0).
    assert parts[1].keep_from == 0 and parts[1].view.old_logprobs.shape == (2, 3)
    assert parts[1].view.advantages.tolist() == [2.0, 0.0]
    assert parts[1].cols.tolist() == [[0, 1, 2], [0, 1, 2]]
    # Every real token survives the cut.
    assert sum(int(mb.attention_mask.sum()) for mb in parts) == sum(lengths)


def _prompted(prompt_lengths: list[int], total: int) -> TrainBatch:
    """Rows of ``total`` tokens whose completions start at the given positions."""
    pos = torch.arange(total)[None, :]
    response = (pos >= torch.tensor(prompt_lengths)[:, None]).float()
    n = len(prompt_lengths)
    return TrainBatch(input_ids=torch.arange(n * total).view(n, total),
                      attention_mask=torch.ones(n, total, dtype=torch.long), response_mask=response,
                      advantages=torch.zeros(n), old_logprobs=torch.zeros(n, total))


def test_loss_start_is_the_position_predicting_the_earliest_completion_token():
    # Completions start at 4 and 6: logits at position 3 predict token 4, so 3 is the first read.
    assert _prompted([6, 4], total=8).loss_start() == 3
    # A completion from position 1 needs the logits of position 0.
    assert _prompted([1, 5], total=8).loss_start() == 0


def test_loss_start_is_zero_when_a_row_has_no_completion_token():
    batch = _prompted([3, 8], total=8)  # row 1's completion would start past its last position
    assert batch.loss_start() == 0


def test_tail_drops_the_prefix_of_per_token_fields_only():
    tail = _prompted([6, 4], total=8).tail(3)
    assert tail.input_ids.tolist() == [[3, 4, 5, 6, 7], [11, 12, 13, 14, 15]]
    assert tail.response_mask.tolist() == [[0, 0, 0, 1, 1], [0, 1, 1, 1, 1]]
    assert tail.old_logprobs.shape == (2, 5) and tail.advantages.shape == (2,)
