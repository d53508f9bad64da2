"""``python -m rlhf.eval``: accuracy and pass@k of a checkpoint through vLLM, written as eval.json."""

from __future__ import annotations

import json
from pathlib import Path

from hydra import compose, initialize_config_dir

from rlhf.config import register_configs, to_object
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
