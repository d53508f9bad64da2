"""The learner's micro-batching: rows sorted by length, each micro-batch cut to its longest row."""

from __future__ import annotations

import torch

from rlhf.learner.rank import micro_batches
from rlhf.types import TrainBatch


def test_micro_batches_sort_by_length_and_drop_padding():
    # Lengths 2, 5, 3, 4 (right-padded to 5). Sorted longest first: rows 1 (5), 3 (4), 2 (3), 0 (2).
    lengths = [2, 5, 3, 4]
    mask = torch.tensor([[1] * n + [0] * (5 - n) for n in lengths])
    batch = TrainBatch(input_ids=torch.arange(20).view(4, 5), attention_mask=mask,
                       response_mask=mask.float(), advantages=torch.tensor([0.0, 1.0, 2.0, 3.0]),
                       old_logprobs=torch.zeros(4, 5), sample_weight=torch.ones(4))
    parts = micro_batches(batch, 2)
    assert [rows.tolist() for rows, _ in parts] == [[1, 3], [2, 0]]
    # First micro-batch keeps 5 positions, the second only 3: its longest row has 3 tokens.
    assert [mb.input_ids.shape[1] for _, mb in parts] == [5, 3]
    assert parts[1][1].input_ids.tolist() == [[10, 11, 12], [0, 1, 2]]
    assert parts[1][1].old_logprobs.shape == (2, 3)
    assert parts[1][1].advantages.tolist() == [2.0, 0.0]
    # Every real token survives the cut.
    assert sum(int(mb.attention_mask.sum()) for _, mb in parts) == sum(lengths)
