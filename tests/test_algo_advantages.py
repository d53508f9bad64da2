"""Advantage estimators: textbook identities and hand-derived values (rlhf/algo/advantages.py)."""

import math

import pytest
import torch

from rlhf.algo import ADVANTAGES, UnknownNameError, compute_advantages, group_has_signal, has_signal, valid_mask

NAN = float("nan")
ALL = ["grpo", "dr_grpo", "rloo", "reinforce_pp"]


def test_registry_holds_the_four_estimators():
    assert ADVANTAGES.names() == sorted(ALL)


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "rloo"])
def test_group_advantages_sum_to_zero(name):
    rewards = torch.rand(5, 8, generator=torch.Generator().manual_seed(0))
    rewards[1, 3] = NAN  # sums over valid entries only; the NaN entry gets 0
    adv = compute_advantages(rewards, name)
    assert torch.allclose(adv.sum(dim=1), torch.zeros(5), atol=1e-5)


@pytest.mark.parametrize("name", ALL)
def test_all_equal_group_gets_exactly_zero(name):
    # 0.1 is not exact in binary: the group mean may differ from 0.1 by an ulp, and eps must not
    # turn that into noise either.
    rewards = torch.tensor([[0.1, 0.1, 0.1, 0.1], [0.3, NAN, 0.3, 0.3], [0.0, 1.0, 0.0, 1.0]])
    adv = compute_advantages(rewards, name)
    assert torch.equal(adv[:2], torch.zeros(2, 4))
    assert (adv[2] != 0).all()


@pytest.mark.parametrize("name", ALL)
def test_groups_with_fewer_than_two_valid_rewards_get_zero(name):
    rewards = torch.tensor([[NAN, 1.0, NAN], [NAN, NAN, NAN], [0.0, 1.0, 2.0]])
    adv = compute_advantages(rewards, name)
    assert torch.equal(adv[:2], torch.zeros(2, 3))  # no NaN leaks out


@pytest.mark.parametrize(
    "values, signal",
    [
        ([0.0, 1.0, 0.0, 1.0], True),
        ([1.0, None, 0.0, None], True),  # two valid rewards that differ
        ([0.1, 0.1, 0.1, 0.1], False),  # all equal
        ([0.3, None, 0.3, 0.3], False),  # the valid ones all equal
        ([None, 1.0, None, None], False),  # one valid reward: nothing to compare it with
        ([None, None, None, None], False),
        # Distinct as float64 but equal as float32 (2**-30 is below float32's 2**-23 spacing at
        # 1.0): the advantage sees float32 rewards and gives this group 0, so it has no signal.
        ([1.0, 1.0 + 2**-30], False),
    ],
)
def test_a_group_has_signal_with_two_valid_rewards_that_differ(values, signal):
    assert group_has_signal(values) is signal
    rewards = torch.tensor([[NAN if v is None else v for v in values]], dtype=torch.float32)
    assert has_signal(rewards).tolist() == [signal]
    # The definition the estimators use: a group without signal gets exactly 0, one with gets some.
    assert bool((compute_advantages(rewards, "grpo") != 0).any()) is signal


def test_an_empty_group_is_refused():
    with pytest.raises(ValueError, match="at least one completion"):
        group_has_signal([])


def test_valid_mask_marks_non_nan():
    assert valid_mask(torch.tensor([[1.0, NAN, 0.0]])).tolist() == [[True, False, True]]


def test_grpo_by_hand_with_nan_excluded():
    # Valid [1, 0, 1]: mean 2/3, centred [1/3, -2/3, 1/3], sum of squares 6/9 = 2/3,
    # sample variance (2/3)/(3-1) = 1/3, std 1/sqrt(3).
    # Advantages: (1/3)*sqrt(3) = 1/sqrt(3) = 0.57735, (-2/3)*sqrt(3) = -1.154701; NaN -> 0.
    adv = compute_advantages(torch.tensor([[1.0, 0.0, NAN, 1.0]]), "grpo", eps=0.0)
    s = 1 / math.sqrt(3)
    assert torch.allclose(adv, torch.tensor([[s, -2 * s, 0.0, s]]), atol=1e-6)


