"""The off-policy rules (issue 14): the learner scores what the engines sampled, stale batches are
corrected, and the learning-rate schedule counts optimizer updates. Each bad input is named."""

from __future__ import annotations

import re

import pytest

from rlhf.config import ConfigError
from rlhf.config.batches import total_updates
from rlhf.validation import validate
from support.runs import compose


@pytest.mark.parametrize(
    "overrides, message",
    [
        # The learner scores logits / rollout.temperature: greedy sampling has no such distribution.
        (["rollout.temperature=0"], "rollout.temperature=0.0 must be > 0"),
        (["rollout.top_k=0"], "rollout.top_k=0 must be -1 (off) or >= 1"),
        (["rollout.top_p=1.5"], "rollout.top_p=1.5 must be in (0, 1]"),
        # Asynchronous rollouts without a correction: the anchors' lesson, refused naming both keys.
        (["trainer.max_staleness=1"], "trainer.max_staleness=1 trains on batches sampled by an older policy, "
                                      "which algo.rollout_correction=none"),
        (["trainer.max_staleness=-1"], "trainer.max_staleness=-1 must be >= 0"),
        (["trainer.max_staleness=1", "rollout_correction=tis", "rollout.sleep_between_steps=true"],
         "rollout.sleep_between_steps=true"),
        (["algo.rollout_correction=is"], "algo.rollout_correction='is' is not a registered rollout correction"),
        (["rollout_correction=tis", "algo.correction_cap=0.5"], "algo.correction_cap=0.5 must be >= 1"),
        (["rollout_correction=icepop", "algo.correction_low=1.5"], "algo.correction_low=1.5"),
        (["algo.max_mismatch_kl=0"], "algo.max_mismatch_kl=0.0 must be > 0"),
        (["algo.max_mismatch_kl_steps=0"], "algo.max_mismatch_kl_steps=0 must be >= 1"),
        # Raw log-probs are not the sampling distribution at temperature 0.7: rho would be wrong.
        (["rollout_correction=tis", "rollout.logprobs_mode=raw_logprobs", "rollout.temperature=0.7"],
         "rollout.logprobs_mode=raw_logprobs"),
        (["rollout.logprobs_mode=processed_logits"], "rollout.logprobs_mode='processed_logits'"),
    ],
)
def test_bad_off_policy_settings_are_named(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate(compose(*overrides))


def test_async_with_a_correction_validates():
    cfg = compose("trainer.max_staleness=1", "rollout_correction=icepop", "rollout.top_p=0.9",
                  "rollout.temperature=0.8")
    validate(cfg)
    assert (cfg.algo.rollout_correction, cfg.algo.correction_low, cfg.algo.correction_high) == ("icepop", 0.5, 2.0)


def test_the_schedule_counts_optimizer_updates():
    # 8 steps x 2 mini-batches x 2 epochs = 32 updates: cosine with 20 warm-up updates is valid
    # (20 < 32) although it exceeds the 8 steps, and 40 warm-up updates are refused naming the 32.
    over = ["algo.mini_batches_per_step=2", "algo.epochs_per_step=2", "learner.lr_schedule=cosine"]
    cfg = compose(*over, "learner.warmup_steps=20")
    assert total_updates(cfg) == 8 * 2 * 2
    validate(cfg)
    with pytest.raises(ConfigError, match=re.escape("total optimizer updates (32) > learner.warmup_steps (40)")):
        validate(compose(*over, "learner.warmup_steps=40"))


def test_the_plan_shows_updates_and_how_rollouts_are_generated():
    from rlhf.plan import describe

    cfg = compose("algo.mini_batches_per_step=2", "algo.epochs_per_step=2", "trainer.max_staleness=1",
                  "rollout_correction=tis")
    text = describe(cfg, validate(cfg), None)
    assert "32 optimizer updates in 8 steps" in text  # 8 steps x 2 mini-batches x 2 epochs
    assert "rollouts: generated up to 1 step(s) ahead; correction tis, max mismatch KL 0.05" in text
