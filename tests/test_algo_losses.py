"""Policy losses: gradient sign, clipping where the papers say, dual clip, GSPO, diagnostics."""

import math

import pytest
import torch

from rlhf.algo import POLICY_LOSSES, aggregate
from rlhf.algo.losses import LOG_RATIO_CLAMP, SEQ_LOG_RATIO_CLAMP

CLIP = dict(clip_low=0.2, clip_high=0.28)


def _ratio_batch(ratios, advantages):
    """One response token per row at position 1 (position 0 is prompt) with the given ratios."""
    B = len(ratios)
    logprobs = torch.zeros(B, 2)
    logprobs[:, 1] = torch.log(torch.tensor(ratios))
    logprobs.requires_grad_(True)
    old = torch.zeros(B, 2)  # ratio = exp(logp - 0)
    mask = torch.tensor([[0.0, 1.0]] * B)
    return logprobs, old, torch.tensor(advantages), mask


@pytest.mark.parametrize("name", ["ppo_clip", "gspo"])
def test_on_policy_gradient_pushes_up_positive_advantage_tokens(name):
    logprobs = torch.randn(2, 3).requires_grad_(True)
    mask = torch.ones(2, 3)
    loss, _ = POLICY_LOSSES.get(name)(
        logprobs, logprobs.detach(), torch.tensor([1.0, -1.0]), mask, **CLIP
    )
    loss.sum().backward()
    # ratio == 1, d(-A * r)/dlogp = -A * r = -A: descent raises logp where A > 0.
    assert torch.equal(logprobs.grad, torch.tensor([[-1.0] * 3, [1.0] * 3]))


@pytest.mark.parametrize("name", ["ppo_clip", "gspo"])
@pytest.mark.parametrize("agg", ["token_mean", "seq_mean_token_mean"])
def test_on_policy_gradient_equals_reinforce(name, agg):
    g = torch.Generator().manual_seed(1)
    logprobs = (-torch.rand(3, 5, generator=g)).requires_grad_(True)
    mask = torch.tensor([[0, 1, 1, 1, 0], [0, 0, 1, 1, 1], [0, 1, 0, 0, 0]], dtype=torch.float)
    adv = torch.tensor([0.7, -1.3, 2.0])
    totals = dict(total_tokens=float(mask.sum()), total_seqs=3.0)
    per_token, _ = POLICY_LOSSES.get(name)(logprobs, logprobs.detach(), adv, mask, **CLIP)
    (grad,) = torch.autograd.grad(aggregate(agg, per_token, mask, **totals), logprobs)
    # REINFORCE: minimise -A * logp, aggregated the same way.
    reinforce = aggregate(agg, -adv[:, None] * logprobs, mask, **totals)
    (expected,) = torch.autograd.grad(reinforce, logprobs)
    assert torch.allclose(grad, expected, atol=1e-7)


def test_ppo_clip_stops_gradient_exactly_where_the_paper_says():
    # clip range [0.8, 1.28]. Per row (ratio, A) -> loss = max(-A r, -A clip(r)), grad = d/dlogp:
    # (1.5, +1): max(-1.5, -1.28) = -1.28 clipped          -> grad 0
    # (0.5, -1): max(0.5, 0.8) = 0.8 clipped                -> grad 0
    # (1.5, -1): max(1.5, 1.28) = 1.5 unclipped, flows      -> grad -A r = 1.5
    # (0.5, +1): max(-0.5, -0.8) = -0.5 unclipped, flows    -> grad -0.5
    # (1.1, +1): inside the range                           -> grad -1.1
    logprobs, old, adv, mask = _ratio_batch([1.5, 0.5, 1.5, 0.5, 1.1], [1.0, -1.0, -1.0, 1.0, 1.0])
    loss, stats = POLICY_LOSSES.get("ppo_clip")(logprobs, old, adv, mask, **CLIP)
    loss.sum().backward()
    assert torch.allclose(loss[:, 1], torch.tensor([-1.28, 0.8, 1.5, -0.5, -1.1]), atol=1e-6)
    assert torch.equal(loss[:, 0], torch.zeros(5))  # prompt position masked
    assert torch.allclose(logprobs.grad[:, 1], torch.tensor([0.0, 0.0, 1.5, -0.5, -1.1]), atol=1e-6)
    assert torch.equal(logprobs.grad[:, 0], torch.zeros(5))
    # Binding clips: row 0 (high), row 1 (low), out of 5 masked tokens.
    assert stats["clip_frac/high"].item() == pytest.approx(0.2)
    assert stats["clip_frac/low"].item() == pytest.approx(0.2)
    assert "clip_frac/dual" not in stats
    # ratio mean (1.5 + 0.5 + 1.5 + 0.5 + 1.1) / 5 = 1.02; max 1.5, min 0.5 (masked tokens only).
    assert stats["ratio/mean"].item() == pytest.approx(1.02, abs=1e-6)
    assert stats["ratio/max"].item() == pytest.approx(1.5, abs=1e-6)
    assert stats["ratio/min"].item() == pytest.approx(0.5, abs=1e-6)


