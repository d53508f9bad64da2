"""Agent episodes: the application runs, the gateway records what the model sampled, and the batch
is the same ``Episodes`` the trainer's own turn loop (rlhf/experience/episodes.py) makes.

Each episode: ``gateway.open`` (its own key and call budget) -> the agent (rlhf/experience/agent_api.py)
runs against the gateway's URL with that key -> ``gateway.close`` -> its record as a Completion (the
last segment; earlier ones in ``Completion.segments``). Rows keep the RolloutBatch grouping: prompt
i's n episodes are rows i*n .. i*n+n-1. At most agent.concurrency episodes are open at once, so the
gateway batches the calls of the open ones together.

The episode's own reward (the env slot, a reward named "agent" weighted by agent.reward_weight):
what the callable returned, else the number a command printed last, else the reward the application
posted to the gateway; None when there is none (agent/reward_none counts every None, failed
episodes' included). reward.functions score the last reply (``last_turns``); a reward that reads
``transcript`` gets the episode's messages as text.

Limits: an episode past agent.timeout_s (from its start) is abandoned and its key closed, so its
later calls fail; an agent that raises, exits non-zero or returns a non-number is an error; one
that never calls the model made no sample. Each is counted (agent/timeouts, agent/errors,
agent/no_calls: disjoint, in that order), the first message is printed, and the row's total reward
is None whatever the reward functions say: weight 0, no loss. An episode with no model call has
nothing to train on; its row is a placeholder (the prompt's own ids and one filler token, finish
reason "abort") that only keeps the grouping, and carries no loss and no mismatch statistics, which
both skip rows of weight 0.
"""

from __future__ import annotations

import json
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, wait
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Callable

from rlhf.config import AgentConfig
from rlhf.experience.agent_api import AgentSpec, play, play_task
from rlhf.experience.episodes import EnvRuntime, Episodes, env_items, run_episodes
from rlhf.specs import portable_spec
from rlhf.types import Completion, RolloutBatch, SamplingSettings
from rewards.pool import DaemonPool, Task
from rewards.remote import RayTasks
from rollouts.engine import derive_seed

if TYPE_CHECKING:
    from rollouts.gateway import EpisodeRecord, Gateway

AGENT_REWARD = "agent"  # the agent reward's name among the reward functions' (metrics, eval_reward)
FAILURES = ("timeouts", "errors", "no_calls")  # why an episode carries no reward, in precedence order
# Agent metrics that count events: summed over dynamic-sampling draws (the gateway's are counters too).
AGENT_COUNTED = (*(f"agent/{why}" for why in FAILURES), "agent/reward_none", "agent/prompt_tokens",
                 "agent/completion_tokens")


def agent_configured(cfg: AgentConfig) -> bool:
    return cfg.name is not None or cfg.command is not None


def gateway_host(cfg) -> str:
    """Where a gateway listens: gateway.host, else this node's address as Ray registered it
    (127.0.0.1 on one machine). ``cfg``: the whole Config."""
    if cfg.gateway.host is not None:
        return cfg.gateway.host
    from rlhf.cluster.node import this_node

    return this_node().ip


