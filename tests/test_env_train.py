"""The training loop with a 2-turn environment, end to end on the tiny random model (in-process,
sharing the session's Ray), and the calculator environment on SmolLM2 (slow)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from rlhf.eval import run_eval
from rlhf.run.metrics import read_metrics
from rlhf.train import train
from tests.support.runs import axis_reward, compose

ENVS = (Path(__file__).parent / "support" / "envs.py").as_posix()


def test_two_turn_environment_trains_with_observation_tokens_masked(ray_session, tiny_model_path, tmp_path):
    cfg = compose("+experiment=tiny_smoke", f"trainer.output_dir={tmp_path / 'run'}", f"env.name={ENVS}:TwoTurn",
                  "env.max_turns=2", "env.max_total_tokens=64", "env.reward_weight=1.0", "trainer.eval_reward=env",
                  axis_reward(tiny_model_path))
    run_dir = train(cfg)
    lines = read_metrics(run_dir / "metrics.jsonl")
    steps = [m for m in lines if "loss" in m]
    assert [m["step"] for m in steps] == [1, 2]
    for m in steps:
        # Every trajectory: model turn (16 tokens at most) -> TwoTurn's observation -> model turn.
        assert m["env/turns_mean"] == 2.0 and m["env/observation_tokens_mean"] > 0
        assert m["env/step_errors"] == 0 and m["env/reward_none"] == 0
        assert 0.0 <= m["reward/env/mean"] <= 1.0
        # Observation tokens carry sampler log-prob 0; had any reached the mismatch statistics,
        # |log ratio| there would be the learner's full -log p (several nats, since the tiny model is
        # random over 49k tokens), not the fp32 kernel noise of model tokens.
        assert m["mismatch/abs_logprob_diff_max"] < 1e-2, m["mismatch/abs_logprob_diff_max"]
        assert math.isfinite(m["loss"])
        # Sampled tokens only: 4 prompts x 4 samples x 2 turns x 16 tokens at most.
        assert 0 < m["throughput/generated_tokens"] <= 4 * 4 * 2 * 16
    evals = [m for m in lines if "eval/accuracy" in m]
    assert [m["step"] for m in evals] == [0, 2] and all(m["eval/env/turns_mean"] == 2.0 for m in evals)


def test_guess_rewarding_only_success_trains_on_nonzero_advantages(ray_session, tiny_model_path, tmp_path):
    """The README's Guess rewards only success. Its misses end at max_turns unrewarded: they score
    env.unfinished_reward (0.0) instead of leaving their group, so a group with hits and misses has
    advantages, and no step stops for want of a rewarded row. The answers are letters the random
    tiny model writes in about half its trajectories ("x" is in 2.1% of the vocabulary's tokens:
    1 - 0.979^32 = 0.49 for 2 turns of 16 tokens, were it sampling uniformly)."""
    rows = "".join(json.dumps({"prompt": f"Write the letter {a}.", "answer": a}) + "\n" for a in "xzxzxzxz")
    (tmp_path / "letters.jsonl").write_text(rows)
    cfg = compose("+experiment=tiny_smoke", f"trainer.output_dir={tmp_path / 'run'}", f"env.name={ENVS}:Guess",
                  "env.max_turns=2", "env.max_total_tokens=64", "trainer.eval_reward=env",
                  "reward.functions=[{fn: math_answer, weight: 0.0}]",
                  "data=files", f"data.path={tmp_path / 'letters.jsonl'}", f"data.eval_path={tmp_path / 'letters.jsonl'}")
    run_dir = train(cfg)
    lines = read_metrics(run_dir / "metrics.jsonl")
    steps = [m for m in lines if "loss" in m]
    assert [m["step"] for m in steps] == [1, 2]
    for m in steps:
        # 4 prompts x 4 samples: each is a hit (1.0) or unfinished at max_turns (0.0); none is None.
        missed = m["env/unfinished/max_turns"]
        assert m["reward/env/mean"] == pytest.approx((16 - missed) / 16, abs=1e-9)
        assert m["env/reward_none"] == 0 and m["reward/none_frac"] == 0 and math.isfinite(m["loss"])
    # At least one group of the 8 mixed hits and misses: it got nonzero advantages, and the update
    # they make is not empty (with every advantage 0 the first step's gradient would be 0: the
    # policy is the reference and the sampler then, ratio 1).
    assert min(m["frac_reward_zero_std"] for m in steps) < 1.0, [m["frac_reward_zero_std"] for m in steps]
    assert all(m["grad_norm"] > 0 for m in steps if m["frac_reward_zero_std"] < 1.0)
    assert 0 < sum(m["env/unfinished/max_turns"] for m in steps) < 32
    # Evaluation (4 prompts x 2 samples): an unfinished episode is wrong, not a failure, so the
    # accuracy is (8 - unfinished) / 8.
    for m in [m for m in lines if "eval/accuracy" in m]:
        assert m["eval/failures"] == 0 and m["eval/accuracy"] == pytest.approx((8 - m["eval/unfinished"]) / 8)


def test_eval_cli_runs_the_environment_and_reads_its_reward(ray_session, tiny_model_path, tmp_path):
    """``python -m rlhf.eval`` with TwoTurn: 3 prompts x 2 samples, every one 2 turns; accuracy is
    the env reward's (TwoTurn gives 0 or 1, never None, so nothing is left unscored)."""
    cfg = compose("+experiment=tiny_smoke", f"model.name_or_path={tiny_model_path}", "trainer.eval_prompts=3",
                  "trainer.eval_samples=2", f"trainer.output_dir={tmp_path}", f"env.name={ENVS}:TwoTurn",
                  "env.max_turns=2", "env.max_total_tokens=64", "trainer.eval_reward=env")
    result = run_eval(cfg)
    assert result.reward == "env" and result.failures == 0 and result.num_prompts == 3
    assert result.reward_metrics["env/turns_mean"] == 2.0
    assert 0.0 <= result.accuracy <= 1.0


