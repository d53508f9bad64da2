"""Clipped policy-gradient losses, per token. Shapes: B sequences, L positions (see rlhf/types.py).

Every loss has the signature
    fn(logprobs [B,L], old_logprobs [B,L], advantages [B] or [B,L], response_mask [B,L], *,
       clip_low, clip_high, dual_clip=None) -> (per_token_loss [B,L], diagnostics)
Advantages are one per sequence (broadcast over its tokens) or one per token (on-policy
distillation, rlhf/algo/distill.py).
``per_token_loss`` is 0 outside the mask; aggregation (rlhf/algo/aggregation.py) reduces it.
Diagnostics are detached means/extremes over the masked tokens of this call. With no masked
tokens the means are 0 and ratio/max, ratio/min are -inf/+inf (the identities of max/min, so
combining over micro-batches stays right).

Log-ratios are clamped before ``exp``, as verl does: in fp32 exp overflows above ~88.7, and an
infinite ratio with a negative advantage makes the loss, then every gradient, inf/NaN. A token's
log-ratio is clamped to +-LOG_RATIO_CLAMP (ratio at most e^20 = 4.85e8; beyond it the token's
gradient is 0), GSPO's sequence log-ratio to at most SEQ_LOG_RATIO_CLAMP (e^10 = 22026).
"""

from __future__ import annotations

import torch
from torch import Tensor

from rlhf.algo.registry import Registry
from rlhf.algo.shapes import expect_dim, expect_shape

POLICY_LOSSES: Registry = Registry("policy loss")

# verl's bounds (core_algos.py): a token's log-ratio in [-20, 20], GSPO's sequence log-ratio <= 10.
LOG_RATIO_CLAMP = 20.0
SEQ_LOG_RATIO_CLAMP = 10.0


def _check(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor) -> None:
    expect_dim("logprobs", logprobs, 2, "[B, L]")
    expect_shape("old_logprobs", old_logprobs, logprobs.shape)
    expect_shape("response_mask", mask, logprobs.shape)
    if advantages.dim() != 2:
        expect_shape("advantages", advantages, logprobs.shape[:1])
    else:
        expect_shape("advantages", advantages, logprobs.shape)


def _masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def clipped_surrogate(
    ratio: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_low: float,
    clip_high: float,
    dual_clip: float | None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO's pessimistic surrogate as a loss: max(-r*A, -clip(r, 1-cl, 1+ch)*A), per token.

    Dual clip (Ye et al. 2020): for A < 0 the loss is also capped at -c*A, so a token whose ratio
    exploded (r > c) cannot dominate the batch.
    """
    adv = advantages[:, None] if advantages.dim() == 1 else advantages  # [B, 1] broadcast, or [B, L]
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    loss = torch.maximum(unclipped, clipped)  # [B, L]
    r = ratio.detach()
    on = mask > 0
    # "Binding" = the clipped branch is the one taken, so the token's gradient is zero.
    stats = {
        "clip_frac/low": _masked_mean(((r < 1.0 - clip_low) & (adv < 0)).float(), mask),
        "clip_frac/high": _masked_mean(((r > 1.0 + clip_high) & (adv > 0)).float(), mask),
    }
    if dual_clip is not None:
        cap = -adv * dual_clip  # [B, 1] or [B, L]
        loss = torch.where(adv < 0, torch.minimum(loss, cap), loss)
        stats["clip_frac/dual"] = _masked_mean(((r > dual_clip) & (adv < 0)).float(), mask)
    stats["ratio/mean"] = _masked_mean(r, mask)
    stats["ratio/max"] = torch.where(on, r, -torch.inf).max()
    stats["ratio/min"] = torch.where(on, r, torch.inf).min()
    return loss * mask, {k: v.detach() for k, v in stats.items()}


@POLICY_LOSSES.register("ppo_clip")
def ppo_clip(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    *,
    clip_low: float,
    clip_high: float,
    dual_clip: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Token-level ratio exp(logp - old) in PPO's clipped surrogate (GRPO, DAPO)."""
    _check(logprobs, old_logprobs, advantages, response_mask)
    # Zero the log-ratio off the mask: prompt/padding positions may hold arbitrary values and an
    # overflowing exp there would turn into NaN when multiplied by the mask.
    log_ratio = ((logprobs - old_logprobs) * response_mask).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return clipped_surrogate(
        log_ratio.exp(), advantages, response_mask,
        clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip,
    )


@POLICY_LOSSES.register("gspo")
def gspo(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    *,
    clip_low: float,
    clip_high: float,
    dual_clip: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """GSPO (Zheng et al. 2025): one length-normalised ratio per sequence, clipped as a whole.

    s_i = exp(mean over the sequence's tokens of (logp - old)). The token-level form
    s_i,t = sg[s_i] * exp(logp_t - sg[logp_t]) has value s_i and gradient s_i * grad(logp_t), so
    each token's gradient is weighted by its sequence's ratio (paper eq. for GSPO-token).
    Pair with loss_agg=seq_mean_token_mean to get the paper's 1/|y_i| sum over tokens.
    log s_i is clamped at SEQ_LOG_RATIO_CLAMP; being detached, the clamp bounds the value and the
    weight s_i of the gradient, and the gradient still flows (as in verl).
    """
    _check(logprobs, old_logprobs, advantages, response_mask)
    log_ratio = (logprobs - old_logprobs) * response_mask
    seq_log_ratio = log_ratio.sum(dim=1) / response_mask.sum(dim=1).clamp(min=1)  # [B]
    seq_log_ratio = seq_log_ratio.clamp(max=SEQ_LOG_RATIO_CLAMP)
    token_log_ratio = seq_log_ratio.detach()[:, None] + logprobs - logprobs.detach()
    ratio = (token_log_ratio * response_mask).exp()
    return clipped_surrogate(
        ratio, advantages, response_mask,
        clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip,
    )