def test_grpo_adds_eps_to_the_std():
    # [0, 2]: mean 1, centred [-1, 1], sample var 2/1, std sqrt(2) = 1.414214;
    # eps 0.5 -> +-1 / 1.914214 = +-0.522408.
    adv = compute_advantages(torch.tensor([[0.0, 2.0]]), "grpo", eps=0.5)
    assert torch.allclose(adv, torch.tensor([[-0.522408, 0.522408]]), atol=1e-6)


def test_dr_grpo_by_hand():
    # Valid [1, 0, 1]: mean 2/3 -> [1/3, -2/3, 0 (NaN), 1/3]; no division by the std.
    adv = compute_advantages(torch.tensor([[1.0, 0.0, NAN, 1.0]]), "dr_grpo")
    assert torch.allclose(adv, torch.tensor([[1 / 3, -2 / 3, 0.0, 1 / 3]]), atol=1e-6)


def test_rloo_by_hand():
    # [3, 1, 2, 6]: 3 - (1+2+6)/3 = 0; 1 - 11/3 = -8/3; 2 - 10/3 = -4/3; 6 - 6/3 = 4.
    # [1, 0, NaN, 1] (others among the valid only): 1 - (0+1)/2 = 0.5; 0 - (1+1)/2 = -1; 0.5.
    rewards = torch.tensor([[3.0, 1.0, 2.0, 6.0], [1.0, 0.0, NAN, 1.0]])
    adv = compute_advantages(rewards, "rloo")
    expected = torch.tensor([[0.0, -8 / 3, -4 / 3, 4.0], [0.5, -1.0, 0.0, 0.5]])
    assert torch.allclose(adv, expected, atol=1e-6)


def test_reinforce_pp_by_hand():
    # Group-centred: g0 [1, 0, NaN, 1] -> [1/3, -2/3, -, 1/3]; g1 [0, 2, 4, 2] (mean 2) ->
    # [-2, 0, 2, 0]; g2 all 5 -> zeros (valid, so they count in the batch std).
    # 11 valid entries, batch mean 0, sum of squares 1/9 + 4/9 + 1/9 + 4 + 4 = 26/3,
    # sample var (26/3)/10 = 26/30, std 0.930949. Each centred value is divided by it.
    rewards = torch.tensor([[1.0, 0.0, NAN, 1.0], [0.0, 2.0, 4.0, 2.0], [5.0, 5.0, 5.0, 5.0]])
    adv = compute_advantages(rewards, "reinforce_pp", eps=0.0)
    std = math.sqrt(26 / 30)
    centred = torch.tensor([[1 / 3, -2 / 3, 0.0, 1 / 3], [-2.0, 0.0, 2.0, 0.0], [0.0] * 4])
    assert torch.allclose(adv, centred / std, atol=1e-6)
    # e.g. 2 / 0.930949 = 2.148345: one batch-wide scale, unlike grpo's per-group std.
    assert adv[1, 2].item() == pytest.approx(2.148345, abs=1e-6)


def test_unknown_estimator_lists_the_known_names():
    with pytest.raises(UnknownNameError, match="dr_grpo, grpo, reinforce_pp, rloo") as err:
        compute_advantages(torch.zeros(1, 2), "ppo")
    assert isinstance(err.value, KeyError)
    assert "'ppo'" in str(err.value)


@pytest.mark.parametrize("name", ALL)
def test_rewards_must_be_2d(name):
    with pytest.raises(ValueError, match=r"rewards must be \[G, n\]"):
        compute_advantages(torch.zeros(8), name)


def test_rewards_must_be_float():
    with pytest.raises(ValueError, match="rewards must be a float tensor"):
        compute_advantages(torch.zeros(2, 4, dtype=torch.long), "grpo")
