"""The demo configuration with the real SmolLM2, shortened to 2 steps (slow: minutes on 2 cores)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from transformers import AutoModelForCausalLM

from rlhf.config.store import register_configs, to_object
from rlhf.run.metrics import read_metrics
from rlhf.train import train

ROOT = Path(__file__).resolve().parents[1]
register_configs()


@pytest.mark.slow
def test_demo_config_runs_two_steps_on_smollm2(ray_session, smollm2_path, tmp_path):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = to_object(compose(config_name="config", overrides=[
            "trainer.steps=2", "trainer.eval_prompts=8", "trainer.eval_samples=2",
            f"trainer.output_dir={tmp_path / 'run'}"]))
    assert cfg.model.name_or_path == "smollm2-135m-instruct"  # the demo's model, unchanged
    run_dir = train(cfg)
    steps = [m for m in read_metrics(run_dir / "metrics.jsonl") if "reward/mean" in m]
    assert [m["step"] for m in steps] == [1, 2]
    for m in steps:
        assert 0.0 <= m["reward/mean"] <= 1.0 and math.isfinite(m["loss"])
        # The base model solves some single-digit sums: rewards vary within groups, so there is signal.
        assert m["frac_reward_zero_std"] < 1.0
        assert m["sync/probe_gap"] <= cfg.rollout.probe_tolerance
    # The export is an HF folder (sharded safetensors at this size) that transformers loads, and
    # two updates at lr 2e-5 moved its weights away from the base model's.
    tuned = AutoModelForCausalLM.from_pretrained(run_dir / "export", dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32)
    moved = max((a - b).abs().max().item() for a, b in zip(tuned.parameters(), base.parameters()))
    assert moved > 1e-6
    assert (run_dir / "reward.png").exists()
