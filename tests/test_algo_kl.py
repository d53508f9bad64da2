"""KL estimators k1/k2/k3 by hand, k3's non-negativity, the clamp, bad inputs."""

import pytest
import torch

from rlhf.algo import KL_ESTIMATORS
from rlhf.algo.kl import K3_MAX


def _kl(name, lp, ref, clamp=10.0):
    return KL_ESTIMATORS.get(name)(torch.tensor([lp]), torch.tensor([ref]), clamp=clamp)[0]


def test_k1_k2_k3_by_hand():
    # logp - ref = [-1 - -1.5, -2 - -1] = [0.5, -1]
    # k2 = 0.5 * [0.25, 1] = [0.125, 0.5]
    # k3 with d = ref - logp = [-0.5, 1]: exp(-0.5) + 0.5 - 1 = 0.106531; exp(1) - 1 - 1 = 0.718282
    lp, ref = [-1.0, -2.0], [-1.5, -1.0]
    assert torch.allclose(_kl("k1", lp, ref), torch.tensor([0.5, -1.0]), atol=1e-6)
    assert torch.allclose(_kl("k2", lp, ref), torch.tensor([0.125, 0.5]), atol=1e-6)
    assert torch.allclose(_kl("k3", lp, ref), torch.tensor([0.106531, 0.718282]), atol=1e-6)


def test_k3_is_nonnegative_and_zero_when_policies_agree():
    g = torch.Generator().manual_seed(0)
    lp, ref = -3 * torch.rand(4, 16, generator=g), -3 * torch.rand(4, 16, generator=g)
    assert (KL_ESTIMATORS.get("k3")(lp, ref, clamp=10.0) >= 0).all()
    assert torch.equal(KL_ESTIMATORS.get("k3")(lp, lp.clone(), clamp=10.0), torch.zeros(4, 16))


def test_log_ratio_is_clamped():
    # logp - ref = 0 - (-50) = 50 -> clamped to 10: k1 = 10, k3 = exp(-10) + 10 - 1 = 9.0000454.
    assert _kl("k1", [0.0], [-50.0]).item() == pytest.approx(10.0)
    assert _kl("k3", [0.0], [-50.0]).item() == pytest.approx(9.0000454, abs=1e-5)
    # logp - ref = -50 -> -10: k3 = exp(10) - 10 - 1 = 22015.47 within the input clamp (instead of
    # exp(50) ~ 5e21), and K3_MAX = 10 after the output clamp.
    assert _kl("k3", [-50.0], [0.0]).item() == 10.0
    assert _kl("k3", [-500.0], [0.0]).item() == 10.0


def test_k3_output_is_clamped_with_zero_gradient_beyond():
    # logp - ref = -30, +30, -2, so d = ref - logp = 30, -30, 2; with the input clamp 10:
    # d = 10:  e^10 - 11 = 22015.47 (and gradient -(e^10 - 1) = -22025 per unit logp, before
    #          the output clamp) -> K3_MAX = 10, gradient 0.
    # d = -10: e^-10 + 10 - 1 = 9.0000454 < 10, gradient 0 from the input clamp.
    # d = 2:   e^2 - 3 = 4.389056 inside both clamps; dk3/dlogp = -(e^d - 1) = -6.389056.
    assert K3_MAX == 10.0
    lp = torch.tensor([[-30.0, 30.0, -2.0]], requires_grad=True)
    k3 = KL_ESTIMATORS.get("k3")(lp, torch.zeros(1, 3), clamp=10.0)
    k3.sum().backward()
    torch.testing.assert_close(k3, torch.tensor([[10.0, 9.0000454, 4.389056]]))
    torch.testing.assert_close(lp.grad, torch.tensor([[0.0, 0.0, -6.389056]]))


@pytest.mark.parametrize("name", ["k1", "k2", "k3"])
def test_ref_shape_mismatch_names_ref_logprobs(name):
    with pytest.raises(ValueError, match="^ref_logprobs has shape"):
        KL_ESTIMATORS.get(name)(torch.zeros(2, 3), torch.zeros(2, 4), clamp=10.0)


def test_nonpositive_clamp_is_rejected():
    with pytest.raises(ValueError, match="clamp=0.0 must be > 0"):
        KL_ESTIMATORS.get("k3")(torch.zeros(1, 2), torch.zeros(1, 2), clamp=0.0)
