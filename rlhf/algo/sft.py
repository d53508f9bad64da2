"""The SFT (sequence-level distillation) loss for one micro-batch: completion-token cross-entropy.

    loss = - sum over completion tokens of log p(token) / total_tokens

Only tokens with ``response_mask`` 1 count: the prompt (system and user turns, the template's
header of the assistant turn) and the padding are conditioned on but never learnt. ``total_tokens``
is the completion-token count of the WHOLE mini-batch (``rlhf.algo.normalisers``), so, as with the
GRPO objective, micro-batch losses add up to the mini-batch's token mean, and splitting a
mini-batch into micro-batches or across ranks does not change the gradient.
"""

from __future__ import annotations

from torch import Tensor

from rlhf.algo.aggregation import token_mean
from rlhf.algo.shapes import expect_shape


def sft_loss(logprobs: Tensor, response_mask: Tensor, *, total_tokens: float) -> Tensor:
    """Scalar loss of this micro-batch: its share of the mini-batch's completion-token mean NLL.

    logprobs [B, L]: token log-probs at temperature 1 (``token_logprobs``), with grad.
    response_mask [B, L]: 1 on completion tokens, 0 on prompt and padding.
    total_tokens: completion tokens in the whole mini-batch (all micro-batches, all ranks).
    """
    expect_shape("response_mask", response_mask, logprobs.shape)
    mask = response_mask.to(logprobs.dtype)
    return token_mean(-logprobs, mask, total_tokens=total_tokens, total_seqs=float(logprobs.shape[0]))
