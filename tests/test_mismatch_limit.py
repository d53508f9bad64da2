"""The sampler/learner mismatch limit (rlhf/run/mismatch.py): a step above algo.max_mismatch_kl warns, and
algo.max_mismatch_kl_steps of them in a row stop the run, with a message naming what to change.
Hand-made per-step kl_k3 sequences; no engines."""

from __future__ import annotations

import json
import math
import re

from rlhf.config.schema import AlgoConfig
from rlhf.run.mismatch import MismatchError, MismatchWatch, check_mismatch


def step_metrics(kl: float, staleness: float = 0.0) -> dict[str, float]:
    return {"mismatch/kl_k3": kl, "mismatch/abs_logprob_diff_mean": 0.2, "mismatch/abs_logprob_diff_max": 1.5,
            "mismatch/ratio_out_of_range_frac": 0.04, "async/staleness": staleness}


def run_steps(kls, algo: AlgoConfig, ckpt_dir, first: int = 1, watch: MismatchWatch | None = None,
              staleness: float = 0.0):
    """Feed one kl_k3 per step; returns (the step that stopped or None, the watch, each step's
    metrics, the stop message or None)."""
    watch, logged = watch or MismatchWatch(), []
    for step, kl in enumerate(kls, start=first):
        logged.append(m := step_metrics(kl, staleness))
        try:
            watch = check_mismatch(step, m, watch, algo, ckpt_dir)
        except MismatchError as e:
            return step, watch, logged, str(e)
    return None, watch, logged, None


def test_three_in_a_row_stop_the_run_at_the_third_not_the_first(tmp_path, capsys):
    algo = AlgoConfig(max_mismatch_kl=0.05, max_mismatch_kl_steps=3)
    # Above the limit at steps 1, 3, 4, 5; step 2 (0.01) ends the first streak, so the streak of
    # three is steps 3-5 and the run stops at step 5, not at step 1.
    stopped, _, logged, _ = run_steps([0.06, 0.01, 0.06, 0.06, 0.06], algo, tmp_path)
    assert stopped == 5
    # Violations so far: 1, 1, 2, 3, 4; the streak: 1, 0, 1, 2, 3 (logged even at the stopping step).
    assert [m["mismatch/kl_violations"] for m in logged] == [1, 1, 2, 3, 4]
    assert [m["mismatch/kl_streak"] for m in logged] == [1, 0, 1, 2, 3]
    # Each single violation before the stop is a warning with its figures: steps 1, 3 and 4.
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning:")]
    assert [re.search(r"step (\d+):", w).group(1) for w in warnings] == ["1", "3", "4"]
    assert "mismatch/kl_k3=0.06 (sampler vs learner, per token) exceeds algo.max_mismatch_kl=0.05" in warnings[0]
    assert "(1 of algo.max_mismatch_kl_steps=3 consecutive steps stop the run)" in warnings[0]


def test_a_value_equal_to_the_limit_is_not_a_violation_and_nan_is(tmp_path):
    algo = AlgoConfig(max_mismatch_kl=0.05, max_mismatch_kl_steps=2)
    assert run_steps([0.05, 0.05, 0.05], algo, tmp_path)[0] is None  # kl <= limit passes
    assert run_steps([0.05, math.nan, math.nan], algo, tmp_path)[0] == 3  # NaN is not <= 0.05


def test_one_step_stops_at_the_first_violation_and_no_limit_never_does(tmp_path):
    assert run_steps([0.01, 0.9], AlgoConfig(max_mismatch_kl=0.05, max_mismatch_kl_steps=1), tmp_path)[0] == 2
    stopped, watch, logged, _ = run_steps([0.9] * 5, AlgoConfig(max_mismatch_kl=None), tmp_path)
    # Nothing checked, so nothing counted: no counts are logged rather than a misleading 0.
    assert stopped is None and watch == MismatchWatch() and "mismatch/kl_violations" not in logged[0]


def test_a_resumed_watch_stops_where_the_uninterrupted_run_does(tmp_path):
    algo = AlgoConfig(max_mismatch_kl=0.05, max_mismatch_kl_steps=3)
    kls = [0.01, 0.07, 0.08, 0.09, 0.02]
    straight = run_steps(kls, algo, tmp_path)
    # Saved after step 3 (streak of 2: steps 2 and 3), through JSON as in client_state.json.
    _, saved, _, _ = run_steps(kls[:3], algo, tmp_path)
    assert saved.to_json() == {"streak": [[2, 0.07], [3, 0.08]], "violations": 2}
    restored = MismatchWatch.from_json(json.loads(json.dumps(saved.to_json())))
    resumed = run_steps(kls[3:], algo, tmp_path, first=4, watch=restored)
    assert straight[0] == resumed[0] == 4 and straight[1] == resumed[1]  # stops at step 4 either way
    # A checkpoint written before the watch was saved starts with no streak.
    assert MismatchWatch.from_json(None) == MismatchWatch()


def test_the_stop_message_names_the_keys_to_change_and_the_checkpoint_before_the_streak(tmp_path):
    ckpts = tmp_path / "checkpoints"
    for step in (1, 2, 4):  # complete checkpoints: a folder with its COMPLETE marker
        (ckpts / f"step-{step}").mkdir(parents=True)
        (ckpts / f"step-{step}" / "COMPLETE").write_text("{}")
    algo = AlgoConfig(max_mismatch_kl=0.05, max_mismatch_kl_steps=3, rollout_correction="tis")
    stopped, _, _, text = run_steps([0.01, 0.01, 0.06, 0.07, 0.08], algo, ckpts, staleness=1.0)
    assert stopped == 5
    assert text.startswith("step 5: mismatch/kl_k3=0.08 (sampler vs learner, per token) exceeds "
                           "algo.max_mismatch_kl=0.05; |log ratio| mean 0.2, max 1.5, 4.0% of tokens")
    assert "for 3 consecutive steps (3-5: 0.06, 0.07, 0.08; algo.max_mismatch_kl_steps=3)" in text
    # Stale batch: the keys that bound the policy's movement, then the in-step causes, then the limit.
    for key in ("learner.lr", "trainer.max_staleness", "model.dtype", "rollout.temperature",
                "rollout.logprobs_mode", "sync/probe_gap", "raise algo.max_mismatch_kl or algo.max_mismatch_kl_steps"):
        assert key in text, key
    assert "rollout_correction=tis" not in text  # a correction is already on
    # The streak began at step 3: checkpoint 2 is the last one before it (step-4 holds streak updates).
    assert f"The last checkpoint from before step 3 is {ckpts / 'step-2'}" in text


def test_an_in_step_gap_without_a_correction_suggests_one_and_says_when_no_checkpoint_precedes(tmp_path):
    algo = AlgoConfig(max_mismatch_kl=0.05, max_mismatch_kl_steps=2)
    text = run_steps([0.3, 0.3], algo, tmp_path / "checkpoints")[3]
    assert "The batch is not stale, so check that the engines sample the policy the learner trains" in text
    assert "rollout_correction=tis" in text and "learner.lr" not in text
    assert f"No checkpoint from before step 1 is kept in {tmp_path / 'checkpoints'}" in text
