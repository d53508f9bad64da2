"""Held-out evaluation through the rollout engines: accuracy, its standard error, and pass@k.

A sample is correct when one named reward (``trainer.eval_reward``, by default the first reward
function) reaches ``threshold`` (1.0 for the 0/1 answer rewards). One reward, not the weighted
total: a length penalty or a format bonus beside the answer reward must not change which answers
count as correct. A sample whose reward failed (None) is neither right nor wrong: it is left out
of the accuracy and counted in ``failures``, next to the reward runner's own failure counts.

Rollouts go through the same loop as training's (rlhf/experience/episodes.py): multi-turn with an
environment, whose own reward can be the accuracy reward (``trainer.eval_reward=env``). An
unfinished episode (max_turns or the token budget ran out, or every step failed, before any reward)
gave no answer: it is wrong whatever the reward says or ``env.unfinished_reward`` is, never a
failure (counted in ``unfinished``).

The standard error treats prompts as the unit (samples of one prompt are correlated): the std of
per-prompt accuracies over sqrt(number of prompts scored).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from rlhf.experience.agents import AgentRuntime, own_reward, roll_out
from rlhf.experience.episodes import EnvRuntime
from rlhf.experience.scoring import score_episodes
from rlhf.types import SamplingSettings


@dataclass(frozen=True)
class EvalResult:
    accuracy: float  # NaN when no sample could be scored
    accuracy_stderr: float
    pass_at_k: float  # fraction of scored prompts with at least one correct sample among k
    k: int
    reward_mean: float  # of the accuracy reward, over scored samples
    num_prompts: int  # prompts with at least one scored sample
    response_length: float
    failures: int = 0  # samples whose accuracy reward failed (None): not counted right or wrong
    unfinished: int = 0  # episodes that ended unrewarded (rlhf/experience/episodes.py): counted wrong
    reward: str = ""  # the reward accuracy was read from
    reward_metrics: dict[str, float] = field(default_factory=dict)  # the runner's, all functions

    def describe(self) -> str:
        """One line for the console: accuracy, pass@k, and failures when there were any."""
        text = (f"accuracy {self.accuracy:.3f} ± {self.accuracy_stderr:.3f} ({self.reward}, "
                f"{self.num_prompts} prompts x {self.k} samples), pass@{self.k} {self.pass_at_k:.3f}")
        text += f", {self.unfinished} episodes unfinished (wrong)" if self.unfinished else ""
        return text + (f", {self.failures} samples not scored (reward failed)" if self.failures else "")

    def metrics(self, prefix: str = "eval") -> dict[str, float]:
        return {
            f"{prefix}/accuracy": self.accuracy,
            f"{prefix}/accuracy_stderr": self.accuracy_stderr,
            f"{prefix}/pass@{self.k}": self.pass_at_k,
            f"{prefix}/reward_mean": self.reward_mean,
            f"{prefix}/response_length": self.response_length,
            f"{prefix}/failures": float(self.failures),
            f"{prefix}/unfinished": float(self.unfinished),
            **{f"{prefix}/{k}": v for k, v in self.reward_metrics.items()},
        }


def summarise(correct: list[list[bool | None]], rewards: list[float | None], lengths: list[int]) -> EvalResult:
    """Pure arithmetic over per-prompt correctness lists (each of length k; None: not scored)."""
    k = len(correct[0])
    scored = [[c for c in prompt if c is not None] for prompt in correct]
    per_prompt = [sum(c) / len(c) for c in scored if c]
    P = len(per_prompt)
    acc = sum(per_prompt) / P if P else math.nan
    var = sum((a - acc) ** 2 for a in per_prompt) / (P - 1) if P > 1 else 0.0
    valid = [r for r in rewards if r is not None]
    return EvalResult(
        accuracy=acc,
        accuracy_stderr=math.sqrt(var / P) if P else math.nan,
        pass_at_k=sum(any(c) for c in scored if c) / P if P else math.nan,
        k=k,
        reward_mean=sum(valid) / len(valid) if valid else math.nan,
        num_prompts=P,
        response_length=sum(lengths) / len(lengths),
        failures=sum(c is None for prompt in correct for c in prompt),
    )


def evaluate(engines, items, reward_runner, samples: int, temperature: float, max_new_tokens: int,
             reward: str, threshold: float = 1.0, stop: tuple[str, ...] = (),
             env: EnvRuntime | AgentRuntime | None = None, env_weight: float | None = None) -> EvalResult:
    """Roll out ``samples`` trajectories for each prompt item (one turn without ``env``, as in
    training otherwise: rlhf/experience/episodes.py; an agent's episodes through its gateway,
    sampling as told here: rlhf/experience/agents.py); accuracy from the reward named ``reward``
    ("env", "agent": the episodes' own reward, weighted by ``env_weight``, else by its config's)."""
    sampling = SamplingSettings(n=samples, temperature=temperature, max_new_tokens=max_new_tokens, stop=stop)
    env = env or EnvRuntime.single_turn()
    episodes = roll_out(env, engines, items, sampling)
    rollouts = episodes.rollouts
    with_own, weight = own_reward(env)
    scored = score_episodes(reward_runner, items, episodes, weight if env_weight is None else env_weight, with_own)
    if reward not in scored.per_fn:
        raise KeyError(f"trainer.eval_reward={reward!r} is not a configured reward ({sorted(scored.per_fn)})")
    values = scored.per_fn[reward]
    verdicts = [False if why else None if r is None else r >= threshold
                for r, why in zip(values, episodes.unfinished, strict=True)]
    correct = [verdicts[i * samples : (i + 1) * samples] for i in range(len(items))]
    lengths = [len(c.completion_ids) for c in rollouts.completions]
    result = summarise(correct, values, lengths)
    return replace(result, reward=reward, unfinished=sum(map(bool, episodes.unfinished)),
                   reward_metrics={**scored.metrics, **episodes.metrics})