class AgentRuntime:
    """The configured agent, the gateway its episodes talk to, and the threads (or Ray tasks) they
    run on.

    ``gateway``: a started rollouts.gateway.Gateway that samples with ``sampling``; ``filler_id``:
    the token of a placeholder row; ``gateway_for(sampling)``: builds a gateway that samples
    otherwise (held-out evaluation's temperature), which this runtime then shuts down with its own."""

    def __init__(self, cfg: AgentConfig, gateway: Gateway, sampling: SamplingSettings | None = None,
                 filler_id: int = 0, model_name: str = "policy",
                 gateway_for: Callable[[SamplingSettings], Gateway] | None = None) -> None:
        self.cfg = cfg
        self.gateway = gateway
        self.sampling = sampling
        self.filler_id = filler_id
        self._gateway_for = gateway_for
        self._others: dict[SamplingSettings, AgentRuntime] = {}
        name = cfg.name if cfg.executor != "ray" or cfg.name is None else portable_spec(cfg.name)
        self.spec = AgentSpec(name=name, command=tuple(cfg.command) if cfg.command else None,
                              kwargs=dict(cfg.kwargs or {}), timeout_s=cfg.timeout_s, model_name=model_name)
        # As Ray tasks: no CPU asked (an agent waits on the gateway; agent.concurrency bounds how many
        # run), placed by agent.resources, e.g. {agents: 0.01} for nodes started with that resource.
        # Not retried when its worker dies (RayTasks' max_retries=0: an agent/errors): a rerun would need
        # a fresh gateway key, the dead attempt's recorded calls dropped, unlike a reward call's rerun.
        self.tasks = (RayTasks(play_task, num_cpus=0, resources=dict(cfg.resources), key="agent.executor")
                      if cfg.executor == "ray" else ThreadAgents(cfg.concurrency))

    @classmethod
    def start(cls, cfg, engines, tokenizer, sampling: SamplingSettings) -> AgentRuntime:
        """The gateway in front of ``engines`` on gateway.host (else this node's Ray address: 127.0.0.1
        on one machine), and the agent ready to run against it. ``cfg``: the whole Config."""
        from rollouts.gateway import Gateway

        host = gateway_host(cfg)

        def gateway_for(s: SamplingSettings) -> Gateway:
            return Gateway(engines, tokenizer, s, cfg.gateway, cfg.rollout.max_model_len, host=host)

        filler = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        return cls(cfg.agent, gateway_for(sampling), sampling, filler, cfg.gateway.model_name, gateway_for)

    @classmethod
    def relayed(cls, cfg, api_key: str | None) -> AgentRuntime:
        """The agent against the closed API it runs on today (compare.base_url / compare.model, with
        ``api_key``) through a relay that records what it saw (rollouts/gateway/relay.py): sampling
        is that API's, as the application asks it. ``cfg``: the whole Config."""
        from rlhf.chat.client import Endpoint
        from rollouts.gateway.relay import RelayGateway

        c = cfg.compare
        relay = RelayGateway(Endpoint.of(c, owner="compare"), api_key, c.model, cfg.gateway, host=gateway_host(cfg))
        return cls(cfg.agent, relay, model_name=c.model)

    def with_sampling(self, sampling: SamplingSettings) -> AgentRuntime:
        """This agent against a gateway that samples with ``sampling`` (n aside: one per call); itself
        when it was given one gateway and no way to build others (a relay to a closed API samples as
        that API does)."""
        key = replace(sampling, n=1)
        if self._gateway_for is None or key == replace(self.sampling, n=1):
            return self
        if key not in self._others:
            # Its own threads: with trainer.max_staleness > 0 an evaluation runs beside the next batch.
            self._others[key] = AgentRuntime(self.cfg, self._gateway_for(key), key, self.filler_id,
                                             self.spec.model_name)
        return self._others[key]

    def close(self) -> None:
        for other in self._others.values():
            other.close()
        self.gateway.shutdown()
        self.tasks.close()


@dataclass
class _Open:
    """An episode in flight."""

    index: int
    key: str
    task: Task
    submitted_at: float


