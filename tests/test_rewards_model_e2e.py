"""``reward_model`` from the command line: ``python -m rlhf.train`` with a reward-model reward.

The reward model lives in a Ray actor that is started when the reward is built, so the trainer must
start Ray before it builds its rewards. In-process tests share the session's Ray and cannot show
that; this runs the real entry point in a fresh process (support.runs.TrainProcess: its own
RAY_TMPDIR, no RAY_ADDRESS), where nothing started Ray beforehand.
"""

from __future__ import annotations

import math

from support.reward_models import make_tiny_classifier
from support.runs import TrainProcess, reward_override, steps_logged


def test_train_from_the_command_line_with_a_reward_model(tiny_model_path, tmp_path):
    classifier = make_tiny_classifier(tmp_path / "rm", tiny_model_path)
    run = TrainProcess(["+experiment=tiny_smoke", f"trainer.output_dir={tmp_path / 'run'}", "trainer.steps=1",
                        "trainer.eval_prompts=0", "trainer.export_at_end=false", "trainer.tensorboard=false",
                        reward_override("reward_model", model=classifier, batch_size=8)],
                       tmp_path / "train.log")
    try:
        code = run.wait(timeout_s=600)
        log = run.output()
    finally:
        assert run.close() == []
    assert code == 0, log[-3000:]
    (step,) = steps_logged(tmp_path / "run").values()
    # tiny_smoke: 4 prompts x rollout.n=4 = 16 completions, every one scored by the model's logit.
    assert step["reward/reward_model/failures"] == 0 and step["reward/reward_model/timeouts"] == 0
    assert step["reward/none_frac"] == 0.0
    assert math.isfinite(step["reward/reward_model/mean"])
    # A random head gives different logits to different texts: the group has a spread to learn from.
    assert step["reward/reward_model/std"] > 0
