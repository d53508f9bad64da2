"""Group-relative advantage estimators: rewards [G, n] (G prompts x n samples) -> advantages [G, n].

Rewards may hold NaN where a reward is missing (a reward function returned None). Rules shared by
every estimator:
- NaN entries are left out of their group's statistics and get advantage 0.
- A group with fewer than 2 valid rewards, or whose valid rewards are all equal, gets exactly 0.0
  (it carries no learning signal; an ``eps`` in a denominator must not turn it into noise).
- Standard deviations are the sample std (Bessel's n-1), as torch.std, TRL and verl compute it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from rlhf.algo.registry import Registry
from rlhf.algo.shapes import expect_dim

ADVANTAGES: Registry = Registry("advantage estimator")


def valid_mask(rewards: Tensor) -> Tensor:
    """[G, n] bool: True where a reward is present (not NaN)."""
    return ~torch.isnan(rewards)


def _check_rewards(rewards: Tensor) -> None:
    expect_dim("rewards", rewards, 2, "[G, n] (groups x samples)")
    if not rewards.is_floating_point():
        raise ValueError(f"rewards must be a float tensor (NaN marks missing), got {rewards.dtype}")


def has_signal(rewards: Tensor) -> Tensor:
    """[G] bool from rewards [G, n]: True where a group has >= 2 valid rewards that are not all
    equal. Every estimator gives the other groups exactly 0; dynamic sampling redraws them."""
    _check_rewards(rewards)
    valid = valid_mask(rewards)
    # max > min already needs two valid rewards (none: -inf > inf; one: r > r). Compare max with
    # min rather than std with 0: the mean of equal floats may be off by an ulp.
    hi = torch.where(valid, rewards, -torch.inf).amax(dim=1)
    lo = torch.where(valid, rewards, torch.inf).amin(dim=1)
    return hi > lo


def group_has_signal(values: list[float | None]) -> bool:
    """``has_signal`` of one group given as a list (None: the reward failed).

    The rewards are compared as float32, the dtype of the advantages' [G, n] input
    (rlhf/experience/batching.py rewards_matrix), so True means exactly "this group gets nonzero advantages".
    """
    if not values:
        raise ValueError("group_has_signal: a group needs at least one completion")
    row = torch.tensor([[math.nan if v is None else float(v) for v in values]], dtype=torch.float32)
    return bool(has_signal(row)[0])


def _group_stats(rewards: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(valid [G,n], count [G,1], centred [G,n], informative [G,n]) for one batch of groups.

    centred = r - mean of the group's valid rewards (0 on NaN entries); informative marks the valid
    entries of the groups with a signal (``has_signal``).
    """
    signal = has_signal(rewards)  # checks the shape and dtype first
    valid = valid_mask(rewards)
    count = valid.sum(dim=1, keepdim=True)
    filled = torch.where(valid, rewards, 0.0)
    mean = filled.sum(dim=1, keepdim=True) / count.clamp(min=1)
    centred = torch.where(valid, rewards - mean, 0.0)
    informative = valid & signal[:, None]
    return valid, count, centred, informative


def _sample_std(centred: Tensor, count: Tensor) -> Tensor:
    return ((centred**2).sum(dim=1, keepdim=True) / (count - 1).clamp(min=1)).sqrt()


@ADVANTAGES.register("grpo")
def grpo(rewards: Tensor, *, eps: float = 1e-6) -> Tensor:
    """(r - group mean) / (group sample std + eps): the GRPO paper's outcome advantage."""
    _, count, centred, informative = _group_stats(rewards)
    return torch.where(informative, centred / (_sample_std(centred, count) + eps), 0.0)


@ADVANTAGES.register("dr_grpo")
def dr_grpo(rewards: Tensor, *, eps: float = 1e-6) -> Tensor:
    """r - group mean: Dr.GRPO drops the std division, which over-weights easy/hard prompts."""
    _, _, centred, informative = _group_stats(rewards)
    return torch.where(informative, centred, 0.0)


@ADVANTAGES.register("rloo")
def rloo(rewards: Tensor, *, eps: float = 1e-6) -> Tensor:
    """r_i - mean of the group's other valid rewards (leave-one-out baseline).

    With k valid rewards: r_i - (S - r_i)/(k-1) = k/(k-1) * (r_i - S/k).
    """
    _, count, centred, informative = _group_stats(rewards)
    return torch.where(informative, centred * count / (count - 1).clamp(min=1), 0.0)


@ADVANTAGES.register("reinforce_pp")
def reinforce_pp(rewards: Tensor, *, eps: float = 1e-6) -> Tensor:
    """REINFORCE++ with group baseline: (r - group mean) / (std over the whole batch + eps).

    The std is the sample std of the group-centred rewards over every valid entry of the batch
    (entries of uninformative groups count as 0). Their batch mean is 0 by construction, so only
    the scale changes: one normaliser for all groups keeps per-prompt difficulty in the signal.
    """
    valid, _, centred, informative = _group_stats(rewards)
    centred = torch.where(informative, centred, 0.0)
    n_valid = int(valid.sum())
    if n_valid < 2 or not bool(informative.any()):
        return torch.zeros_like(rewards)
    batch_std = centred[valid].std()
    return torch.where(informative, centred / (batch_std + eps), 0.0)


def compute_advantages(rewards: Tensor, name: str, eps: float = 1e-6) -> Tensor:
    """Advantages [G, n] from rewards [G, n] with the estimator registered as ``name``."""
    return ADVANTAGES.get(name)(rewards, eps=eps)
