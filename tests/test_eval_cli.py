"""``python -m rlhf.eval``: accuracy and pass@k of a checkpoint through vLLM, written as eval.json."""

from __future__ import annotations

import json
from pathlib import Path

from hydra import compose, initialize_config_dir

from rlhf.config.store import register_configs, to_object
from rlhf.eval import run_eval

ROOT = Path(__file__).resolve().parents[1]
register_configs()


def test_eval_of_the_tiny_model_writes_consistent_figures(ray_session, tiny_model_path, tmp_path):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = to_object(compose(config_name="config", overrides=[
            "+experiment=tiny_smoke", f"model.name_or_path={tiny_model_path}",
            "trainer.eval_prompts=6", "trainer.eval_samples=3", f"trainer.output_dir={tmp_path}"]))
    result = run_eval(cfg)
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved["num_prompts"] == 6 and saved["k"] == 3
    # A random model never writes the right sum: accuracy and pass@3 are 0, and so is their stderr.
    assert (result.accuracy, result.pass_at_k, result.accuracy_stderr) == (0.0, 0.0, 0.0)
    assert 0 < saved["response_length"] <= 16


def test_accuracy_reads_one_reward_and_counts_failures_apart(ray_session, tiny_model_path, tmp_path):
    """6 prompts x 3 samples = 18 completions, in prompt order.

    every_third_invalid gives 1.0, except NaN at positions 0, 3, ..., 15: the first sample of each
    prompt, 6 failures. The length penalty (max 16 tokens, cache 8) takes up to 1.0 off a 16-token
    answer, so the weighted total of a correct answer can fall to 0: accuracy must come from the
    first reward alone. Scored: 2 samples per prompt, all correct -> accuracy 1, stderr 0, pass@3 1.
    Before, accuracy was total >= 1 with failures counted as wrong.
    """
    spec = (ROOT / "tests" / "support" / "eval_rewards.py").as_posix() + ":every_third_invalid"
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = to_object(compose(config_name="config", overrides=[
            "+experiment=tiny_smoke", f"model.name_or_path={tiny_model_path}",
            "trainer.eval_prompts=6", "trainer.eval_samples=3", f"trainer.output_dir={tmp_path}",
            f"reward.functions=[{{fn: '{spec}'}}, {{fn: length, kwargs: {{max_length: 16, cache_length: 8}}}}]"]))
    result = run_eval(cfg)
    assert result.reward == "every_third_invalid"
    assert (result.accuracy, result.accuracy_stderr, result.pass_at_k) == (1.0, 0.0, 1.0)
    assert (result.failures, result.num_prompts) == (6, 6)
    assert result.reward_metrics["reward/every_third_invalid/failures"] == 6
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved["failures"] == 6
