"""Rewards that misbehave, and groups whose rewards are all equal, inside real training runs
(docs/reliability.md, points 6 and 7). The reward runner's own tests are tests/test_rewards_runner.py.

Each run is the real loop in-process (session Ray, vLLM engine, DeepSpeed rank) on the tiny model.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from rlhf.train import train
from rewards.runner import RewardError
from support.runs import ROOT, compose, reward_override, steps_logged

FLAKY = (ROOT / "tests" / "support" / "flaky_rewards.py").as_posix()


def run(tmp_path, *extra: str):
    return train(compose(
        "+experiment=tiny_smoke", f"trainer.output_dir={tmp_path / 'run'}", "trainer.eval_prompts=0",
        "trainer.tensorboard=false", "learner.lr=1e-2", *extra,
    ))


@pytest.fixture(scope="module")
def flaky_run(ray_session, tmp_path_factory):
    """2 steps, reward `flaky`: 1.0 for every completion, except per step one raise, one NaN and
    one hang past reward.timeout_s=1 (tests/support/flaky_rewards.py)."""
    tmp = tmp_path_factory.mktemp("flaky")
    return run(tmp, "reward.timeout_s=1", reward_override(f"{FLAKY}:flaky", hang_s=20.0))


def test_hang_raise_and_nan_become_counted_nones(flaky_run):
    steps = steps_logged(flaky_run)
    assert sorted(steps) == [1, 2]  # the run went on
    for m in steps.values():
        assert m["reward/flaky/failures"] == 2  # the raise and the NaN
        assert m["reward/flaky/timeouts"] == 1  # the hang, cut at reward.timeout_s
        assert m["reward/none_frac"] == pytest.approx(3 / 16)  # 3 of 4 prompts x 4 samples
        assert m["reward/mean"] == 1.0  # the Nones are left out, never counted as 0


def test_equal_rewards_give_zero_advantages_a_zero_loss_and_no_update(flaky_run, tiny_model_path):
    # Every valid reward in every group is 1.0: advantage (1 - 1) / (0 + eps) = 0 exactly, so the
    # loss and every gradient are exactly 0, and AdamW (weight_decay 0) moves nothing:
    # m = v = 0, update = lr * 0 / (sqrt(0) + eps) = 0.
    for m in steps_logged(flaky_run).values():
        assert m["frac_reward_zero_std"] == 1.0
        assert m["loss"] == 0.0 and m["grad_norm"] == 0.0
        assert m["skipped"] == 0.0  # a zero loss is finite: the update ran and changed nothing
    before = load_file(f"{tiny_model_path}/model.safetensors")
    after = load_file(str(flaky_run / "export" / "model.safetensors"))
    for name in before:
        assert torch.equal(before[name], after[name]), name


def test_a_reward_returning_the_wrong_length_stops_the_run_naming_it(ray_session, tmp_path):
    with pytest.raises(RewardError, match=r"reward 'one_short' .* returned 15 values for 16 completions"):
        run(tmp_path, reward_override(f"{FLAKY}:one_short"))
    assert steps_logged(tmp_path / "run") == {}  # nothing was trained on its output


def test_too_many_failures_stop_the_run_naming_the_function_and_an_input(ray_session, tmp_path):
    with pytest.raises(RewardError) as err:
        run(tmp_path, reward_override(f"{FLAKY}:always_raises"))
    message = str(err.value)
    assert "reward 'always_raises'" in message and "failed on 16/16 completions" in message
    assert "reward.max_failure_rate=0.5" in message
    assert "KeyError" in message and "Input: prompt='What is" in message
    assert steps_logged(tmp_path / "run") == {}