@pytest.mark.slow
def test_calculator_environment_on_smollm2(ray_session, smollm2_path, tmp_path):
    """SmolLM2-135M with the calculator on 2-term arithmetic: the run completes, tools are offered
    (the prompt describes them, SmolLM2's template having no tool format) and every metric is real."""
    cfg = compose("+experiment=calculator_arithmetic", f"trainer.output_dir={tmp_path / 'run'}",
                  "trainer.steps=1", "trainer.prompts_per_step=4", "rollout.n=4", "trainer.eval_prompts=8",
                  "trainer.eval_samples=2", "trainer.export_at_end=false")
    run_dir = train(cfg)
    lines = read_metrics(run_dir / "metrics.jsonl")
    (step,) = [m for m in lines if "loss" in m]
    assert 1.0 <= step["env/turns_mean"] <= 3.0
    assert 0.0 <= step["reward/env/mean"] <= 1.0
    assert step["mismatch/abs_logprob_diff_max"] < 1e-2
    for key in ("env/tool_calls", "env/tool_errors", "env/step_errors", "env/step_timeouts", "env/budget_stops"):
        assert key in step


@pytest.mark.slow
def test_guess_learns_on_smollm2(ray_session, smollm2_path, tmp_path):
    """The README's Guess on the demo's single-digit sums (SmolLM2, lr 2e-5): only a turn naming the
    answer is rewarded, a second try follows a miss, and a miss on both ends unfinished at 0.0.
    Held-out accuracy (the env's reward, 2 tries) rises in 2 steps, as the single-turn demo's does."""
    cfg = compose(f"trainer.output_dir={tmp_path / 'run'}", f"env.name={ENVS}:Guess", "env.max_turns=2",
                  "reward.functions=[{fn: math_answer, weight: 0.0}]", "trainer.eval_reward=env", "trainer.steps=2",
                  "trainer.eval_prompts=32", "trainer.eval_samples=4", "trainer.export_at_end=false")
    run_dir = train(cfg)
    lines = read_metrics(run_dir / "metrics.jsonl")
    steps = [m for m in lines if "loss" in m]
    assert all(m["frac_reward_zero_std"] < 1.0 and m["env/reward_none"] == 0 for m in steps)
    before, after = [m["eval/accuracy"] for m in lines if "eval/accuracy" in m]
    print(f"Guess on SmolLM2: held-out accuracy {before:.3f} -> {after:.3f}")
    assert after > before + 0.05, (before, after)
