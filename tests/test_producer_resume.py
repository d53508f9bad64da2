"""Saved batches checked against the resumed run's trainer.max_staleness (rlhf/experience/producer.py): those it
no longer admits are regenerated on their saved prompts by the weights of the step that asks for
them. A fake produce() records each call; no engines."""

from __future__ import annotations

import json

from rlhf.experience.producer import Collected, RolloutProducer, regenerate_note, stale_batches
from rlhf.experience.prompts import PromptItem
from test_producer import batch, drive


def saved(step: int, version: int) -> Collected:
    """A batch as read back from client_state.json, with a prompt that names its step."""
    b = batch(step, version)
    b.items = [PromptItem(prompt_ids=[step], prompt_text=f"p{step}", raw_prompt=f"p{step}", columns={})]
    return Collected.from_json(json.loads(json.dumps(b.to_json())))


def resume(restored: list[Collected], ahead: int, first: int, steps: int):
    """The loop's calls after a resume at ``first``; returns what each step trained on, (step,
    version), the calls produce() got, (step, version, prompt ids or None), and the stale batches."""
    calls = []

    def produce(step, version, prompts=None):
        calls.append((step, version, None if prompts is None else [p.prompt_ids for p in prompts]))
        return batch(step, version)

    trained = drive(ahead, steps, first, restored, produce=produce)
    return trained, calls, stale_batches(restored, ahead)


def test_restore_returns_the_batches_it_will_regenerate():
    producer = RolloutProducer(batch, first_step=2, last_step=5)
    stale = producer.restore([saved(2, 0), saved(3, 0)], max_staleness=1)
    producer.close()
    assert [b.step for b in stale] == [3]  # 3 - 1 - 0 = 2 > 1; batch 2 is 2 - 1 - 0 = 1 stale


def test_staleness_is_measured_against_the_step_that_trains_the_batch():
    # Batch 4 sampled after update 2 meets the weights after update 3: 4 - 1 - 2 = 1 update stale.
    b = saved(4, 2)
    assert stale_batches([b], max_staleness=0) == [b]
    assert stale_batches([b], max_staleness=1) == []


def test_a_batch_saved_one_ahead_is_regenerated_when_resumed_synchronously():
    # Checkpoint after step 3 of a max_staleness=1 run holds batch 4 (update 2); resumed with 0, step 4
    # asks for it with the weights after update 3 and its saved prompt [4], drawing nothing new.
    trained, calls, stale = resume([saved(4, 2)], ahead=0, first=4, steps=6)
    assert [b.step for b in stale] == [4]
    assert calls == [(4, 3, [[4]]), (5, 4, None), (6, 5, None)]
    assert [s - 1 - v for s, v in trained] == [0, 0, 0]  # every step on-policy, as max_staleness=0 says


def test_lowering_two_to_one_keeps_what_one_admits_and_regenerates_the_rest():
    # Saved after step 1 of a max_staleness=2 run: batches 2 and 3, both sampled by update 0
    # (staleness when trained: 2 - 1 - 0 = 1 and 3 - 1 - 0 = 2). With 1, batch 2 is kept as saved and
    # batch 3 is regenerated when step 2 asks one ahead, by update 1: staleness 3 - 1 - 1 = 1.
    trained, calls, stale = resume([saved(2, 0), saved(3, 0)], ahead=1, first=2, steps=5)
    assert [b.step for b in stale] == [3]
    assert calls == [(3, 1, [[3]]), (4, 2, None), (5, 3, None)]
    assert trained == [(2, 0), (3, 1), (4, 2), (5, 3)]


def test_batches_the_new_limit_admits_are_trained_as_saved():
    # Raising or keeping max_staleness regenerates nothing: batch 4 (update 2) is trained as saved.
    for ahead in (1, 2):
        trained, calls, stale = resume([saved(4, 2)], ahead=ahead, first=4, steps=5)
        assert stale == [] and trained[0] == (4, 2) and all(c[2] is None for c in calls)


def test_the_resume_note_names_the_key_the_batches_and_the_seeds():
    note = regenerate_note([saved(4, 2)], max_staleness=0)
    assert note.startswith("resume: trainer.max_staleness=0 does not admit 1 batch(es) saved in the checkpoint: "
                           "step 4 (sampled after update 2, 1 update(s) stale)")
    assert "seeded from (rollout.seed, step, draw)" in note and "async/regenerated=1" in note
