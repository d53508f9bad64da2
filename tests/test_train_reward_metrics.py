"""rlhf.experience.scoring.reward_metrics: frac_reward_zero_std counts the groups without signal, as the
advantage estimators and dynamic sampling define it (rlhf.algo.group_has_signal)."""

from __future__ import annotations

import pytest

from rlhf.experience.scoring import reward_metrics
from rlhf.types import Completion, Scores


def _completions(count: int) -> list[Completion]:
    return [Completion(prompt_index=i, prompt_ids=[1], completion_ids=[2, 3], logprobs=[-1.0, -1.0],
                       finish_reason="stop", text="x") for i in range(count)]


def test_zero_std_counts_the_groups_without_signal():
    total = [
        0.0, 1.0,  # differ: signal
        1.0, None,  # one valid reward: no signal
        None, None,  # none valid: no signal
        1.0, 1.0 + 2**-30,  # equal as float32, the advantages' dtype: no signal, advantage 0
    ]
    m = reward_metrics(Scores(total), _completions(len(total)), n=2)
    assert m["frac_reward_zero_std"] == pytest.approx(3 / 4)
    assert m["reward/none_frac"] == pytest.approx(3 / 8)
