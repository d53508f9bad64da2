"""Rewards: scoring completions with pluggable reward functions.

api.py      what a reward is, and how a config spec becomes one
runner.py   RewardRunner: a batch of completions scored with the configured rewards, time-limited
pool.py     a thread pool whose tasks can time out without taking a worker with them
remote.py   reward.executor=ray: reward calls as Ray tasks over the cluster's CPUs
answers.py  finding a final answer in text (GSM8K ``#### 42``, ``\\boxed{...}``, the last number)
sandbox.py  untrusted code (a completion) run against tests in a contained subprocess
agreement.py how often two rewards agree on the same completions (reward.agreement)
builtin/    the built-in rewards, by name
rubrics/    example rubrics for the judge reward (text templates with {placeholders})
"""

from rewards.api import load_reward, per_sample
from rewards.runner import RewardError, RewardResult, RewardRunner

__all__ = ["RewardError", "RewardResult", "RewardRunner", "load_reward", "per_sample"]
