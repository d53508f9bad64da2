"""Per-token estimators of KL(policy || reference) from sampled tokens' log-probs (Schulman, 2020).

Each is ``fn(logprobs [B,L], ref_logprobs [B,L], *, clamp) -> [B,L]``. The log-ratio
logp - logp_ref is clamped to [-clamp, clamp] first: a token the reference finds near-impossible
would otherwise make k3's exp overflow. k3's output is clamped too, at K3_MAX (verl's low_var_kl
does the same): within the default input clamp (algo.kl_clamp=10) it still reached e^10 - 11 =
22015 per token, with a gradient, enough for one token to outweigh the batch's penalty. Callers
mask the result (aggregation does).
"""

from __future__ import annotations

from torch import Tensor

from rlhf.algo.registry import Registry
from rlhf.algo.shapes import expect_dim, expect_shape

KL_ESTIMATORS: Registry = Registry("KL estimator")

# k3 per token is at most this (reached at ref - logp = 2.61; beyond it the token's gradient is 0).
K3_MAX = 10.0


def _log_ratio(logprobs: Tensor, ref_logprobs: Tensor, clamp: float) -> Tensor:
    expect_dim("logprobs", logprobs, 2, "[B, L]")
    expect_shape("ref_logprobs", ref_logprobs, logprobs.shape)
    if not clamp > 0:
        raise ValueError(f"clamp={clamp} must be > 0 (algo.kl_clamp)")
    return (logprobs - ref_logprobs).clamp(-clamp, clamp)


@KL_ESTIMATORS.register("k1")
def k1(logprobs: Tensor, ref_logprobs: Tensor, *, clamp: float) -> Tensor:
    """logp - logp_ref: unbiased, high variance, can be negative per token."""
    return _log_ratio(logprobs, ref_logprobs, clamp)


@KL_ESTIMATORS.register("k2")
def k2(logprobs: Tensor, ref_logprobs: Tensor, *, clamp: float) -> Tensor:
    """0.5 * (logp - logp_ref)^2: biased, low variance, >= 0."""
    return 0.5 * _log_ratio(logprobs, ref_logprobs, clamp) ** 2


@KL_ESTIMATORS.register("k3")
def k3(logprobs: Tensor, ref_logprobs: Tensor, *, clamp: float) -> Tensor:
    """exp(ref - logp) - (ref - logp) - 1: unbiased, >= 0 (DeepSeekMath's GRPO penalty), at most K3_MAX."""
    d = -_log_ratio(logprobs, ref_logprobs, clamp)  # ref - logp
    return (d.exp() - d - 1.0).clamp(max=K3_MAX)
