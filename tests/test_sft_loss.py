"""The SFT loss (rlhf/algo/sft.py) by hand: masked tokens do not count, micro-batches add up."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf.algo import normalisers
from rlhf.algo.sft import sft_loss


def test_only_completion_tokens_count():
    # Row 0: prompt at t=0,1 (masked), completion log-probs log(1/2), log(1/4) at t=2,3.
    # Row 1: prompt at t=0, completion log(1/8) at t=1, padding at t=2,3 (masked).
    # Masked positions hold huge values: if they leaked in, the loss would be off by ~1e3.
    logprobs = torch.tensor([[0.0, -1000.0, math.log(1 / 2), math.log(1 / 4)],
                             [0.0, math.log(1 / 8), -1000.0, -1000.0]])
    mask = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 1.0, 0.0, 0.0]])
    # 3 completion tokens: (ln 2 + ln 4 + ln 8) / 3 = (1 + 2 + 3) ln 2 / 3 = 2 ln 2
    loss = sft_loss(logprobs, mask, total_tokens=3.0)
    assert loss.item() == pytest.approx(2 * math.log(2), abs=1e-6)


def test_micro_batches_sum_to_the_whole_batch_loss_and_gradient():
    torch.manual_seed(0)
    logits = torch.randn(4, 6, requires_grad=True)
    logprobs = torch.log_softmax(logits, dim=-1)  # stands in for token log-probs [B=4, L=6]
    mask = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 1, 1, 0, 0, 0],
                         [0, 0, 0, 0, 1, 1], [0, 1, 1, 1, 1, 1]], dtype=torch.float32)
    total, _ = normalisers(mask)  # 3 + 2 + 2 + 5 = 12 tokens
    assert total == 12.0

    whole = sft_loss(logprobs, mask, total_tokens=total)
    (g_whole,) = torch.autograd.grad(whole, logits, retain_graph=True)
    # Uneven micro-batches (1 row, then 3): each divides by the batch's 12 tokens, not its own.
    parts = [sft_loss(logprobs[s], mask[s], total_tokens=total) for s in (slice(0, 1), slice(1, 4))]
    (g_parts,) = torch.autograd.grad(sum(parts), logits)
    assert sum(parts).item() == pytest.approx(whole.item(), abs=1e-6)
    torch.testing.assert_close(g_parts, g_whole, atol=1e-7, rtol=0)
    # ... and it is the plain token mean of -logprobs over the 12 masked tokens.
    expected = -(logprobs * mask).sum() / 12
    assert whole.item() == pytest.approx(expected.item(), abs=1e-6)
    # Averaging per micro-batch instead (each over its own tokens) would differ: row 0 alone.
    own_mean = -(logprobs[0] * mask[0]).sum() / 3
    assert parts[0].item() == pytest.approx(own_mean.item() * 3 / 12, abs=1e-6)


def test_shape_mismatch_names_the_mask():
    with pytest.raises(ValueError, match=r"response_mask has shape \(2, 3\), expected \(2, 4\)"):
        sft_loss(torch.zeros(2, 4), torch.ones(2, 3), total_tokens=6.0)
    with pytest.raises(ValueError, match=r"total_tokens=0.0 must be > 0"):
        sft_loss(torch.zeros(2, 4), torch.zeros(2, 4), total_tokens=0.0)
