"""A lost learner rank costs a restart, not the run (issue 28; trainer.max_restarts).

Three in-process runs of the tiny model on the session's Ray, 4 steps, a checkpoint every step:
- straight: uninterrupted;
- restarted: once checkpoint 2 is complete, the learner rank's process is SIGKILLed as soon as it
  runs train_step (step 3): the learner group restarts, resumes from step-2 and finishes;
- bounded: trainer.max_restarts=1; the rank is killed in step 1's train_step, before any checkpoint
  (the restart goes back to the start, kept in memory), then again once checkpoint 1 is complete:
  the second loss is past the bound and stops the run, naming the rank, the stage and the key.
Equality holds for the reason resume's does (tests/test_reliability_resume.py): every source of
randomness is a function of (seed, step), and a restarted group loads the checkpoint exactly as
trainer.resume=true does at start-up (rlhf/train.py's ``resume``, the one path for both).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from rlhf.learner import LearnerError
from rlhf.learner.checkpoint import complete_checkpoints, open_checkpoint
from rlhf.train import train
from support.runs import assert_same_run, axis_reward, compose, kills, steps_logged

pytestmark = pytest.mark.slow  # three training runs and two learner restarts: ~5 minutes on 2 cores


def overrides(run_dir: Path, model_path: str, *extra: str) -> list[str]:
    return ["+experiment=tiny_smoke", f"trainer.output_dir={run_dir}", "trainer.steps=4",
            "trainer.save_every=1", "trainer.keep_last=1", "trainer.eval_prompts=0",
            "trainer.tensorboard=false", "rollout.top_k=8", "learner.lr=5e-3", axis_reward(model_path), *extra]


def train_with_kills(run_dir: Path, model_path: str, markers: list, *extra: str) -> tuple[Path | None, str | None, int]:
    """Train, SIGKILLing the learner rank's train_step once after each marker (None: at once)."""
    error = None
    with kills([(marker, "LearnerRank.train_step") for marker in markers], with_children=False) as killed:
        try:
            train(compose(*overrides(run_dir, model_path, *extra)))
        except LearnerError as e:
            error = str(e)
    return run_dir, error, len(killed)


@pytest.fixture(scope="module")
def runs(ray_session, tiny_model_path, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("restart")
    straight = train(compose(*overrides(tmp / "straight", tiny_model_path)))
    restarted = train_with_kills(tmp / "restarted", tiny_model_path,
                                 [tmp / "restarted" / "checkpoints" / "step-2" / "COMPLETE"])
    bounded = train_with_kills(tmp / "bounded", tiny_model_path,
                               [None, tmp / "bounded" / "checkpoints" / "step-1" / "COMPLETE"],
                               "trainer.max_restarts=1")
    return straight, restarted, bounded


def test_a_killed_rank_restarts_the_group_and_the_run_finishes(runs):
    _, (run_dir, error, killed), _ = runs
    assert error is None and killed == 1
    steps = steps_logged(run_dir)
    assert sorted(steps) == [1, 2, 3, 4]
    # Killed in step 3's train_step, before step 3 was logged: from the resumed step 3 on, every
    # step counts the restart so far and the seconds it cost (the redone part of step 3 and the
    # restart: > 0); steps 1 and 2 were logged before it.
    assert [steps[s]["faults/learner_restarts"] for s in (1, 2, 3, 4)] == [0.0, 0.0, 1.0, 1.0]
    assert steps[2]["faults/learner_seconds_lost"] == 0 and steps[3]["faults/learner_seconds_lost"] > 0
    assert steps[4]["faults/learner_seconds_lost"] == steps[3]["faults/learner_seconds_lost"]


def test_the_restarted_run_equals_the_uninterrupted_one(runs):
    (straight, (restarted, _, _), _) = runs
    assert_same_run(straight, restarted, (1, 2, 3, 4), ("loss", "reward/mean", "grad_norm", "lr", "response_length/mean"))
    # Real updates were compared: a run whose weights never moved would pass the equality trivially.
    assert sum(steps_logged(straight)[s]["grad_norm"] > 0 for s in (1, 2, 3, 4)) >= 2


def test_a_restart_before_the_first_checkpoint_goes_back_to_the_start(runs):
    straight, _, (bounded, _, _) = runs
    a, b = steps_logged(straight), steps_logged(bounded)
    # Killed in step 1, nothing saved yet: the run went back to step 0 (data, RNG and weights as
    # they were at the start) and its step 1 is the straight run's, update for update.
    assert b[1]["faults/learner_restarts"] == 1.0
    for key in ("loss", "reward/mean", "grad_norm", "lr"):
        assert b[1][key] == a[1][key], (key, a[1][key], b[1][key])


def test_past_max_restarts_the_run_stops_naming_rank_stage_and_key(runs):
    _, _, (bounded, error, killed) = runs
    assert killed == 2
    assert error is not None
    assert "learner rank 0" in error and "train_step" in error, error
    assert "trainer.max_restarts=1" in error and str(bounded / "checkpoints") in error, error
    # Step 1's checkpoint (after the restart) was complete before the second kill and still verifies.
    assert [step for step, _ in complete_checkpoints(bounded / "checkpoints")] == [1]
    assert open_checkpoint(bounded / "checkpoints" / "step-1")["step"] == 1
