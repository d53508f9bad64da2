"""Loss aggregation: values by hand, sequence weights, and micro-batch/whole-batch equivalence."""

import pytest
import torch

from rlhf.algo import AGGREGATIONS, POLICY_LOSSES, aggregate, normalisers

MODES = ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"]
LOSS = torch.tensor([[1.0, 2.0, 3.0, 0.0], [4.0, 0.0, 0.0, 0.0]])
MASK = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])


def test_registry_holds_the_three_modes():
    assert AGGREGATIONS.names() == sorted(MODES)


@pytest.mark.parametrize(
    "mode, expected",
    [
        ("token_mean", 2.5),  # (1 + 2 + 3 + 4) / 4 tokens
        ("seq_mean_token_mean", 3.0),  # (6/3 + 4/1) / 2 sequences
        ("seq_mean_token_sum_norm", 1.25),  # (6/4 + 4/4) / 2 with norm_length 4
    ],
)
def test_modes_by_hand(mode, expected):
    tokens, seqs = normalisers(MASK)
    assert (tokens, seqs) == (4.0, 2.0)
    out = aggregate(mode, LOSS, MASK, total_tokens=tokens, total_seqs=seqs, norm_length=4.0)
    assert out.item() == pytest.approx(expected)


@pytest.mark.parametrize(
    "mode, expected",
    [("token_mean", 2.0), ("seq_mean_token_mean", 2.0), ("seq_mean_token_sum_norm", 1.5)],
)
def test_zero_weight_drops_a_sequence_from_loss_and_counts(mode, expected):
    # Drop row 1: 3 tokens, 1 sequence left. token_mean 6/3; seq mean 6/3 / 1; sum_norm 6/4 / 1.
    w = torch.tensor([1.0, 0.0])
    tokens, seqs = normalisers(MASK, w)
    assert (tokens, seqs) == (3.0, 1.0)
    out = aggregate(
        mode, LOSS, MASK, total_tokens=tokens, total_seqs=seqs, norm_length=4.0, seq_weight=w
    )
    assert out.item() == pytest.approx(expected)


def _batch():
    g = torch.Generator().manual_seed(3)
    B, L = 7, 9
    logprobs = -torch.rand(B, L, generator=g)
    old = logprobs + 0.3 * torch.randn(B, L, generator=g)  # off-policy: some tokens clip
    adv = torch.randn(B, generator=g)
    lengths = torch.tensor([1, 8, 3, 5, 2, 7, 4])  # uneven responses after a 1-token prompt
    pos = torch.arange(L)
    mask = ((pos >= 1) & (pos <= lengths[:, None])).float()
    weight = torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0, 0.0, 1.0])
    return logprobs, old, adv, mask, weight


def _loss_and_grad(mode, rows, totals):
    logprobs, old, adv, mask, weight = _batch()
    logprobs.requires_grad_(True)
    total = 0.0
    for r in rows:
        per_token, _ = POLICY_LOSSES.get("ppo_clip")(
            logprobs[r], old[r], adv[r], mask[r], clip_low=0.2, clip_high=0.2
        )
        t = totals(mask[r], weight[r])
        total = total + aggregate(
            mode, per_token, mask[r], total_tokens=t[0], total_seqs=t[1],
            norm_length=8.0, seq_weight=weight[r],
        )
    total.backward()
    return total.detach(), logprobs.grad


@pytest.mark.parametrize("mode", MODES)
def test_micro_batches_sum_to_the_whole_batch_loss_and_gradient(mode):
    _, _, _, mask, weight = _batch()
    whole = normalisers(mask, weight)  # counted once over the whole mini-batch
    loss, grad = _loss_and_grad(mode, [slice(0, 7)], lambda m, w: whole)
    micro = [slice(0, 2), slice(2, 3), slice(3, 7)]  # 3 uneven micro-batches
    loss_mb, grad_mb = _loss_and_grad(mode, micro, lambda m, w: whole)
    assert torch.allclose(loss_mb, loss, atol=1e-6)
    assert torch.allclose(grad_mb, grad, atol=1e-6)
    assert grad.abs().sum() > 0  # the comparison is not between two zero tensors


@pytest.mark.parametrize("mode", MODES)
def test_per_micro_batch_counts_would_be_wrong(mode):
    # The counterfactual that motivates total_tokens/total_seqs: normalising each micro-batch by
    # its own counts changes the loss, so the equivalence test above can fail.
    _, _, _, mask, weight = _batch()
    whole = normalisers(mask, weight)
    loss, _ = _loss_and_grad(mode, [slice(0, 7)], lambda m, w: whole)
    micro = [slice(0, 2), slice(2, 3), slice(3, 7)]

    def own(m, w):
        tokens, seqs = normalisers(m, w)
        return max(tokens, 1.0), max(seqs, 1.0)  # a micro-batch of dropped rows counts 0

    loss_own, _ = _loss_and_grad(mode, micro, own)
    assert not torch.allclose(loss_own, loss, atol=1e-3)


@pytest.mark.parametrize(
    "mode, key", [("token_mean", "total_tokens"), ("seq_mean_token_mean", "total_seqs")]
)
def test_empty_mini_batch_is_an_error_naming_the_count(mode, key):
    with pytest.raises(ValueError, match=f"{key}=0.0 must be > 0"):
        aggregate(mode, LOSS, MASK, total_tokens=0.0, total_seqs=0.0, norm_length=4.0)


def test_sum_norm_needs_a_norm_length():
    with pytest.raises(ValueError, match="norm_length=None must be > 0"):
        aggregate("seq_mean_token_sum_norm", LOSS, MASK, total_tokens=4.0, total_seqs=2.0)


def test_bad_shapes_name_the_argument():
    with pytest.raises(ValueError, match="^mask has shape"):
        aggregate("token_mean", LOSS, MASK[:, :3], total_tokens=4.0, total_seqs=2.0)
    with pytest.raises(ValueError, match="^sample_weight has shape"):
        normalisers(MASK, torch.ones(3))
    with pytest.raises(ValueError, match=r"^response_mask must be \[B, L\]"):
        normalisers(MASK[0])
