"""The sampler/learner gap: measured on every step, and corrected by a registry choice.

The engines sample with their own kernels (and, with trainer.max_staleness > 0, with weights one or
more updates old), so the policy that drew a token is not exactly the one the learner trains. With
ρ_t = π_learner_old(y_t) / π_sampler(y_t) per completion token (π_learner_old: the learner's
log-probs before this step's first update; π_sampler: vLLM's processed log-probs):

- ``mismatch_stats`` measures the gap: mean and max |log ρ|, the k3 estimate of
  KL(π_sampler || π_learner) = E_sampler[ρ - 1 - log ρ], and the share of tokens with ρ outside
  [0.5, 2].
- ``ROLLOUT_CORRECTIONS`` turn log ρ into a per-token weight on the policy loss (detached):
    none          1 everywhere
    tis           min(ρ, cap): truncated importance sampling (Yao et al. 2025, "off-policy RL")
    icepop        ρ inside [low, high], else 0: importance-weighted, and the token is masked where
                  the policies disagree (IcePop, Ling team 2025; verl's and TRL's token masking)
    token_reject  1 inside [low, high], else 0: the mask alone, no importance weight (rejection
                  sampling, verl's rollout_rs=token)
    seq_mask      1 for every token of a sequence whose geometric-mean ratio exp(mean log ρ) lies
                  in [low, high], else 0 for the whole sequence (verl's geometric rejection)
  A masked token contributes no loss but stays in the aggregation's normaliser, as a clipped
  token does: dropping tokens does not up-weight the rest of the batch.

Signature: ``fn(log_rho [B,L], mask [B,L], *, cap, low, high) -> (weight [B,L], diagnostics)``,
weight 0 off the mask; diagnostics are detached token shares over the mask.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rlhf.algo.registry import Registry
from rlhf.algo.shapes import expect_dim, expect_shape

ROLLOUT_CORRECTIONS: Registry = Registry("rollout correction")

# |log ρ| > log 2: the token's probability differs by more than 2x between sampler and learner.
OUT_OF_RANGE = (0.5, 2.0)


def _check(log_rho: Tensor, mask: Tensor) -> None:
    expect_dim("log_rho", log_rho, 2, "[B, L]")
    expect_shape("mask", mask, log_rho.shape)


def _share(x: Tensor, mask: Tensor) -> Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def mismatch_stats(learner_logprobs: Tensor, sampler_logprobs: Tensor, mask: Tensor) -> dict[str, Tensor]:
    """Detached gap metrics over the masked tokens (means are 0 and the max -inf with none)."""
    expect_dim("learner_logprobs", learner_logprobs, 2, "[B, L]")
    expect_shape("sampler_logprobs", sampler_logprobs, learner_logprobs.shape)
    expect_shape("mask", mask, learner_logprobs.shape)
    on = mask > 0
    # Off the mask the difference is zeroed first: prompt and padding hold arbitrary values.
    log_rho = torch.where(on, learner_logprobs.detach() - sampler_logprobs, 0.0)
    diff = log_rho.abs()
    low, high = OUT_OF_RANGE
    out = (log_rho < torch.log(torch.tensor(low))) | (log_rho > torch.log(torch.tensor(high)))
    return {
        "mismatch/abs_logprob_diff_mean": _share(diff, mask),
        "mismatch/abs_logprob_diff_max": torch.where(on, diff, -torch.inf).max(),
        # expm1(x) - x >= 0; clamped, as float error made it -1e-9 where the policies agree.
        "mismatch/kl_k3": _share((torch.expm1(log_rho) - log_rho).clamp(min=0), mask),
        "mismatch/ratio_out_of_range_frac": _share(out.float(), mask),
    }


@ROLLOUT_CORRECTIONS.register("none")
def no_correction(log_rho: Tensor, mask: Tensor, *, cap: float, low: float, high: float):
    _check(log_rho, mask)
    return (mask > 0).to(log_rho.dtype), {}


def _rho(log_rho: Tensor, on: Tensor) -> Tensor:
    # Off the mask log ρ is zeroed first: prompt and padding hold arbitrary values.
    return torch.where(on, log_rho, 0.0).exp()


@ROLLOUT_CORRECTIONS.register("tis")
def truncated_importance_sampling(log_rho: Tensor, mask: Tensor, *, cap: float, low: float, high: float):
    """Weight min(ρ, cap): unbiased below the cap, variance bounded above it."""
    _check(log_rho, mask)
    on = mask > 0
    rho = _rho(log_rho, on)
    weight = torch.where(on, rho.clamp(max=cap), 0.0)
    return weight, {
        "rollout_correction/truncated_frac": _share((rho > cap).float(), mask),
        "rollout_correction/weight_mean": _share(weight, mask),
    }


def _in_band(log_rho: Tensor, on: Tensor, low: float, high: float) -> tuple[Tensor, Tensor]:
    """(ρ, the masked tokens with low <= ρ <= high)."""
    rho = _rho(log_rho, on)
    return rho, on & (rho >= low) & (rho <= high)


@ROLLOUT_CORRECTIONS.register("icepop")
def icepop(log_rho: Tensor, mask: Tensor, *, cap: float, low: float, high: float):
    """Weight ρ where low <= ρ <= high, else 0 (IcePop): the importance weight corrects the tokens
    the two policies roughly agree on, and the ones they disagree on are dropped, not truncated."""
    _check(log_rho, mask)
    on = mask > 0
    rho, keep = _in_band(log_rho, on, low, high)
    weight = torch.where(keep, rho, 0.0)
    return weight, {
        "rollout_correction/masked_frac": _share((on & ~keep).float(), mask),
        "rollout_correction/weight_mean": _share(weight, mask),
    }


@ROLLOUT_CORRECTIONS.register("token_reject")
def token_reject(log_rho: Tensor, mask: Tensor, *, cap: float, low: float, high: float):
    """Weight 1 where low <= ρ <= high, else 0: icepop's mask without its importance weight, for
    a gap treated as noise to filter rather than as a ratio to correct (verl's rollout_rs=token)."""
    _check(log_rho, mask)
    on = mask > 0
    _, keep = _in_band(log_rho, on, low, high)
    return keep.to(log_rho.dtype), {"rollout_correction/masked_frac": _share((on & ~keep).float(), mask)}


@ROLLOUT_CORRECTIONS.register("seq_mask")
def seq_mask(log_rho: Tensor, mask: Tensor, *, cap: float, low: float, high: float):
    """Weight 1 for every token of a sequence whose exp(mean log ρ) is in [low, high], else 0.

    Kept sequences carry weight 1, not their geometric-mean ratio: the geometric mean is a
    length-normalised measure of how far the sequence drifted, not an importance weight (the
    sequence's weight would be the product of its ρ, whose variance grows with length), so it
    filters, as verl's geometric rejection sampling does. For an importance weight, choose tis or
    icepop.
    """
    _check(log_rho, mask)
    on = mask > 0
    m = on.to(log_rho.dtype)
    seq = torch.where(on, log_rho, 0.0).sum(dim=1) / m.sum(dim=1).clamp(min=1)  # [B] mean log ρ
    geo = seq.exp()
    keep_seq = (geo >= low) & (geo <= high)
    keep = on & keep_seq[:, None]
    return keep.to(log_rho.dtype), {"rollout_correction/masked_frac": _share((on & ~keep).float(), mask)}


def correction_weights(name: str, learner_logprobs: Tensor, sampler_logprobs: Tensor, mask: Tensor, *,
                       cap: float, low: float, high: float) -> tuple[Tensor, dict[str, Tensor]]:
    """The registered correction ``name`` applied to log ρ = learner - sampler (both [B, L])."""
    expect_shape("sampler_logprobs", sampler_logprobs, learner_logprobs.shape)
    log_rho = learner_logprobs.detach() - sampler_logprobs
    weight, diag = ROLLOUT_CORRECTIONS.get(name)(log_rho, mask, cap=cap, low=low, high=high)
    return weight.detach(), {k: v.detach() for k, v in diag.items()}
