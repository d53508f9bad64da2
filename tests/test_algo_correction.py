"""Sampler/learner mismatch metrics and the rollout corrections (rlhf/algo/correction.py), by hand."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf.algo import ROLLOUT_CORRECTIONS, UnknownNameError, correction_weights, mismatch_stats

LN2 = math.log(2.0)

# One row, positions 0..4: position 0 is prompt, 1..3 completion, 4 padding (arbitrary values there).
# log rho = learner - sampler = [., ln 2, 0, -ln 4, .] on the completion tokens, i.e. rho = 2, 1, 0.25.
MASK = torch.tensor([[0.0, 1.0, 1.0, 1.0, 0.0]])
SAMPLER = torch.tensor([[0.0, -1.0, -0.5, -0.2, 0.0]])
LEARNER = torch.tensor([[9.0, -1.0 + LN2, -0.5, -0.2 - 2 * LN2, -50.0]])


def test_mismatch_stats_by_hand():
    m = mismatch_stats(LEARNER, SAMPLER, MASK)
    # |log rho| = ln 2, 0, 2 ln 2: mean = ln 2, max = 2 ln 2 (the masked 9.0 and -50 are ignored).
    assert m["mismatch/abs_logprob_diff_mean"].item() == pytest.approx(LN2, rel=1e-6)
    assert m["mismatch/abs_logprob_diff_max"].item() == pytest.approx(2 * LN2, rel=1e-6)
    # k3 = rho - 1 - log rho: (2 - 1 - ln 2) + 0 + (0.25 - 1 + 2 ln 2) = 0.25 + ln 2, over 3 tokens.
    assert m["mismatch/kl_k3"].item() == pytest.approx((0.25 + LN2) / 3, rel=1e-6)
    # rho = 2 is on the boundary of [0.5, 2] (inside); 0.25 is outside: 1 of 3 tokens.
    assert m["mismatch/ratio_out_of_range_frac"].item() == pytest.approx(1 / 3, rel=1e-6)


def test_identical_policies_have_no_mismatch():
    m = mismatch_stats(SAMPLER.clone(), SAMPLER, MASK)
    assert all(v.item() == 0.0 for v in m.values())


def test_no_masked_tokens_gives_zero_means_and_minus_inf_max():
    m = mismatch_stats(LEARNER, SAMPLER, torch.zeros_like(MASK))
    assert m["mismatch/kl_k3"].item() == 0.0
    assert m["mismatch/abs_logprob_diff_max"].item() == -math.inf


def weights(name: str, **kw):
    params = dict(cap=2.0, low=0.5, high=2.0) | kw
    return correction_weights(name, LEARNER, SAMPLER, MASK, **params)


def test_none_weighs_every_masked_token_one():
    w, diag = weights("none")
    assert w.tolist() == [[0.0, 1.0, 1.0, 1.0, 0.0]] and diag == {}


def test_tis_truncates_the_ratio_at_the_cap():
    # rho = 2, 1, 0.25 with cap 1.5: weights 1.5, 1, 0.25; one of three tokens truncated.
    w, diag = weights("tis", cap=1.5)
    torch.testing.assert_close(w, torch.tensor([[0.0, 1.5, 1.0, 0.25, 0.0]]))
    assert diag["rollout_correction/truncated_frac"].item() == pytest.approx(1 / 3)
    assert diag["rollout_correction/weight_mean"].item() == pytest.approx((1.5 + 1 + 0.25) / 3)


def test_icepop_weighs_by_rho_inside_the_band_and_masks_outside():
    # Band [0.5, 2]: rho = 2 kept with weight 2 (boundary), 1 kept with weight 1, 0.25 dropped.
    # (A 0/1 mask, the old icepop, gave [1, 1, 0].)
    w, diag = weights("icepop")
    torch.testing.assert_close(w, torch.tensor([[0.0, 2.0, 1.0, 0.0, 0.0]]))
    assert diag["rollout_correction/masked_frac"].item() == pytest.approx(1 / 3)
    assert diag["rollout_correction/weight_mean"].item() == pytest.approx((2 + 1 + 0) / 3)
    # A narrower band [0.9, 1.1] keeps only rho = 1.
    w, _ = weights("icepop", low=0.9, high=1.1)
    torch.testing.assert_close(w, torch.tensor([[0.0, 0.0, 1.0, 0.0, 0.0]]))


def test_icepop_keeps_rho_1_5_as_its_weight():
    # One token, log rho = ln 1.5 inside [0.5, 2]: weight 1.5 (IcePop, verl, TRL), not 1.
    learner, sampler = torch.tensor([[-1.0 + math.log(1.5)]]), torch.tensor([[-1.0]])
    w, _ = correction_weights("icepop", learner, sampler, torch.ones(1, 1), cap=2.0, low=0.5, high=2.0)
    assert w.item() == pytest.approx(1.5, rel=1e-6)


def test_token_reject_is_the_band_mask_without_the_weight():
    # Band [0.5, 2] on rho = 2, 1, 0.25: weights 1, 1, 0 (icepop gives 2, 1, 0).
    w, diag = weights("token_reject")
    assert w.tolist() == [[0.0, 1.0, 1.0, 0.0, 0.0]]
    assert diag["rollout_correction/masked_frac"].item() == pytest.approx(1 / 3)
    w, _ = weights("token_reject", low=0.9, high=1.1)
    assert w.tolist() == [[0.0, 0.0, 1.0, 0.0, 0.0]]


def test_seq_mask_drops_whole_sequences_by_the_geometric_mean_ratio():
    # Row 0: mean log rho = (ln 2 + 0 - 2 ln 2) / 3 = -ln 2 / 3, geometric mean 2^(-1/3) = 0.794.
    # Row 1: log rho = ln 4 on its one token: geometric mean 4.
    learner = torch.cat([LEARNER, torch.tensor([[0.0, -1.0 + 2 * LN2, 0.0, 0.0, 0.0]])])
    sampler = torch.cat([SAMPLER, torch.tensor([[0.0, -1.0, 0.0, 0.0, 0.0]])])
    mask = torch.cat([MASK, torch.tensor([[0.0, 1.0, 0.0, 0.0, 0.0]])])
    w, diag = correction_weights("seq_mask", learner, sampler, mask, cap=2.0, low=0.5, high=2.0)
    # Row 0 kept with weight 1 on each token, not its geometric mean 0.794 (see seq_mask's docstring).
    assert w.tolist() == [[0.0, 1.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0]]
    assert diag["rollout_correction/masked_frac"].item() == pytest.approx(1 / 4)  # 1 of 4 tokens
    # [0.8, 1.25] also drops row 0 (0.794 < 0.8).
    w, _ = correction_weights("seq_mask", learner, sampler, mask, cap=2.0, low=0.8, high=1.25)
    assert w.sum().item() == 0.0


@pytest.mark.parametrize("name, expected", [("tis", 2.0), ("icepop", 0.0), ("token_reject", 0.0)])
def test_an_overflowing_ratio_gives_a_finite_weight(name, expected):
    # log rho = 100: rho = exp(100) = inf in fp32. tis truncates it to the cap 2; it lies outside
    # the band [0.5, 2], so icepop and token_reject drop it (0, not inf * 0 = NaN).
    learner, sampler = torch.tensor([[0.0, 0.0]]), torch.tensor([[-100.0, 0.0]])
    w, _ = correction_weights(name, learner, sampler, torch.ones(1, 2), cap=2.0, low=0.5, high=2.0)
    assert w.tolist() == [[expected, 1.0]]


def test_weights_carry_no_gradient():
    learner = LEARNER.clone().requires_grad_(True)
    w, _ = correction_weights("tis", learner, SAMPLER, MASK, cap=2.0, low=0.5, high=2.0)
    assert not w.requires_grad


def test_registry_names_and_unknown_name():
    assert ROLLOUT_CORRECTIONS.names() == ["icepop", "none", "seq_mask", "tis", "token_reject"]
    with pytest.raises(UnknownNameError, match="unknown rollout correction 'is'"):
        weights("is")


def test_shape_mismatch_is_named():
    with pytest.raises(ValueError, match="sampler_logprobs"):
        correction_weights("tis", LEARNER, SAMPLER[:, :3], MASK, cap=2.0, low=0.5, high=2.0)
    with pytest.raises(ValueError, match="mask"):
        mismatch_stats(LEARNER, SAMPLER, MASK[:, :3])


def test_kl_k3_is_never_negative_where_the_policies_nearly_agree():
    # rho - 1 - log rho >= 0; with |log rho| ~ 1e-5 the naive float32 form came out -1.35e-9 in
    # the SmolLM2 demo's first step. 1e-5 ** 2 / 2 = 5e-11 is the true value here.
    sampler = torch.full((4, 64), -3.0)
    learner = sampler + torch.linspace(-1e-5, 1e-5, 64)
    kl = mismatch_stats(learner, sampler, torch.ones(4, 64))["mismatch/kl_k3"].item()
    assert 0.0 <= kl < 1e-9
