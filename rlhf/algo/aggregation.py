"""Reduce a per-token loss [B,L] to the scalar that is differentiated.

The learner splits a mini-batch into micro-batches (and across ranks) and SUMS their gradients.
So every mode divides by counts over the WHOLE mini-batch, passed in as ``total_tokens`` and
``total_seqs``: each micro-batch returns its share, and the shares add up to the mini-batch loss.
The learner gets those counts from ``normalisers`` called once on the whole mini-batch.

Caution for the learner: DDP and DeepSpeed average gradients over ranks, and DeepSpeed's
``engine.backward`` also divides by gradient-accumulation steps by default. Sum semantics need
both undone (scale the loss by the world size; ``backward(loss, scale_wrt_gas=False)``).

Modes (``fn(per_token_loss, mask, *, total_tokens, total_seqs, norm_length, seq_weight)``):
- token_mean: every token weighs the same (DAPO).
- seq_mean_token_mean: mean over each sequence's tokens, then over sequences (original GRPO).
- seq_mean_token_sum_norm: each sequence's token sum / a constant, then mean over sequences
  (Dr.GRPO: no length bias from dividing by each sequence's own length).
``seq_weight`` [B] (TrainBatch.sample_weight, 0 drops a sequence) multiplies each sequence.
"""

from __future__ import annotations

from torch import Tensor

from rlhf.algo.registry import Registry
from rlhf.algo.shapes import expect_dim, expect_shape

AGGREGATIONS: Registry = Registry("loss aggregation")


def _weights(mask: Tensor, sample_weight: Tensor | None) -> Tensor:
    if sample_weight is None:
        return mask.new_ones(mask.shape[0])
    expect_shape("sample_weight", sample_weight, mask.shape[:1])
    return sample_weight.to(mask.dtype)


def normalisers(response_mask: Tensor, sample_weight: Tensor | None = None) -> tuple[float, float]:
    """(total_tokens, total_seqs) of a whole mini-batch: response tokens and sequences, weighted.

    Call on the entire mini-batch (every micro-batch of every rank) before splitting it.
    """
    expect_dim("response_mask", response_mask, 2, "[B, L]")
    w = _weights(response_mask, sample_weight)
    return float((response_mask.sum(dim=1) * w).sum()), float(w.sum())


def _check(loss: Tensor, mask: Tensor, total: float, total_name: str) -> None:
    expect_dim("per_token_loss", loss, 2, "[B, L]")
    expect_shape("mask", mask, loss.shape)
    if not total > 0:
        raise ValueError(
            f"{total_name}={total} must be > 0: every sequence of the mini-batch has weight 0 or "
            "no response tokens, so there is nothing to learn from; skip the mini-batch"
        )


@AGGREGATIONS.register("token_mean")
def token_mean(
    per_token_loss: Tensor,
    mask: Tensor,
    *,
    total_tokens: float,
    total_seqs: float,
    norm_length: float | None = None,
    seq_weight: Tensor | None = None,
) -> Tensor:
    _check(per_token_loss, mask, total_tokens, "total_tokens")
    w = _weights(mask, seq_weight)
    return (per_token_loss * mask * w[:, None]).sum() / total_tokens


@AGGREGATIONS.register("seq_mean_token_mean")
def seq_mean_token_mean(
    per_token_loss: Tensor,
    mask: Tensor,
    *,
    total_tokens: float,
    total_seqs: float,
    norm_length: float | None = None,
    seq_weight: Tensor | None = None,
) -> Tensor:
    _check(per_token_loss, mask, total_seqs, "total_seqs")
    w = _weights(mask, seq_weight)
    per_seq = (per_token_loss * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)  # [B]
    return (per_seq * w).sum() / total_seqs


@AGGREGATIONS.register("seq_mean_token_sum_norm")
def seq_mean_token_sum_norm(
    per_token_loss: Tensor,
    mask: Tensor,
    *,
    total_tokens: float,
    total_seqs: float,
    norm_length: float | None = None,
    seq_weight: Tensor | None = None,
) -> Tensor:
    _check(per_token_loss, mask, total_seqs, "total_seqs")
    if norm_length is None or not norm_length > 0:
        raise ValueError(f"norm_length={norm_length} must be > 0 for seq_mean_token_sum_norm")
    w = _weights(mask, seq_weight)
    per_seq = (per_token_loss * mask).sum(dim=1) / norm_length  # [B]
    return (per_seq * w).sum() / total_seqs


def aggregate(name: str, per_token_loss: Tensor, mask: Tensor, **kwargs) -> Tensor:
    """Apply the aggregation registered as ``name``."""
    return AGGREGATIONS.get(name)(per_token_loss, mask, **kwargs)

