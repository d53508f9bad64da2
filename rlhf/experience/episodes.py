"""Rollouts as episodes: the one generation loop of training and evaluation, any number of turns.

Every live trajectory of a batch advances together: one batched ``engines.generate`` per turn
(the first with n samples per prompt, later ones with n=1 per live trajectory, continuing from its
token ids so far), then each trajectory's environment ``step`` runs on the model's turn, all at
once on a thread pool with a timeout per call. A step that raises or overruns becomes an error
observation the model sees next turn (counted in env/step_errors, env/step_timeouts); a step that
breaks the API (wrong return types) is an EnvError naming the environment.

An episode that ends with no reward from its environment and without its say (``max_turns`` ran
out, the token budget left no room, every step failed) is *unfinished*: its env reward is
``env.unfinished_reward`` (default 0.0), counted by cause in env/unfinished/{max_turns,budget,errors}.
It is a wrong answer, not a failed reward: left as None it would drop out of its group, and an
environment that rewards only success (every valid reward 1.0) would never get an advantage. An
environment that says done with reward None declined to score: that stays None (env/reward_none).

Each trajectory keeps its model's last turn (``last_turns``), what the reward functions score;
scoring, the env reward's weight and its None rule are rlhf/experience/scoring.py's.

Why batched turns rather than vLLM's async engine: the engines are driven through one blocking
``generate`` per call (rollouts/group.py), which keeps the per-step reseed that makes a resumed run
repeat an uninterrupted one; a turn costs one call however many trajectories are live, so 16
prompts x 8 samples x 3 turns is 3 calls. The price: a turn waits for its slowest trajectory.

With no environment (``env.name: null``) every trajectory is done after its first turn: the
single-turn case is this same loop, run once. Rows keep the RolloutBatch grouping: prompt i's n
trajectories are rows i*n .. i*n+n-1.
"""

from __future__ import annotations

import math
import threading
import time
from concurrent.futures import FIRST_COMPLETED, wait
from dataclasses import dataclass, field, replace
from typing import Any, Callable

from rlhf.config import ConfigError, EnvConfig
from rlhf.types import RolloutBatch, SamplingSettings
from rewards.pool import DaemonPool, Task
from rollouts.engine import derive_seed
from rollouts.env.api import EnvError, EnvFactory, check_reset, check_step, env_item, load_env
from rollouts.env.chat import TurnCodec
from rollouts.env.tools import env_tools
from rollouts.env.trajectory import Trajectory

# Env metrics that count events: summed over dynamic-sampling draws.
UNFINISHED = ("max_turns", "budget", "errors")  # why an episode ended unrewarded (Trajectory.unfinished)
ENV_COUNTED = ("env/step_errors", "env/step_timeouts", "env/step_busy", "env/obs_truncated", "env/budget_stops", "env/budget_cuts",
               "env/max_turns_stops", "env/tool_calls", "env/tool_errors", "env/reward_none",
               *(f"env/unfinished/{cause}" for cause in UNFINISHED))


class EnvRuntime:
    """The configured environment, ready to serve trajectories: its class, the tokenizer's turn
    codec and the pool its calls run on. ``factory`` None: no environment (single turn)."""

    def __init__(self, cfg: EnvConfig, tokenizer: Any, max_model_len: int) -> None:
        self.cfg = cfg
        self.max_model_len = max_model_len
        self.factory: EnvFactory | None = None
        self.codec: TurnCodec | None = None
        self.pool: DaemonPool | None = None
        if cfg.name is None:
            return
        try:
            self.factory = load_env(cfg.name, dict(cfg.kwargs or {}))
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self.codec = TurnCodec(tokenizer, cfg.observation_role, cfg.max_tool_tokens)
        self.pool = DaemonPool(max(1, cfg.num_workers), name="env")

    @classmethod
    def single_turn(cls) -> "EnvRuntime":
        """No environment: every trajectory is one turn."""
        return cls(EnvConfig(), tokenizer=None, max_model_len=0)

    @property
    def tools(self) -> list[dict] | None:
        """JSON schemas of the environment's tools, for the prompt (None: it has none)."""
        return env_tools(self.factory.cls) if self.factory is not None else None

    def check(self, item: dict[str, Any]) -> None:
        """Build one environment and reset it on ``item`` before anything expensive starts: a
        constructor or reset that fails, hangs or returns the wrong type is an EnvError here."""
        if self.factory is None:
            return
        env = self.factory.build()
        (outcome,) = self.run([lambda: env.reset(item)])
        if isinstance(outcome, BaseException):
            raise EnvError(f"env {self.cfg.name!r}: reset() on the first prompt failed: "
                           f"{type(outcome).__name__}: {outcome}") from outcome
        check_reset(self.cfg.name, outcome)

    def run(self, calls: list[Callable[[], Any]]) -> list[Any]:
        """Each call's result, or its exception (TimeoutError after env.timeout_s from its start)."""
        tasks = [self.pool.submit(c) for c in calls]
        pending: set[Task] = set(tasks)
        while pending:
            wait([t.future for t in pending], timeout=0.05, return_when=FIRST_COMPLETED)
            now = time.monotonic()
            for t in list(pending):
                if t.future.done():
                    pending.discard(t)
                elif t.started_at is not None and now - t.started_at > self.cfg.timeout_s:
                    self.pool.abandon(t, TimeoutError(f"no answer within env.timeout_s={self.cfg.timeout_s}s"))
                    pending.discard(t)
        return [t.future.exception() or t.future.result() for t in tasks]

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()