def run_agent_episodes(runtime: AgentRuntime, items, n: int, seed: int | None = None) -> Episodes:
    """``n`` episodes of each PromptItem in ``items``; episode j's calls are seeded from (seed, j)."""
    cfg, gw = runtime.cfg, runtime.gateway
    rows = env_items(items)
    total = len(items) * n
    records: list[EpisodeRecord | None] = [None] * total
    outcomes: list[float | BaseException | None] = [None] * total
    live: dict[int, _Open] = {}
    waiting = list(range(total))[::-1]  # popped from the end: episode 0 first
    started = time.perf_counter()
    try:
        while waiting or live:
            while waiting and len(live) < cfg.concurrency:
                j = waiting.pop()
                key = gw.open(seed=None if seed is None else derive_seed(seed, j), max_calls=cfg.max_calls)
                task = runtime.tasks.submit(runtime.spec, gw.base_url, key, rows[j // n])
                live[j] = _Open(j, key, task, time.monotonic())
            runtime.tasks.poll([o.task for o in live.values()], 0.05)
            now = time.monotonic()
            for j, o in list(live.items()):
                if not o.task.future.done() and now - (o.task.started_at or o.submitted_at) > cfg.timeout_s:
                    what = "ran" if o.task.started_at is not None else "waited to start (no worker or node free)"
                    runtime.tasks.abandon(o.task, TimeoutError(f"the episode {what} past agent.timeout_s={cfg.timeout_s}s"))
                if o.task.future.done():
                    records[j] = gw.close(o.key)  # its later calls fail: a timed-out agent stops sampling
                    outcomes[j] = o.task.future.exception() or o.task.future.result()
                    del live[j]
    finally:
        for o in live.values():  # interrupted: no episode may stay open on the gateway
            gw.close(o.key)
    return assemble_episodes(items, n, records, outcomes, runtime.filler_id, runtime.gateway.metrics(),
                             time.perf_counter() - started)


def assemble_episodes(items, n: int, records: list[EpisodeRecord], outcomes: list[float | BaseException | None],
                      filler_id: int, gateway_metrics: dict[str, float], seconds: float = 0.0) -> Episodes:
    """The batch from each episode's gateway record and its agent's outcome (its reward, or what it
    raised), rows in episode order; the module docstring's rules."""
    completions, rewards, failed, first_error = [], [], [], None
    for j, (rec, outcome) in enumerate(zip(records, outcomes, strict=True)):
        c = rec.to_completion(j // n)
        why = ("timeouts" if isinstance(outcome, TimeoutError) else "errors" if isinstance(outcome, BaseException)
               else "no_calls" if rec.calls == 0 else None)
        if isinstance(outcome, BaseException) and first_error is None:
            first_error = _described(outcome)
        # No token ids: no call, or calls relayed to another endpoint (rollouts/gateway/relay.py), which
        # keeps them; evaluation only reads such an episode's reply and reward.
        completions.append(c if c is not None else _placeholder(items[j // n], j // n, filler_id))
        failed.append(why)
        rewards.append(None if why else _reward(outcome, rec))
    counts = {f"agent/{why}": float(failed.count(why)) for why in FAILURES}
    if any(failed):
        print(f"agent: {sum(map(bool, failed))} of {len(failed)} episodes carry no reward ("
              + ", ".join(f"{k.split('/')[1]} {int(v)}" for k, v in counts.items()) + ")"
              + (f"; first error: {first_error}" if first_error else ""), flush=True)
    recs = [r for r in records if r is not None]
    metrics = {
        **counts,
        "agent/reward_none": float(sum(r is None for r in rewards)),
        "agent/calls_mean": sum(r.calls for r in recs) / len(recs) if recs else 0.0,
        "agent/segments_mean": sum(len(r.segments) for r in recs) / len(recs) if recs else 0.0,
        # Tokens the gateway appended between calls (tool results, turn headers): masked out of the loss.
        "agent/observation_tokens_mean": sum(m == 0 for r in recs for s in r.segments for m in s.mask) / len(recs)
        if recs else 0.0,
        # What the calls used, as an API bills it: every call's whole prompt, and its reply.
        "agent/prompt_tokens": float(sum(r.prompt_tokens for r in recs)),
        "agent/completion_tokens": float(sum(r.completion_tokens for r in recs)),
        **gateway_metrics,
    }
    return Episodes(
        rollouts=RolloutBatch(completions, n=n, generate_s=seconds),
        env_rewards=rewards,
        metrics=metrics,
        last_turns=[r.final_text for r in records],
        unfinished=[None] * len(records),
        reward_name=AGENT_REWARD,
        failed=failed,
        transcripts=[transcript_text(r.transcript) for r in records],
        completion_tokens=[r.completion_tokens for r in records],
    )


def _described(error: BaseException) -> str:
    """The error and where it was raised (the innermost frame: usually the agent's own line)."""
    frames = traceback.extract_tb(error.__traceback__)
    where = f" (at {frames[-1].filename}:{frames[-1].lineno} in {frames[-1].name})" if frames else ""
    return f"{type(error).__name__}: {error}{where}"


def _reward(outcome: float | None, rec: EpisodeRecord) -> float | None:
    """The agent's own reward: returned or printed, else posted to the gateway."""
    if outcome is not None:
        return outcome
    return rec.posted_reward if rec.reward_posted else None


def _placeholder(item, prompt_index: int, filler_id: int) -> Completion:
    return Completion(prompt_index=prompt_index, prompt_ids=list(item.prompt_ids), completion_ids=[filler_id],
                      logprobs=[0.0], finish_reason="abort", text="")


def transcript_text(messages: list[dict]) -> str:
    """An episode's messages as the ``transcript`` column's text: one ``role: content`` block each,
    a reply's tool calls as their JSON."""
    blocks = []
    for m in messages:
        text = m.get("content") or ""
        if not isinstance(text, str):  # content parts: their text
            text = "".join(p.get("text", "") for p in text if isinstance(p, dict))
        calls = m.get("tool_calls")
        blocks.append(f"{m.get('role', '?')}: {text}" + (f"\n{json.dumps(calls)}" if calls else ""))
    return "\n\n".join(blocks)


def roll_out(source: EnvRuntime | AgentRuntime, engines, items, sampling: SamplingSettings,
             seed: int | None = None) -> Episodes:
    """``sampling.n`` episodes of each item: the agent's through its gateway (sampling as ``sampling``
    says, n aside), or the trainer's turn loop with ``source``'s environment (or none: one turn)."""
    if isinstance(source, AgentRuntime):
        return run_agent_episodes(source.with_sampling(sampling), items, sampling.n, seed)
    return run_episodes(engines, [it.prompt_ids for it in items], env_items(items), sampling, source, seed=seed)


def own_reward(source: EnvRuntime | AgentRuntime) -> tuple[bool, float]:
    """Whether episodes from ``source`` carry a reward of their own, and its weight in the total."""
    if isinstance(source, AgentRuntime):
        return True, source.cfg.reward_weight
    return source.factory is not None, source.cfg.reward_weight


class ThreadAgents:
    """Episodes in the driver's daemon threads (rewards/pool.py): a hung agent's thread is retired,
    never joined."""

    def __init__(self, size: int) -> None:
        # The client library imported here, once: episodes' threads importing it at the same time
        # may see each other's half-imported modules.
        import openai  # noqa: F401

        self.pool = DaemonPool(size, name="agent")

    def submit(self, spec: AgentSpec, base_url: str, key: str, row: dict[str, Any]) -> Task:
        return self.pool.submit(lambda: play(spec, base_url, key, row))

    def poll(self, tasks: list[Task], timeout_s: float) -> None:
        wait([t.future for t in tasks], timeout=timeout_s, return_when=FIRST_COMPLETED)

    def abandon(self, task: Task, error: BaseException) -> None:
        self.pool.abandon(task, error)

    def close(self) -> None:
        self.pool.shutdown()
