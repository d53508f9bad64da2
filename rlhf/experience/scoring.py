"""Every reward rule of the experience path, training's and evaluation's alike.

- Which columns a reward sees: the prompt row's (``answer`` and data.reward_columns, which
  rlhf/experience/prompts.py's item_columns keeps in each PromptItem) and the rollout's
  (:data:`ROLLOUT_COLUMNS`); :func:`reward_column_names` names them all for
  ``RewardRunner(columns=...)``, :func:`expand_for_rewards` fills them.
- What a reward scores: the model's last turn (``completions``), not the whole trajectory: earlier
  turns are tool calls and observations are the environment's text (a calculator result is a number
  ``math_answer`` would otherwise read as the answer). The whole trajectory's text is the
  ``transcript`` column.
- The environment's reward joins the functions' as one named "env", weighted by env.reward_weight
  (an agent's as "agent", by agent.reward_weight), under the runner's one None rule
  (rewards/runner.py's weighted_total): a None under a non-zero weight makes the total None, never 0.
- A failed agent episode (rlhf/experience/agents.py) has every reward None: its row carries no loss.
- The step's reward metrics under the field's usual names (:func:`reward_metrics`).
"""

from __future__ import annotations

import math
from dataclasses import replace

from rlhf.algo import group_has_signal
from rlhf.config import DataConfig
from rlhf.experience.episodes import Episodes
from rlhf.experience.prompts import PromptItem, item_columns
from rlhf.types import Completion, RolloutBatch, Scores
from rewards.runner import RewardResult, RewardRunner, total_metrics, weighted_total

ENV_REWARD = "env"  # the env reward's name among the reward functions' (metrics, eval_reward)
# Added per completion by expand_for_rewards, beside the prompt row's columns. ``transcript``: the
# whole trajectory's text (model turns and observations); the completion itself when single-turn.
ROLLOUT_COLUMNS = ("completion_length", "completion_ids", "transcript")


def reward_column_names(cfg: DataConfig) -> list[str]:
    """The column names reward functions are passed at score time (``RewardRunner(columns=...)``)."""
    return [*item_columns(cfg), *ROLLOUT_COLUMNS]


def expand_for_rewards(items: list[PromptItem], rollouts: RolloutBatch) -> tuple[list[str], list[str], dict[str, list]]:
    """Per-completion prompts, completions and columns (each prompt's row repeated n times).

    ``completion_ids`` and ``completion_length`` (tokens) are added for token-level rewards, and
    ``transcript`` (each completion's whole text) for rewards that read a multi-turn trajectory.
    """
    prompts, completions = [], []
    columns: dict[str, list] = {key: [] for key in (items[0].columns if items else {})}
    for key in ROLLOUT_COLUMNS:
        columns[key] = []
    for c in rollouts.completions:
        item = items[c.prompt_index]
        prompts.append(item.raw_prompt)
        completions.append(c.text)
        for key in item.columns:
            columns[key].append(item.columns[key])
        columns["completion_length"].append(len(c.completion_ids))
        columns["completion_ids"].append(list(c.completion_ids))
        columns["transcript"].append(c.text)
    return prompts, completions, columns


def score_episodes(reward_runner: RewardRunner, items: list[PromptItem], episodes: Episodes, env_weight: float,
                   with_env: bool, columns: dict[str, list] | None = None) -> RewardResult:
    """The reward functions on each trajectory's last model turn (the whole trajectory's text is
    their ``transcript`` column), plus the episodes' own reward as a function named by
    ``episodes.reward_name`` ("env", "agent") weighted by ``env_weight`` (with ``with_env``). A
    failed agent episode's rewards are all None: it gave nothing to score. ``columns``: more columns,
    one value per trajectory (the verdict's ``closed_answer``)."""
    prompts, _, rows = expand_for_rewards(items, episodes.rollouts)
    if episodes.transcripts is not None:
        rows["transcript"] = list(episodes.transcripts)
    scored = reward_runner.score(prompts, list(episodes.last_turns), {**rows, **(columns or {})})
    if with_env:
        env = episodes.env_rewards
        total = weighted_total([(1.0, scored.total), (env_weight, env)], len(env))
        got = [e for e in env if e is not None]
        metrics = {**scored.metrics, f"reward/{episodes.reward_name}/mean": sum(got) / len(got) if got else math.nan,
                   **total_metrics(total)}
        scored = replace(scored, total=total, per_fn={**scored.per_fn, episodes.reward_name: list(env)}, metrics=metrics)
    if any(episodes.failed):
        keep = [not why for why in episodes.failed]
        total = _kept(scored.total, keep)
        scored = replace(scored, total=total, per_fn={name: _kept(values, keep) for name, values in scored.per_fn.items()},
                         metrics={**scored.metrics, **total_metrics(total)})
    return scored


def _kept(values: list, keep: list[bool]) -> list:
    return [v if k else None for v, k in zip(values, keep, strict=True)]


def reward_metrics(scores: Scores, completions: list[Completion], n: int) -> dict[str, float]:
    """The field's usual names: reward/mean, reward/<fn>/mean, frac_reward_zero_std, lengths."""
    total = scores.total
    valid = [r for r in total if r is not None]
    groups = [total[i : i + n] for i in range(0, len(total), n)]
    zero_std = sum(not group_has_signal(g) for g in groups)
    out = {
        "reward/mean": sum(valid) / len(valid) if valid else float("nan"),
        "reward/none_frac": 1 - len(valid) / len(total),
        "frac_reward_zero_std": zero_std / len(groups),
        "response_length/mean": sum(len(c.completion_ids) for c in completions) / len(completions),
        "truncated_frac": sum(c.finish_reason == "length" for c in completions) / len(completions),
    }
    for name, values in scores.per_fn.items():
        ok = [v for v in values if v is not None]
        mean = sum(ok) / len(ok) if ok else float("nan")
        out[f"reward/{name}/mean"] = mean
        out[f"reward/{name}/std"] = (sum((v - mean) ** 2 for v in ok) / len(ok)) ** 0.5 if ok else float("nan")
    return out