@dataclass
class Episodes:
    """One batch of trajectories as completions (grouped), their env rewards and metrics."""

    rollouts: RolloutBatch
    # Per completion; all None without an environment. An unfinished episode's is env.unfinished_reward.
    env_rewards: list[float | None]
    metrics: dict[str, float] = field(default_factory=dict)
    # Per completion: the model's last turn, what reward functions score (the whole text when single-turn).
    last_turns: list[str] = field(default_factory=list)
    # Per completion: why it ended unrewarded (Trajectory.unfinished), None when it did not.
    unfinished: list[str | None] = field(default_factory=list)
    # The name ``env_rewards`` go by among the rewards: "env", or "agent" (rlhf/experience/agents.py).
    reward_name: str = "env"
    # Per completion (agent episodes): why its episode failed (timeouts, errors, no_calls), None when it
    # did not. A failed row's total reward is None, whatever the reward functions say: it carries no loss.
    failed: list[str | None] = field(default_factory=list)
    # Per completion (agent episodes): the episode's messages as text, the rewards' ``transcript``
    # column; None: the completion's own text is its transcript.
    transcripts: list[str] | None = None
    # Per completion (agent episodes): the output tokens its calls used, as an API bills them.
    completion_tokens: list[int] = field(default_factory=list)


def run_episodes(engines, prompt_ids: list[list[int]], items: list[dict[str, Any]], sampling: SamplingSettings,
                 runtime: EnvRuntime, seed: int | None = None) -> Episodes:
    """``sampling.n`` trajectories per prompt; ``items`` are the prompts' rows for ``reset``
    (rollouts/env/api.py's env_item). Turn t > 0 is seeded from (seed, t)."""
    n, cfg, factory = sampling.n, runtime.cfg, runtime.factory
    counts = dict.fromkeys(ENV_COUNTED, 0.0)
    prompts = [list(p) for p in prompt_ids]
    envs: list[Any] = [None] * (len(prompts) * n)
    if factory is not None:
        envs = [factory.build() for _ in envs]
        prompts = _reset(runtime, envs, items, prompts, n, counts)
    trajs = [Trajectory(i // n, prompts[i // n], env=envs[i]) for i in range(len(prompts) * n)]
    budget = cfg.max_total_tokens if factory is not None else None
    generate_s, per_engine = 0.0, []
    live = list(range(len(trajs)))
    for turn in range(cfg.max_turns if factory is not None else 1):
        if turn == 0:
            batch = engines.generate(prompts, sampling, seed=seed)
        else:
            room = max(_room(trajs[i], budget, runtime.max_model_len) for i in live)
            later = replace(sampling, n=1, max_new_tokens=min(sampling.max_new_tokens, room))
            batch = engines.generate([trajs[i].context for i in live], later,
                                     seed=None if seed is None else derive_seed(seed, turn))
        generate_s += batch.generate_s
        per_engine = [a + b for a, b in zip(per_engine, batch.per_engine_s)] if per_engine else list(batch.per_engine_s)
        for i, c in zip(live, batch.completions, strict=True):
            t = trajs[i]
            # A later turn's limit is the roomiest live trajectory's: cut the others to their own.
            room = _room(t, budget, runtime.max_model_len) if factory is not None else len(c.completion_ids)
            cut = len(c.completion_ids) > room
            text = runtime.codec.tokenizer.decode(c.completion_ids[:room]) if cut else c.text
            t.add_action(c.completion_ids[:room], c.logprobs[:room], text, "length" if cut else c.finish_reason)
            counts["env/budget_cuts"] += cut
        if factory is None:
            break
        _step(runtime, [trajs[i] for i in live], counts, last_turn=turn == cfg.max_turns - 1, budget=budget)
        live = [i for i in live if not trajs[i].done]
        if not live:
            break
    unfinished = [t.unfinished for t in trajs]
    env_rewards = [cfg.unfinished_reward if why else t.env_reward for t, why in zip(trajs, unfinished)]
    metrics = _metrics(trajs, env_rewards, counts) if factory is not None else {}
    return Episodes(
        rollouts=RolloutBatch([t.to_completion() for t in trajs], n=n, generate_s=generate_s, per_engine_s=per_engine),
        env_rewards=env_rewards,
        metrics=metrics,
        last_turns=[t.last_turn for t in trajs],
        unfinished=unfinished,
    )


def env_items(items) -> list[dict[str, Any]]:
    """The rows ``reset`` gets, one per PromptItem (rollouts/env/api.py's env_item)."""
    return [env_item(it.raw_prompt, it.prompt_text, it.columns) for it in items]


def _room(t: Trajectory, budget: int | None, max_model_len: int) -> int:
    """Tokens trajectory ``t`` may still add: its budget's rest, and what fits rollout.max_model_len.
    An observation must leave at least one (the next turn's context is then a prompt the engines
    accept, at most max_model_len - 1 tokens)."""
    rest = max_model_len - len(t.context)
    return rest if budget is None else min(rest, budget - len(t.ids))


def _reset(runtime: EnvRuntime, envs: list, items: list[dict], prompts: list[list[int]], n: int,
           counts: dict) -> list[list[int]]:
    """Reset every environment; a first observation joins its prompt (the same for all n)."""
    name = runtime.cfg.name
    outcomes = runtime.run([(lambda e=e, it=items[i // n]: e.reset(it)) for i, e in enumerate(envs)])
    out = []
    for g, prompt in enumerate(prompts):
        firsts = []
        for i in range(g * n, (g + 1) * n):
            if isinstance(outcomes[i], BaseException):
                raise EnvError(f"env {name!r}: reset() failed on prompt {g}: "
                               f"{type(outcomes[i]).__name__}: {outcomes[i]}") from outcomes[i]
            firsts.append(check_reset(name, outcomes[i]))
        if len(set(firsts)) > 1:
            raise EnvError(f"env {name!r}: reset() gave different first observations to the samples of prompt "
                           f"{g}; they share one prompt, so reset must depend on the item only")
        if firsts[0] is None:
            out.append(prompt)
            continue
        ids, obs = runtime.codec.into_prompt(prompt, firsts[0])
        counts["env/obs_truncated"] += obs.truncated * n
        out.append(ids)
    return out


def _step(runtime: EnvRuntime, trajs: list[Trajectory], counts: dict, last_turn: bool, budget: int | None) -> None:
    """Every live trajectory's environment steps on its last model turn; observations appended.

    A step that overran keeps running in its retired pool thread; until it returns, its
    environment gets no other call (one instance is never stepped from two threads): the model
    sees a busy error instead (env/step_busy)."""
    name, codec = runtime.cfg.name, runtime.codec
    ready = [t for t in trajs if t.running is None or t.running.is_set()]
    for t in ready:
        t.running = threading.Event()
    outcomes = dict(zip(map(id, ready), runtime.run([(lambda t=t: _signalling(t)) for t in ready])))
    busy = object()
    for t in trajs:
        outcome = outcomes.get(id(t), busy)
        if outcome is busy:
            counts["env/step_busy"] += 1
            t.step_errors += 1
            obs, done = "Error: the environment is still running its previous step", False
        elif isinstance(outcome, TimeoutError):
            counts["env/step_timeouts"] += 1
            t.step_errors += 1
            obs, done = f"Error: the environment did not answer within {runtime.cfg.timeout_s}s", False
        elif isinstance(outcome, BaseException):
            counts["env/step_errors"] += 1
            t.step_errors += 1
            obs, done = f"Error: {type(outcome).__name__}: {outcome}", False
        else:
            obs, reward, done = check_step(name, outcome)
            t.add_reward(reward)
        if done or last_turn:
            counts["env/max_turns_stops"] += not done
            t.finish("done" if done else "max_turns")
            continue
        turn = codec.after_action(t.ids, obs or "")
        if len(turn.ids) >= _room(t, budget, runtime.max_model_len):  # no room left for a model turn
            counts["env/budget_stops"] += 1
            t.finish("budget")
            continue
        counts["env/obs_truncated"] += turn.truncated
        t.add_observation(turn.ids, codec.tokenizer.decode(turn.ids))


def _signalling(t: Trajectory):
    """``t``'s step on its last model turn; ``t.running`` is set once it returns, however late."""
    try:
        return t.env.step(t.pieces[-1])
    finally:
        t.running.set()


def _metrics(trajs: list[Trajectory], env_rewards: list[float | None], counts: dict[str, float]) -> dict[str, float]:
    for t in trajs:
        for key, value in (t.env.metrics() if callable(getattr(t.env, "metrics", None)) else {}).items():
            counts[f"env/{key}"] = counts.get(f"env/{key}", 0.0) + float(value)
        if t.unfinished:
            counts[f"env/unfinished/{t.unfinished}"] += 1
    counts["env/reward_none"] = float(sum(r is None for r in env_rewards))
    calls = counts["env/tool_calls"]
    k = len(trajs)
    return {
        **counts,
        "env/turns_mean": sum(t.turns for t in trajs) / k,
        "env/turns_max": float(max(t.turns for t in trajs)),
        "env/trajectory_tokens_mean": sum(len(t.ids) for t in trajs) / k,
        "env/observation_tokens_mean": sum(t.observation_tokens for t in trajs) / k,
        # NaN, not 1 or 0, when no tool was called: there was nothing to succeed at.
        "env/tool_success_rate": (calls - counts["env/tool_errors"]) / calls if calls else math.nan,
    }

