"""One answer per held-out prompt from each side of the verdict (rlhf.compare), timed, and scored alike.

- The closed model over its API (:func:`closed_answers`): every answer goes through the response
  cache first (rlhf/chat/cache.py), so a rerun pays nothing; then ``latency_requests`` single
  requests, one at a time, whose ``ChatAnswer.latency_s`` is the latency (cached too, under their
  own key: sample index 1, where the batch's answers are sample 0).
- An open model on our engines (:func:`open_answers`): one batched generate of every prompt, whose
  tokens over its wall time are the throughput the serving cost is priced at, then
  ``latency_requests`` one-prompt generates, each timed.
- Both scored by the same reward runner (:func:`score_answers`) with the prompt row's columns, the
  rollout columns, and ``closed_answer``: the closed model's answer to that prompt (a pairwise
  judge's reference column).

With an agent (agent.name / agent.command), each side's answer is one episode of the application
(:func:`agent_answers`, n=1): against the closed API through the relay, against an open model
through the gateway in front of its engines. The episode's text is its last reply, its output
tokens are those its calls used; ``latency_requests`` single-prompt episodes, one at a time, are
the latency, and the batch's completion tokens over its wall time the throughput. Episodes are
scored as training scores them (rlhf/experience/scoring.py score_episodes, the agent's own reward
named "agent"), with ``closed_answer`` beside. Nothing of the closed side is cached: an
application's calls depend on the replies before them, so replaying stored ones would change the
application; agent episodes against the closed API are paid on every run.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlhf.chat.cache import ResponseCache, request_key
from rlhf.chat.client import ChatAnswer, ChatClient, Endpoint
from rlhf.experience.agents import AgentRuntime, run_agent_episodes
from rlhf.experience.episodes import Episodes
from rlhf.experience.prompts import PromptItem
from rlhf.experience.scoring import ROLLOUT_COLUMNS
from rlhf.types import SamplingSettings
from rewards.runner import RewardResult, RewardRunner

CLOSED_ANSWER = "closed_answer"  # the reward column holding the closed model's answer
LATENCY_SAMPLE = 1  # cache keys of the timed single requests (the batch's answers are sample 0)


@dataclass(frozen=True)
class Answers:
    """One side's answers, in prompt order, and its timings."""

    texts: list[str]
    tokens: list[int | None]  # output tokens per answer; None: the API reported no usage
    latencies_s: list[float]  # single requests, one at a time
    tokens_per_s: float | None = None  # the batched generate (open models)
    requests_paid: int = 0  # closed: answers bought in this run (cache misses; an agent's: its calls)
    cache_hits: int = 0
    # Agent episodes: what they counted (agent/calls_mean, agent/errors, ...; agent/timed_failed: the
    # timed episodes that failed). Empty for single answers.
    metrics: dict[str, float] = field(default_factory=dict)


def closed_messages(item: PromptItem, system_prompt: str | None) -> list[dict[str, str]]:
    """The prompt as the closed model is asked it: data.system_prompt, then the user's prompt."""
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return [*system, {"role": "user", "content": item.raw_prompt}]


def closed_answers(items: list[PromptItem], endpoint: Endpoint, api_key: str | None, model: str,
                   sampling: dict[str, Any], system_prompt: str | None, latency_requests: int,
                   cache_path: Path) -> Answers:
    """The closed model's answer to every item and ``latency_requests`` timed single requests."""
    return asyncio.run(_closed(items, endpoint, api_key, model, sampling, system_prompt,
                               latency_requests, cache_path))


