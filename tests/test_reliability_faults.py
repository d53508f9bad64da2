"""Faults injected into real training runs (docs/reliability.md, points 3, 4, 5 and 6).

Each test runs the real loop in-process on the session's Ray with the tiny model, injects one
fault (a killed engine process, or a hook of rlhf/faults.py switched on by $RLHF_FAULT) and checks
that the run stops loudly, naming what failed, without training on anything it should not.
"""

from __future__ import annotations

import threading

import pytest
import torch

from rlhf.learner.checkpoint import complete_checkpoints
from rlhf.learner.group import LearnerError, WeightSyncError
from rlhf.train import train
from support.runs import axis_reward, compose, kill_descendant_running, steps_logged


def run(tmp_path, *extra: str):
    return train(compose(
        "+experiment=tiny_smoke", f"trainer.output_dir={tmp_path / 'run'}", "trainer.eval_prompts=0",
        "trainer.tensorboard=false", "rollout.top_k=8", "learner.lr=1e-2", *extra,
    ))


def test_engine_killed_past_the_restart_bound_fails_fast_naming_it(ray_session, tiny_model_path, tmp_path):
    """Point 3, past the bound (rollout.max_engine_restarts=0; a restart that recovers is in
    test_reliability_resume.py). Long generations (up to 512 new tokens from a random model) keep the
    engine in `generate` long enough to be caught there; the run must stop with the engine's name
    and the bound, and must not have trained on the interrupted batch."""
    killed: list[int] = []
    stop = threading.Event()
    # The engine actor's process (and its vLLM engine-core child) as soon as it runs `generate`.
    killer = threading.Thread(target=kill_descendant_running, args=("RolloutEngine.generate", killed, stop, True),
                              daemon=True)
    killer.start()
    try:
        with pytest.raises(RuntimeError, match=r"(?s)rollout engine 0 died during generate.*"
                                               r"\(rollout.max_engine_restarts=0: 0 restarts used\)"):
            run(tmp_path, "trainer.steps=3", "rollout.max_new_tokens=512", "rollout.max_engine_restarts=0",
                axis_reward(tiny_model_path))
    finally:
        stop.set()
        killer.join()
    assert len(killed) == 1
    # It died in the first generate: no step was trained or logged, no checkpoint written.
    assert steps_logged(tmp_path / "run") == {}
    assert complete_checkpoints(tmp_path / "run" / "checkpoints") == []


@pytest.mark.slow  # waits out a 60 s deadline: past the CI budget's share
def test_a_stalled_engine_is_declared_lost_at_its_deadline_and_replaced(ray_session, tiny_model_path, tmp_path,
                                                                        monkeypatch):
    """Point 3, health rather than death: RLHF_FAULT=engine_stall makes the first engine's generate
    never return (once: $RLHF_FAULT_ONCE's file marks that it fired, so the replacement runs normally).
    At rollout.timeout_s the engine is declared lost, replaced, and its chunk sampled again."""
    monkeypatch.setenv("RLHF_FAULT", "engine_stall")
    monkeypatch.setenv("RLHF_FAULT_ONCE", str(tmp_path / "stalled"))
    run(tmp_path, "trainer.steps=2", "rollout.timeout_s=60", axis_reward(tiny_model_path))
    steps = steps_logged(tmp_path / "run")
    assert (tmp_path / "stalled").exists()  # the stall did happen, in step 1's generate
    assert [steps[s]["faults/engine_restarts"] for s in (1, 2)] == [1.0, 1.0]
    # Lost: from the deadline to the chunk answered again (a replacement start, no weights to restore yet).
    assert steps[1]["faults/engine_seconds_lost"] > 0
    assert steps[1]["timing/generate"] >= 60  # the hang cost the deadline, then the redo


def test_stalled_learner_rank_fails_within_the_timeout_naming_the_stage(ray_session, tmp_path, monkeypatch):
    """Point 4. RLHF_FAULT=learner_stall makes the rank sleep inside train_step (as a rank stuck in
    a collective would); the group's deadline turns that into an error naming rank and stage
    (trainer.max_restarts=0: a restart would stall the same way; tests/test_reliability_restart.py)."""
    monkeypatch.setenv("RLHF_FAULT", "learner_stall")
    with pytest.raises(LearnerError, match=r"learner rank 0 did not finish train_step within 60s"):
        run(tmp_path, "trainer.steps=2", "learner.timeout_s=60", "trainer.max_restarts=0")
    assert steps_logged(tmp_path / "run") == {}


def test_skipped_weight_sync_fails_the_step_at_the_probe(ray_session, tiny_model_path, tmp_path, monkeypatch):
    """Point 5. RLHF_FAULT=skip_sync writes the weights but never loads them into the engine. After
    one update at lr 1e-2 the engine's probe log-probs are far from the learner's."""
    monkeypatch.setenv("RLHF_FAULT", "skip_sync")
    with pytest.raises(WeightSyncError, match=r"engine 0: probe log-prob gap .* exceeds rollout.probe_tolerance=0.001"):
        run(tmp_path, "trainer.steps=2", axis_reward(tiny_model_path))
    assert steps_logged(tmp_path / "run") == {}  # step 1 is not reported as a good step


def test_consecutive_nonfinite_steps_stop_the_run_and_keep_the_last_good_checkpoint(
    ray_session, tiny_model_path, tmp_path, monkeypatch
):
    """Point 6. RLHF_FAULT=nonfinite_loss@2: the rank's loss is NaN from its 2nd update on. Steps 2
    and 3 are skipped (and counted); with trainer.max_nonfinite_steps=2 the run stops at step 3."""
    monkeypatch.setenv("RLHF_FAULT", "nonfinite_loss@2")
    with pytest.raises(RuntimeError, match=r"2 consecutive steps had a non-finite loss .*max_nonfinite_steps=2"):
        run(tmp_path, "trainer.steps=5", "trainer.save_every=1", "trainer.keep_last=3",
            "trainer.max_nonfinite_steps=2", axis_reward(tiny_model_path))
    steps = steps_logged(tmp_path / "run")
    assert [steps[s]["skipped"] for s in (1, 2, 3)] == [0.0, 1.0, 1.0]
    ckpts = complete_checkpoints(tmp_path / "run" / "checkpoints")
    assert [s for s, _ in ckpts] == [1, 2]  # nothing written after the stop
    # The skipped update changed nothing: checkpoint 2 holds checkpoint 1's parameters, all finite.
    one, two = (torch.load(p / "deepspeed" / "mp_rank_00_model_states.pt", weights_only=True)["module"]
                for _, p in ckpts)
    for name in one:
        assert torch.equal(one[name], two[name]) and torch.isfinite(two[name]).all(), name
