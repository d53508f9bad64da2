"""Agents train through the gateway, end to end on the tiny random model (in-process, sharing the
session's Ray): the real ``rlhf.train`` path, real engines, the real openai client."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from rlhf.run.metrics import read_metrics
from rlhf.train import train
from tests.support.runs import compose

AGENTS = (Path(__file__).parent / "support" / "agents.py").as_posix()


def test_agents_of_every_kind_train_and_their_failures_are_counted(ray_session, tiny_model_path, tmp_path):
    """tests/support/agents.py dispatch: sync, async and command agents making two calls with a
    calculator result between them (returning, printing or posting their reward), and agents that raise, hang past agent.timeout_s, exit 1 or
    never call the model (PLAN: 3 errors, 1 timeout, 2 without a call over the run). Two steps
    of 4 prompts x 4 samples and two evaluations of 2 x 2 all finish."""
    cfg = compose("+experiment=tiny_smoke", f"trainer.output_dir={tmp_path / 'run'}", f"agent.name={AGENTS}:dispatch",
                  "agent.timeout_s=8", "trainer.eval_reward=agent", "trainer.eval_prompts=2", "trainer.eval_samples=2",
                  "trainer.export_at_end=false", "reward.functions=[{fn: math_answer, weight: 0.0}]")
    run_dir = train(cfg)
    lines = read_metrics(run_dir / "metrics.jsonl")
    steps = [m for m in lines if "loss" in m]
    evals = [m for m in lines if "eval/accuracy" in m]
    assert [m["step"] for m in steps] == [1, 2] and [m["step"] for m in evals] == [0, 2]
    for m in steps:
        # The calculator result the agents append between their calls is in the episode's tokens,
        # masked: had it reached the mismatch statistics, |log ratio| there would be the learner's
        # whole -log p (several nats: the tiny model is random over 49k tokens), not fp32 noise. The
        # placeholder rows of episodes without a call (weight 0) stay out of them too.
        assert m["agent/observation_tokens_mean"] > 0 and m["agent/calls_mean"] > 1
        assert m["mismatch/abs_logprob_diff_max"] < 1e-2, m["mismatch/abs_logprob_diff_max"]
        assert math.isfinite(m["loss"]) and 0.0 <= m["reward/agent/mean"] <= 1.0
        # Every episode that did not fail has a reward, posted ones included.
        assert m["agent/reward_none"] == m["agent/errors"] + m["agent/timeouts"] + m["agent/no_calls"]
        # Every call of the step's 16 episodes went through the gateway, batched with the others'.
        assert m["gateway/requests"] >= 16 and m["gateway/batch_size_mean"] > 1
        # Sampled tokens only: 16 episodes x 2 calls x 8 tokens at most (tool results excluded).
        assert 0 < m["throughput/generated_tokens"] <= 16 * 2 * 8
    # The agent's reward reached the learner: a group with mixed rewards got an update.
    assert any(m["frac_reward_zero_std"] < 1.0 and m["grad_norm"] > 0 for m in steps)
    # Each failure counted once, wherever it landed (a step's batch or an evaluation's), and its row
    # scored None: the reward's None share covers at least them.
    total = {why: sum(m.get(f"agent/{why}", 0.0) for m in steps) + sum(m.get(f"eval/agent/{why}", 0.0) for m in evals)
             for why in ("errors", "timeouts", "no_calls")}
    assert total == {"errors": 3.0, "timeouts": 1.0, "no_calls": 2.0}
    failed_in_steps = sum(m[f"agent/{why}"] for m in steps for why in total)
    assert sum(m["reward/none_frac"] * 16 for m in steps) >= failed_in_steps
    assert all(0.0 <= m["eval/accuracy"] <= 1.0 or math.isnan(m["eval/accuracy"]) for m in evals)


@pytest.mark.slow
def test_calculator_agent_on_smollm2(ray_session, smollm2_path, tmp_path):
    """+experiment=calculator_agent for one step on SmolLM2-135M: the built-in agent's OpenAI tool loop
    through the gateway (tools described in the system message, SmolLM2's template having no tool
    format; its <tool_call> text parsed by vLLM's hermes parser) trains, and every metric is real."""
    cfg = compose("+experiment=calculator_agent", f"trainer.output_dir={tmp_path / 'run'}", "trainer.steps=1",
                  "trainer.prompts_per_step=4", "rollout.n=4", "trainer.eval_prompts=8", "trainer.eval_samples=2",
                  "trainer.export_at_end=false")
    run_dir = train(cfg)
    lines = read_metrics(run_dir / "metrics.jsonl")
    (step,) = [m for m in lines if "loss" in m]
    print({k: v for k, v in step.items() if k.startswith(("agent/", "gateway/", "reward/"))})
    assert 1.0 <= step["agent/calls_mean"] <= 3.0 and step["agent/errors"] == 0 and step["agent/timeouts"] == 0
    assert 0.0 <= step["reward/agent/mean"] <= 1.0
    assert step["mismatch/abs_logprob_diff_max"] < 1e-2
    assert [m["step"] for m in lines if "eval/accuracy" in m] == [0, 1]
