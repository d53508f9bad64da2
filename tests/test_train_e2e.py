"""The main job end to end: hydra config -> Ray -> vLLM engines -> rewards -> DeepSpeed ranks -> sync.

Runs the real training loop in-process (sharing the session's Ray) on the tiny random model.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file

from rlhf.config.store import register_configs, to_object
from rlhf.run.metrics import read_metrics
from rlhf.train import train

ROOT = Path(__file__).resolve().parents[1]
register_configs()


def axis_reward(model_path: str) -> str:
    """The tests' learnable reward (tests/support/token_rewards.py), plugged in by file path."""
    spec = (ROOT / "tests" / "support" / "token_rewards.py").as_posix() + ":EmbeddingAxisShare"
    return f"reward.functions=[{{fn: '{spec}', weight: 1.0, kwargs: {{model_path: '{model_path}'}}}}]"


def run(tmp_path: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = to_object(compose(config_name="config", overrides=[
            "+experiment=tiny_smoke", f"trainer.output_dir={tmp_path / 'run'}", *overrides]))
    return cfg, train(cfg)


@pytest.fixture(scope="module")
def zero3_run(ray_session, tiny_model_path, tmp_path_factory):
    """2 steps with overrides that must reach the actors: dr_grpo, ZeRO-3 on 2 ranks, n=4."""
    tmp = tmp_path_factory.mktemp("e2e")
    cfg, run_dir = run(tmp, "algo=dr_grpo", "learner=zero3", "learner.num_ranks=2", "rollout.n=4",
                       "rollout.top_k=8", "learner.lr=1e-2", axis_reward(tiny_model_path))
    return cfg, run_dir


def test_metrics_appear_with_sane_values(zero3_run):
    cfg, run_dir = zero3_run
    lines = read_metrics(run_dir / "metrics.jsonl")
    steps = [m for m in lines if "reward/mean" in m]
    assert [m["step"] for m in steps] == [1, 2]
    evals = [m for m in lines if "eval/accuracy" in m]
    assert [m["step"] for m in evals] == [0, 2]  # before and after training
    for m in steps:
        for key in ["reward/EmbeddingAxisShare/mean", "frac_reward_zero_std", "kl" if cfg.algo.kl_coef else "loss",
                    "clip_frac/low", "clip_frac/high", "entropy", "response_length/mean", "truncated_frac",
                    "timing/generate", "timing/score", "timing/train", "timing/sync",
                    "throughput/tokens_per_s", "sync/probe_gap", "grad_norm", "lr"]:
            assert key in m and m[key] is not None and math.isfinite(m[key]), key
        assert 0.0 <= m["reward/mean"] <= 1.0
        # A near-uniform random model sampled with top_k=8: the learner scores the same truncated
        # softmax, so the entropy is close to ln 8 = 2.079 nats and never above it (measured 2.04).
        assert 1.9 < m["entropy"] <= math.log(8) + 1e-5
        # ... and its log-probs are vLLM's processed ones to fp32 numerics (measured ~1e-7 per token).
        assert m["mismatch/abs_logprob_diff_mean"] < 1e-5 and m["mismatch/abs_logprob_diff_max"] < 1e-4
        assert m["response_length/mean"] <= cfg.rollout.max_new_tokens
        assert m["sync/probe_gap"] <= cfg.rollout.probe_tolerance
        # On-policy, one update per batch: the importance ratio is exactly 1, nothing is clipped.
        assert m["clip_frac/low"] == 0.0 and m["clip_frac/high"] == 0.0
        assert m["lr"] == pytest.approx(1e-2)
        # 4 prompts x rollout.n=4 samples x response length tokens were generated.
        assert m["throughput/generated_tokens"] == pytest.approx(16 * m["response_length/mean"])


def test_overrides_reached_the_actors(zero3_run):
    cfg, run_dir = zero3_run
    assert (cfg.algo.advantage, cfg.learner.zero_stage, cfg.learner.num_ranks, cfg.rollout.n) == (
        "dr_grpo", 3, 2, 4)
    ckpt = run_dir / "checkpoints" / "step-2"
    assert (ckpt / "COMPLETE").exists()
    # ZeRO-3 on 2 ranks: DeepSpeed wrote one parameter shard and one optimizer shard per rank.
    model_shards = sorted(p.name for p in ckpt.rglob("zero_pp_rank_*_model_states.pt"))
    optim_shards = sorted(p.name for p in ckpt.rglob("*zero_pp_rank_*optim_states.pt"))
    assert len(model_shards) == 2 and len(optim_shards) == 2, (model_shards, optim_shards)
    saved = json.loads((ckpt / "client_state.json").read_text())
    assert saved["step"] == 2 and saved["config"]["algo"]["advantage"] == "dr_grpo"
    assert saved["data"]["position"] == 8  # 2 steps x 4 prompts drawn


def test_weights_changed_and_export_loads(zero3_run, tiny_model_path):
    from transformers import AutoModelForCausalLM

    _, run_dir = zero3_run
    before = load_file(str(Path(tiny_model_path) / "model.safetensors"))
    after = load_file(str(run_dir / "export" / "model.safetensors"))
    assert set(after) >= set(before)
    moved = max((after[k] - before[k]).abs().max().item() for k in before)
    assert moved > 1e-3  # Adam at lr 1e-2 moves weights by ~lr per step
    model = AutoModelForCausalLM.from_pretrained(run_dir / "export")
    assert torch.equal(model.state_dict()["model.embed_tokens.weight"], after["model.embed_tokens.weight"])
    assert (run_dir / "reward.png").stat().st_size > 1000
    assert (run_dir / "ledger.json").exists() and (run_dir / "tensorboard").is_dir()


def test_reward_rises_on_a_trivial_task(ray_session, tiny_model_path, tmp_path):
    """GRPO must raise a learnable reward within a few steps.

    The reward is the share of sampled tokens from one half of the vocabulary (split by the sign of
    one embedding axis), so it starts near 0.5. With top-k 8 sampling each position offers a few
    candidates of both halves; measured here: 0.375 -> 0.77 -> 0.87 -> 1.0 over 4 steps (lr 1e-2).
    """
    _, run_dir = run(tmp_path, "trainer.steps=4", "trainer.prompts_per_step=8", "rollout.n=8",
                     "rollout.top_k=8", "trainer.eval_prompts=0", "trainer.export_at_end=false",
                     "learner.lr=1e-2", axis_reward(tiny_model_path))
    rewards = [m["reward/mean"] for m in read_metrics(run_dir / "metrics.jsonl") if "reward/mean" in m]
    assert len(rewards) == 4
    assert rewards[-1] - rewards[0] >= 0.3, rewards


def test_dynamic_sampling_redraws_flat_groups_a_bounded_number_of_times(ray_session, tmp_path):
    """DAPO dynamic sampling: groups whose rewards are all equal are replaced by fresh prompts.

    tests/support/flaky_rewards.py:flaky scores 1.0 everywhere, so every group is flat, and each
    16 calls (one draw: 4 prompts x 4 samples) hold 2 failures and 1 timeout. With 3 draws allowed:
    draws 1 and 2 drop all 4 groups each (8 dropped), the last draw keeps what it gets rather than
    loop forever, so 3 x 4 = 12 prompts were consumed. Failures add up over the draws (3 x 2 = 6,
    3 x 1 = 3 timeouts), and the dropped groups' tokens are counted and billed too.
    """
    spec = (ROOT / "tests" / "support" / "flaky_rewards.py").as_posix() + ":flaky"
    _, run_dir = run(tmp_path, "trainer.steps=1", "trainer.eval_prompts=0", "trainer.export_at_end=false",
                     "algo.dynamic_sampling=true", "algo.dynamic_sampling_max_draws=3",
                     f"reward.functions=[{{fn: '{spec}', kwargs: {{hang_s: 4.0}}}}]", "reward.timeout_s=2")
    (step,) = [m for m in read_metrics(run_dir / "metrics.jsonl") if "reward/mean" in m]
    assert step["dynamic_sampling/dropped_groups"] == 8
    assert step["dynamic_sampling/draws"] == 3
    assert step["frac_reward_zero_std"] == 1.0
    assert (step["reward/flaky/failures"], step["reward/flaky/timeouts"]) == (6, 3)
    saved = json.loads((run_dir / "checkpoints" / "step-1" / "client_state.json").read_text())
    assert saved["data"]["position"] == 12
    # Kept: 16 samples; dropped: 32 more, each at least one token long.
    kept_tokens = 16 * step["response_length/mean"]
    assert step["throughput/generated_tokens"] >= kept_tokens + 32
    ledger = json.loads((run_dir / "ledger.json").read_text())
    assert ledger["totals"]["tokens_generated"] == step["throughput/generated_tokens"]
