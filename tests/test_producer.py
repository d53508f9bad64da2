"""The producer of asynchronous rollouts (rlhf/experience/producer.py), without engines: a fake produce()
records when each batch was asked for and with which policy version."""

from __future__ import annotations

import json
import threading

import pytest

from rlhf.experience.producer import Collected, RolloutProducer
from rlhf.experience.prompts import PromptItem
from rlhf.types import Completion, Scores


def batch(step: int, version: int) -> Collected:
    item = PromptItem(prompt_ids=[1, 2], prompt_text="p", raw_prompt="p", columns={"answer": "3"})
    done = Completion(prompt_index=0, prompt_ids=[1, 2], completion_ids=[5], logprobs=[-0.5],
                      finish_reason="stop", text="x", policy_version=version)
    return Collected(step, version, [item], [done, done], Scores([1.0, None], {"r": [1.0, None]}), 2,
                     {"timing/generate": 0.1})


def drive(ahead: int, steps: int, first: int = 1, restored=(), produce=batch):
    """The loop's calls, with the engines' version = steps trained so far; returns what each step
    trained on: (step, policy_version)."""
    producer = RolloutProducer(produce, first_step=first, last_step=steps)
    producer.restore(list(restored), max_staleness=ahead)
    trained = []
    for step in range(first, steps + 1):
        producer.ask(upto_step=step + ahead, policy_version=step - 1)
        got = producer.take(step)
        trained.append((got.step, got.policy_version))
        producer.wait()
    producer.close()
    return trained


def test_synchronous_loop_samples_each_batch_with_the_newest_weights():
    assert drive(ahead=0, steps=4) == [(1, 0), (2, 1), (3, 2), (4, 3)]


def test_one_step_ahead_the_batch_of_step_t_comes_from_update_t_minus_2():
    # Step 1 asks for batches 1 and 2 while the engines hold update 0; step 2 asks for 3 (update 1)...
    # staleness (step - 1 - version) is 0 at step 1 and exactly 1 afterwards, never more.
    trained = drive(ahead=1, steps=5)
    assert trained == [(1, 0), (2, 0), (3, 1), (4, 2), (5, 3)]
    assert max(s - 1 - v for s, v in trained) == 1


def test_k_ahead_bounds_staleness_by_k():
    for k in (2, 3):
        trained = drive(ahead=k, steps=7)
        staleness = [s - 1 - v for s, v in trained]
        assert max(staleness) == k and staleness[:k] == list(range(k)), (k, staleness)


def test_a_resumed_run_takes_the_saved_batches_first():
    # Saved after step 2 with k = 1: batch 3 (sampled by update 1) was in the checkpoint.
    saved = Collected.from_json(json.loads(json.dumps(batch(3, 1).to_json())))
    assert drive(ahead=1, steps=5, first=3, restored=[saved]) == [(3, 1), (4, 2), (5, 3)]
    assert drive(ahead=1, steps=5) [2:] == [(3, 1), (4, 2), (5, 3)]  # as the uninterrupted run


def test_collected_round_trips_through_json():
    b = batch(4, 2)
    again = Collected.from_json(json.loads(json.dumps(b.to_json())))
    assert again == b and again.completions[0].policy_version == 2


def test_a_checkpoint_with_scores_per_group_still_resumes():
    # Checkpoints written before typed scores hold them as one [total, {fn: values}] pair per kept
    # group. Two groups of n=2: totals [1.0, None] and [0.0, 0.5] read as the step's four rows in
    # group order, [1.0, None, 0.0, 0.5], and every function's values the same way.
    b = batch(4, 2)
    b.items = b.items * 2
    b.completions = b.completions * 2
    b.scores = Scores([1.0, None, 0.0, 0.5], {"r": [1.0, None, 0.0, 0.5], "len": [0.1, 0.2, 0.3, 0.4]})
    old = json.loads(json.dumps(b.to_json()))
    old["scores"] = json.loads('[[[1.0, null], {"r": [1.0, null], "len": [0.1, 0.2]}],'
                               ' [[0.0, 0.5], {"r": [0.0, 0.5], "len": [0.3, 0.4]}]]')
    resumed = Collected.from_json(old)
    assert resumed == b
    # Saved again, it is written in today's format and reads back the same.
    assert json.loads(json.dumps(resumed.to_json()))["scores"] == {
        "total": [1.0, None, 0.0, 0.5], "per_fn": {"r": [1.0, None, 0.0, 0.5], "len": [0.1, 0.2, 0.3, 0.4]}}
    assert Collected.from_json(json.loads(json.dumps(resumed.to_json()))) == b


def test_scores_slice_by_group_and_join_in_order():
    s = Scores([1.0, None, 0.0, 0.5], {"r": [1.0, None, 0.0, 0.5]})
    first, second = s.rows(0, 2), s.rows(2, 4)
    assert first == Scores([1.0, None], {"r": [1.0, None]}) and Scores.concat([first, second]) == s
    assert Scores.concat([]) == Scores([], {})
    with pytest.raises(ValueError, match=r"scores part 1 has the reward functions \['q'\], part 0 has \['r'\]"):
        Scores.concat([first, Scores([0.0], {"q": [0.0]})])


def test_a_failed_batch_raises_where_it_is_taken_or_waited_for():
    def produce(step, version):
        if step == 2:
            raise RuntimeError("rollout engine 0 died during generate")
        return batch(step, version)

    producer = RolloutProducer(produce, first_step=1, last_step=3)
    producer.ask(upto_step=2, policy_version=0)
    assert producer.take(1).step == 1
    with pytest.raises(RuntimeError, match="engine 0 died"):
        producer.wait()
    with pytest.raises(RuntimeError, match="engine 0 died"):
        producer.take(2)
    producer.close()


def test_batches_are_produced_in_one_thread_in_step_order():
    seen, threads = [], set()

    def produce(step, version):
        seen.append(step)
        threads.add(threading.get_ident())
        return batch(step, version)

    producer = RolloutProducer(produce, first_step=1, last_step=6)
    producer.ask(upto_step=6, policy_version=0)
    assert [b.step for b in producer.pending()] == [1, 2, 3, 4, 5, 6]
    assert seen == [1, 2, 3, 4, 5, 6] and len(threads) == 1 and threading.get_ident() not in threads
    with pytest.raises(RuntimeError, match="step 9 was never asked for"):
        producer.take(9)
    producer.close()