def test_dual_clip_caps_negative_advantage_loss():
    # c = 3. (5, -1): max(5, 1.28) = 5, capped at -c*A = 3 -> grad 0.
    # (2, -1): 2 < 3, uncapped -> grad -A r = 2. (5, +1): dual clip ignores A > 0: -1.28, grad 0.
    logprobs, old, adv, mask = _ratio_batch([5.0, 2.0, 5.0], [-1.0, -1.0, 1.0])
    loss, stats = POLICY_LOSSES.get("ppo_clip")(logprobs, old, adv, mask, dual_clip=3.0, **CLIP)
    loss.sum().backward()
    assert torch.allclose(loss[:, 1], torch.tensor([3.0, 2.0, -1.28]), atol=1e-6)
    assert torch.allclose(logprobs.grad[:, 1], torch.tensor([0.0, 2.0, 0.0]), atol=1e-6)
    assert stats["clip_frac/dual"].item() == pytest.approx(1 / 3)


def test_gspo_clips_the_sequence_ratio():
    # Token log-ratios [0.1, 0.3] -> s = exp(mean) = exp(0.2) = 1.221403 for both tokens, outside
    # [1 - 3e-4, 1 + 4e-4]. A = +1: clipped, loss -(1 + 4e-4) per token, no gradient.
    # A = -1: max(s, 1 + 4e-4) = s unclipped, loss 1.221403 per token, grad -A * s = 1.221403 on
    # each token (not the token's own ratio exp(0.1) or exp(0.3)).
    lr = torch.tensor([[0.0, 0.1, 0.3], [0.0, 0.1, 0.3]])
    logprobs = (lr - 1.0).requires_grad_(True)
    old = torch.full((2, 3), -1.0)
    mask = torch.tensor([[0.0, 1.0, 1.0]] * 2)
    loss, stats = POLICY_LOSSES.get("gspo")(
        logprobs, old, torch.tensor([1.0, -1.0]), mask, clip_low=3e-4, clip_high=4e-4
    )
    loss.sum().backward()
    s = math.exp(0.2)
    assert torch.allclose(loss, torch.tensor([[0, -1.0004, -1.0004], [0, s, s]]), atol=1e-6)
    assert torch.allclose(logprobs.grad, torch.tensor([[0.0, 0, 0], [0, s, s]]), atol=1e-6)
    assert stats["ratio/mean"].item() == pytest.approx(s, abs=1e-6)
    assert stats["clip_frac/high"].item() == pytest.approx(0.5)  # 2 of 4 tokens


@pytest.mark.parametrize("name", ["ppo_clip", "gspo"])
def test_garbage_off_the_mask_cannot_poison_the_loss(name):
    # A prompt position whose old log-prob is -1000 would give exp(1000) = inf, inf * 0 = NaN.
    logprobs = torch.zeros(1, 3, requires_grad=True)
    old = torch.tensor([[-1000.0, 0.0, 0.0]])
    loss, stats = POLICY_LOSSES.get(name)(
        logprobs, old, torch.tensor([1.0]), torch.tensor([[0.0, 1.0, 1.0]]), **CLIP
    )
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(logprobs.grad).all()
    assert stats["ratio/max"].item() == 1.0