async def _closed(items, endpoint, api_key, model, sampling, system_prompt, latency_requests,
                  cache_path) -> Answers:
    cache = ResponseCache(cache_path)
    messages = [closed_messages(it, system_prompt) for it in items]
    keys = [request_key(model, m, sampling, 0) for m in messages]
    timed = list(range(min(latency_requests, len(items))))
    timed_keys = [request_key(model, messages[i], sampling, LATENCY_SAMPLE) for i in timed]
    hits = sum(cache.get(k) is not None for k in keys + timed_keys)
    paid = 0
    todo = [(i, k) for i, k in enumerate(keys) if cache.get(k) is None]

    def got(j: int, answer: ChatAnswer) -> None:
        nonlocal paid
        cache.put(todo[j][1], answer, model)
        paid += 1

    def request(i: int) -> tuple[dict[str, Any], str]:
        return {"model": model, "messages": messages[i], **sampling}, f"{endpoint.owner} prompt {i}"

    async with ChatClient(endpoint, api_key) as client:
        # Answers received before a failure stay in the cache: a rerun does not pay for them again.
        await client.complete_all([request(i) for i, _ in todo], got)
        for i, key in zip(timed, timed_keys):  # one at a time: a latency, not a queue
            if cache.get(key) is None:
                cache.put(key, await client.complete(*request(i)), model)
                paid += 1
    answers: list[ChatAnswer] = [cache.entries[k] for k in keys]
    latencies = [cache.entries[k].latency_s for k in timed_keys]
    if any(s is None for s in latencies):
        raise ValueError(f"{cache_path}: a timed answer has no latency (a cache from older code); delete it")
    return Answers(texts=[a.content for a in answers], tokens=[a.completion_tokens for a in answers],
                   latencies_s=[float(s) for s in latencies], requests_paid=paid, cache_hits=hits)


def open_answers(engines: Any, items: list[PromptItem], sampling: SamplingSettings,
                 latency_requests: int) -> tuple[Answers, list[list[int]]]:
    """One batched generate of every item (the throughput), then timed one-prompt generates;
    also the answers' token ids (for the rollout columns)."""
    batch = engines.generate([it.prompt_ids for it in items], sampling)
    completions = sorted(batch.completions, key=lambda c: c.prompt_index)
    tokens = [len(c.completion_ids) for c in completions]
    if batch.generate_s <= 0 or sum(tokens) == 0:
        raise RuntimeError(f"the batched generate made {sum(tokens)} tokens in {batch.generate_s} s: "
                           "no throughput to price")
    latencies = [engines.generate([items[i].prompt_ids], sampling).generate_s
                 for i in range(min(latency_requests, len(items)))]
    answers = Answers(texts=[c.text for c in completions], tokens=list(tokens), latencies_s=latencies,
                      tokens_per_s=sum(tokens) / batch.generate_s)
    return answers, [list(c.completion_ids) for c in completions]


def agent_answers(runtime: AgentRuntime, items: list[PromptItem], latency_requests: int,
                  throughput: bool) -> tuple[Answers, Episodes]:
    """One agent episode per item through ``runtime`` (its gateway or relay), then timed single-item
    episodes, one at a time; with ``throughput`` (an open model) the batch's completion tokens over
    its wall time, an error when it made none. Also the episodes, for scoring."""
    episodes = run_agent_episodes(runtime, items, n=1)
    tokens = list(episodes.completion_tokens)
    seconds = episodes.rollouts.generate_s
    if throughput and (seconds <= 0 or sum(tokens) == 0):
        raise RuntimeError(f"the batch of {len(items)} agent episodes made {sum(tokens)} completion tokens in "
                           f"{seconds} s: no throughput to price (see agent/errors: {episodes.metrics})")
    latencies, calls, failed = [], episodes.metrics["agent/calls_mean"] * len(items), 0
    for i in range(min(latency_requests, len(items))):
        start = time.perf_counter()
        one = run_agent_episodes(runtime, [items[i]], n=1)
        latencies.append(time.perf_counter() - start)
        calls += one.metrics["agent/calls_mean"]
        failed += sum(map(bool, one.failed))
    metrics = {k: v for k, v in episodes.metrics.items() if k.startswith("agent/")}
    answers = Answers(texts=list(episodes.last_turns), tokens=tokens, latencies_s=latencies,
                      tokens_per_s=sum(tokens) / seconds if throughput else None,
                      requests_paid=0 if throughput else round(calls), metrics={**metrics, "agent/timed_failed": float(failed)})
    return answers, episodes


def score_answers(runner: RewardRunner, items: list[PromptItem], texts: list[str],
                  token_ids: list[list[int]], closed: list[str]) -> RewardResult:
    """Every reward on one answer per item, with the columns training's rewards see plus
    ``closed_answer``."""
    columns: dict[str, list] = {key: [it.columns[key] for it in items] for key in (items[0].columns if items else {})}
    columns.update({"completion_length": [len(t) for t in token_ids], "completion_ids": token_ids,
                    "transcript": list(texts), CLOSED_ANSWER: list(closed)})
    assert set(ROLLOUT_COLUMNS) <= set(columns)
    return runner.score([it.raw_prompt for it in items], list(texts), columns)
