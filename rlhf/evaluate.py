"""Held-out evaluation through the rollout engines: accuracy, its standard error, and pass@k.

A sample counts as correct when its total reward reaches ``threshold`` (1.0 for the 0/1 answer
rewards). The standard error treats prompts as the unit (samples of one prompt are correlated):
the std of per-prompt accuracies over sqrt(number of prompts).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from rlhf.types import SamplingSettings


@dataclass(frozen=True)
class EvalResult:
    accuracy: float
    accuracy_stderr: float
    pass_at_k: float  # fraction of prompts with at least one correct sample among k
    k: int
    reward_mean: float
    num_prompts: int
    response_length: float

    def metrics(self, prefix: str = "eval") -> dict[str, float]:
        return {
            f"{prefix}/accuracy": self.accuracy,
            f"{prefix}/accuracy_stderr": self.accuracy_stderr,
            f"{prefix}/pass@{self.k}": self.pass_at_k,
            f"{prefix}/reward_mean": self.reward_mean,
            f"{prefix}/response_length": self.response_length,
        }


def summarise(correct: list[list[bool]], rewards: list[float | None], lengths: list[int]) -> EvalResult:
    """Pure arithmetic over per-prompt correctness lists (each of length k)."""
    k = len(correct[0])
    per_prompt = [sum(c) / k for c in correct]
    P = len(per_prompt)
    acc = sum(per_prompt) / P
    var = sum((a - acc) ** 2 for a in per_prompt) / (P - 1) if P > 1 else 0.0
    valid = [r for r in rewards if r is not None]
    return EvalResult(
        accuracy=acc,
        accuracy_stderr=math.sqrt(var / P),
        pass_at_k=sum(any(c) for c in correct) / P,
        k=k,
        reward_mean=sum(valid) / len(valid) if valid else float("nan"),
        num_prompts=P,
        response_length=sum(lengths) / len(lengths),
    )


def evaluate(engines, items, reward_runner, samples: int, temperature: float, max_new_tokens: int,
             threshold: float = 1.0, stop: tuple[str, ...] = ()) -> EvalResult:
    """Generate ``samples`` completions for each prompt item and score them."""
    sampling = SamplingSettings(n=samples, temperature=temperature, max_new_tokens=max_new_tokens, stop=stop)
    rollouts = engines.generate([it.prompt_ids for it in items], sampling)
    prompts, completions, columns = expand_for_rewards(items, rollouts)
    scored = reward_runner.score(prompts, completions, columns)
    correct = [
        [(r is not None and r >= threshold) for r in scored.total[i * samples : (i + 1) * samples]]
        for i in range(len(items))
    ]
    lengths = [len(c.completion_ids) for c in rollouts.completions]
    return summarise(correct, scored.total, lengths)


def expand_for_rewards(items, rollouts) -> tuple[list[str], list[str], dict[str, list]]:
    """Per-completion prompts, completions and dataset columns (each prompt's row repeated n times).

    ``completion_ids`` and ``completion_length`` (tokens) are added for token-level rewards.
    """
    prompts, completions = [], []
    columns: dict[str, list] = {key: [] for key in (items[0].columns if items else {})}
    columns["completion_length"], columns["completion_ids"] = [], []
    for c in rollouts.completions:
        item = items[c.prompt_index]
        prompts.append(item.raw_prompt)
        completions.append(c.text)
        for key in item.columns:
            columns[key].append(item.columns[key])
        columns["completion_length"].append(len(c.completion_ids))
        columns["completion_ids"].append(list(c.completion_ids))
    return prompts, completions, columns
