"""Rollouts + advantages -> padded TrainBatch; mini-batch splits; evaluation and plan arithmetic."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf.experience.batching import build_train_batch, mini_batches, rewards_matrix
from rlhf.experience.heldout import summarise
from rlhf.types import Completion, RolloutBatch, Segment


def completion(i: int, prompt: list[int], out: list[int]) -> Completion:
    return Completion(prompt_index=i, prompt_ids=prompt, completion_ids=out,
                      logprobs=[-1.0] * len(out), finish_reason="stop", text="")


def test_rewards_matrix_groups_and_marks_failed_rewards_nan():
    m = rewards_matrix([1.0, None, 0.0, 0.5], n=2)
    assert m.shape == (2, 2)
    assert m[0, 0] == 1.0 and math.isnan(m[0, 1]) and m[1, 1] == 0.5


def test_rewards_matrix_rejects_ragged_groups():
    with pytest.raises(ValueError, match="n=3"):
        rewards_matrix([1.0, 0.0], n=3)


def test_build_train_batch_pads_and_masks_completion_tokens():
    # Prompt [5, 6] with completions [7] and [8, 9]: sequences [5,6,7] and [5,6,8,9], padded to 4.
    rollouts = RolloutBatch(completions=[completion(0, [5, 6], [7]), completion(0, [5, 6], [8, 9])], n=2)
    adv = torch.tensor([[0.5, -0.5]])
    rewards = torch.tensor([[1.0, float("nan")]])
    b = build_train_batch(rollouts, adv, rewards, pad_id=0)
    assert b.input_ids.tolist() == [[5, 6, 7, 0], [5, 6, 8, 9]]
    assert b.attention_mask.tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    assert b.response_mask.tolist() == [[0, 0, 1, 0], [0, 0, 1, 1]]
    assert b.advantages.tolist() == [0.5, -0.5]
    # The NaN reward's row carries no loss weight.
    assert b.sample_weight.tolist() == [1.0, 0.0]


def test_an_episodes_earlier_segment_is_a_row_of_its_own_with_the_episodes_advantage():
    # Episode 0 rewrote its history once: segment [1,2] -> [3] (mask 1), then its last segment
    # [1,4] -> [5, 6, 7] with 6 an appended (tool) token. Episode 1 is one segment [1,2] -> [8].
    first = completion(0, [1, 4], [5, 6, 7])
    first.token_mask = [1, 0, 1]
    first.segments = [Segment(prompt_ids=[1, 2], completion_ids=[3], logprobs=[-0.5])]
    rollouts = RolloutBatch(completions=[first, completion(0, [1, 2], [8])], n=2)
    adv, rewards = torch.tensor([[0.7, -0.7]]), torch.tensor([[1.0, 0.0]])
    # 3 rows; row_multiple=2 (e.g. 2 learner ranks) pads a 4th, a copy of the shortest row
    # (row 0, one token; ties go to the first) with advantage 0 and weight 0.
    b = build_train_batch(rollouts, adv, rewards, pad_id=0, row_multiple=2)
    assert b.input_ids.tolist() == [[1, 2, 3, 0, 0], [1, 4, 5, 6, 7], [1, 2, 8, 0, 0], [1, 2, 3, 0, 0]]
    assert b.response_mask.tolist() == [[0, 0, 1, 0, 0], [0, 0, 1, 0, 1], [0, 0, 1, 0, 0], [0, 0, 1, 0, 0]]
    assert b.advantages.tolist() == pytest.approx([0.7, 0.7, -0.7, 0.0])
    assert b.sample_weight.tolist() == [1.0, 1.0, 1.0, 0.0]
    # The segment's sampler log-prob sits on its token; the appended token's is zeroed.
    assert b.sampler_logprobs[0, 2].item() == -0.5 and b.sampler_logprobs[1, 3].item() == 0.0


def test_segments_survive_a_checkpoints_json():
    from dataclasses import asdict

    c = completion(0, [1], [2])
    c.segments = [Segment(prompt_ids=[1], completion_ids=[3, 4], logprobs=[-1.0, 0.0], token_mask=[1, 0])]
    back = Completion(**asdict(c))
    assert back.segments == c.segments and isinstance(back.segments[0], Segment)
    # Sampled tokens: 1 of its own, 1 of the segment's (the masked one was appended, not sampled).
    assert back.sampled_tokens == 2


def test_build_train_batch_rejects_wrong_advantage_count():
    rollouts = RolloutBatch(completions=[completion(0, [1], [2])], n=1)
    with pytest.raises(ValueError, match="2 advantages for 1 completions"):
        build_train_batch(rollouts, torch.zeros(1, 2), torch.zeros(1, 2), pad_id=0)


def test_mini_batches_partition_rows_exactly_once():
    rollouts = RolloutBatch(completions=[completion(0, [1], [i + 2]) for i in range(8)], n=8)
    b = build_train_batch(rollouts, torch.arange(8.0).view(1, 8), torch.zeros(1, 8), pad_id=0)
    parts = mini_batches(b, 4, seed=0)
    assert [p.size for p in parts] == [2, 2, 2, 2]
    seen = sorted(int(v) for p in parts for v in p.advantages)
    assert seen == list(range(8))
    with pytest.raises(ValueError, match="3 mini-batches"):
        mini_batches(b, 3, seed=0)


def test_eval_summary_accuracy_stderr_and_pass_at_k():
    # Prompt A: 2/4 correct, prompt B: 0/4, prompt C: 4/4 -> per-prompt 0.5, 0, 1; accuracy 0.5.
    # Sample variance over prompts: ((0)^2 + 0.5^2 + 0.5^2) / 2 = 0.25 -> stderr sqrt(0.25/3) = 0.288675.
    # pass@4: prompts A and C have a correct sample -> 2/3.
    correct = [[True, False, True, False], [False] * 4, [True] * 4]
    rewards = [1.0, 0.0, 1.0, 0.0] + [0.0] * 4 + [1.0] * 3 + [None]
    r = summarise(correct, rewards, lengths=[10] * 12)
    assert r.accuracy == pytest.approx(0.5)
    assert r.accuracy_stderr == pytest.approx(math.sqrt(0.25 / 3), abs=1e-9)
    assert r.pass_at_k == pytest.approx(2 / 3)
    assert r.reward_mean == pytest.approx(5 / 11)  # 2 + 3 ones over 11 valid rewards (one None)
    assert r.k == 4 and r.response_length == 10


def test_eval_summary_leaves_unscored_samples_out():
    # Prompt A: [True, None, False] -> 1/2 scored correct; prompt B: [None, None, None] -> not scored,
    # so not a prompt of the accuracy; prompt C: [True, True, None] -> 1. Accuracy (0.5 + 1) / 2 = 0.75,
    # sample variance ((0.25)^2 * 2) / 1 = 0.125 -> stderr sqrt(0.125 / 2) = 0.25; pass@3 2/2; 5 failures.
    correct = [[True, None, False], [None] * 3, [True, True, None]]
    rewards = [1.0, None, 0.0, None, None, None, 1.0, 1.0, None]
    r = summarise(correct, rewards, lengths=[4] * 9)
    assert r.accuracy == pytest.approx(0.75)
    assert r.accuracy_stderr == pytest.approx(0.25)
    assert (r.pass_at_k, r.num_prompts, r.failures) == (1.0, 2, 5)
    assert r.reward_mean == pytest.approx(3 / 4)


def test_eval_summary_with_nothing_scored_is_nan_not_zero():
    r = summarise([[None, None]], [None, None], lengths=[1, 1])
    assert math.isnan(r.accuracy) and math.isnan(r.pass_at_k) and r.failures == 2