def test_ppo_clip_log_ratio_is_clamped_before_exp():
    # Log-ratio 100: exp(100) overflows fp32 (max ~3.4e38) to inf. Unclamped, A = -1 gave loss inf
    # and gradient inf; A = +1 gave loss -1.28 but a NaN gradient (0 * inf through exp).
    # Clamped at LOG_RATIO_CLAMP = 20: ratio e^20 = 4.8516520e8. A = -1: max(e^20, 1.28) = e^20;
    # A = +1: max(-e^20, -1.28) = -1.28. Beyond the clamp the gradient is 0 for both.
    assert LOG_RATIO_CLAMP == 20.0
    logprobs, old, adv, mask = _ratio_batch([1.0, 1.0], [-1.0, 1.0])
    old = old.clone()
    old[:, 1] = -100.0
    loss, stats = POLICY_LOSSES.get("ppo_clip")(logprobs, old, adv, mask, **CLIP)
    loss.sum().backward()
    assert loss[0, 1].item() == pytest.approx(math.exp(20), rel=1e-6)
    assert loss[1, 1].item() == pytest.approx(-1.28, abs=1e-6)
    assert torch.equal(logprobs.grad, torch.zeros(2, 2))
    assert stats["ratio/max"].item() == pytest.approx(math.exp(20), rel=1e-6)


def test_gspo_sequence_log_ratio_is_clamped_at_10():
    # Two tokens with log-ratio 100: mean 100, s = exp(100) = inf unclamped (loss inf for A = -1).
    # Clamped at SEQ_LOG_RATIO_CLAMP = 10: s = e^10 = 22026.466 on each token, loss -A s = e^10 and,
    # as the clamp acts on the detached s, the gradient -A s = e^10 per token still flows.
    assert SEQ_LOG_RATIO_CLAMP == 10.0
    logprobs = torch.zeros(1, 3, requires_grad=True)
    old = torch.tensor([[0.0, -100.0, -100.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0]])
    loss, _ = POLICY_LOSSES.get("gspo")(logprobs, old, torch.tensor([-1.0]), mask, **CLIP)
    loss.sum().backward()
    s = math.exp(10)
    torch.testing.assert_close(loss, torch.tensor([[0.0, s, s]]))
    torch.testing.assert_close(logprobs.grad, torch.tensor([[0.0, s, s]]))


def test_empty_mask_gives_zero_means_and_reduction_identities():
    loss, stats = POLICY_LOSSES.get("ppo_clip")(
        torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1), torch.zeros(1, 2), **CLIP
    )
    assert torch.equal(loss, torch.zeros(1, 2))
    assert stats["clip_frac/low"].item() == 0.0 and stats["ratio/mean"].item() == 0.0
    assert stats["ratio/max"].item() == -math.inf and stats["ratio/min"].item() == math.inf


@pytest.mark.parametrize(
    "arg, shapes",
    [
        ("old_logprobs", dict(old=(2, 4))),
        ("advantages", dict(adv=(2, 1))),
        ("response_mask", dict(mask=(3, 3))),
        ("logprobs", dict(lp=(6,), old=(6,), mask=(6,))),
    ],
)
@pytest.mark.parametrize("name", ["ppo_clip", "gspo"])
def test_shape_mismatch_names_the_argument(name, arg, shapes):
    s = dict(lp=(2, 3), old=(2, 3), adv=(2,), mask=(2, 3)) | shapes
    with pytest.raises(ValueError, match=f"^{arg} "):
        POLICY_LOSSES.get(name)(
            torch.zeros(s["lp"]), torch.zeros(s["old"]), torch.zeros(s["adv"]),
            torch.zeros(s["mask"]), **CLIP,
        )
