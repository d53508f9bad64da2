"""Rewards: the plug-in API (:mod:`rewards.api`), the runner (:mod:`rewards.runner`), built-ins
(:mod:`rewards.builtin`) and the code sandbox (:mod:`rewards.sandbox`)."""

from rewards.api import load_reward, per_sample
from rewards.runner import RewardError, RewardResult, RewardRunner

__all__ = ["RewardError", "RewardResult", "RewardRunner", "load_reward", "per_sample"]
