"""One step's rollouts, and the producer that makes them ahead of the learner (trainer.max_staleness = k).

``collect_step`` is a step's batch: draw prompts, roll out, score, refill flat groups (dynamic
sampling), have the teacher score the kept tokens. One background thread (``RolloutProducer``)
runs it for each step, in step order. The loop
asks for the batches up to step s + k before it trains step s, so the engines sample step s + k
while the learner trains step s, and it syncs weights only once nothing is in flight (``wait``).
So the batch of step t is sampled by the weights after update t - 1 - k (after update 0 for the
first k steps): every batch is trained on at most k updates after the policy that sampled it.
With k = 0 each batch is asked for and taken in the same step: the synchronous loop.

In-flight batches at a checkpoint are finished and saved with it (``pending`` / ``restore``), as
JSON: the weights that sampled them are gone, so a resumed run trains on them as saved. A resume
whose trainer.max_staleness no longer admits a saved batch (lowered, e.g. to 0) regenerates it
instead, on its saved prompts, once asked for, with the weights the engines hold then
(``stale_batches``): the batch's policy version is checked against the new config, not trusted.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from rlhf.algo import group_has_signal
from rlhf.config import Config
from rlhf.experience.agents import AGENT_COUNTED, AgentRuntime, own_reward, roll_out
from rlhf.experience.episodes import ENV_COUNTED, EnvRuntime
from rlhf.experience.prompts import PromptItem
from rlhf.experience.scoring import score_episodes
from rlhf.run.timeline import Timeline
from rlhf.types import Completion, SamplingSettings, Scores
from rollouts.engine import derive_seed

if TYPE_CHECKING:
    from rollouts.opd_teacher import TeacherEngines


@dataclass
class Collected:
    """One step's kept groups, and what every draw cost (dropped groups included)."""

    step: int  # the training step this batch is for
    policy_version: int  # learner updates (steps) applied to the weights that sampled it
    items: list[PromptItem]  # per kept group
    completions: list[Completion]  # n per kept group, in group order
    scores: Scores  # per completion, in the order of ``completions``
    generated_tokens: int  # over every draw: dropped groups were generated too
    metrics: dict[str, float] = field(default_factory=dict)  # timing/generate, score, reward runner

    def to_json(self) -> dict:
        return dataclasses.asdict(self)  # scores: {"total": [...], "per_fn": {fn: [...]}}

    @classmethod
    def from_json(cls, d: dict) -> Collected:
        return cls(
            step=d["step"],
            policy_version=d["policy_version"],
            items=[PromptItem(**it) for it in d["items"]],
            completions=[Completion(**c) for c in d["completions"]],
            scores=_scores_from_json(d["scores"]),
            generated_tokens=d["generated_tokens"],
            metrics=dict(d["metrics"]),
        )


def _scores_from_json(saved: dict | list) -> Scores:
    """Scores as to_json writes them, or as checkpoints written before typed scores hold them: a
    list of [total, {fn: values}] pairs, one per kept group, in group order."""
    if isinstance(saved, list):
        return Scores.concat([Scores(list(total), {k: list(v) for k, v in per_fn.items()}) for total, per_fn in saved])
    return Scores(list(saved["total"]), {k: list(v) for k, v in saved["per_fn"].items()})


# Reward-runner metrics that count events (failed, timed-out, declined, retried calls): summed over draws.
_COUNTED = ("/failures", "/timeouts", "/none", "/retries")


def collect_step(cfg: Config, step: int, policy_version: int, data, engines, rewards, env: EnvRuntime | AgentRuntime,
                 sampling: SamplingSettings, timeline: Timeline, teacher: TeacherEngines | None = None,
                 prompts: list[PromptItem] | None = None) -> Collected:
    """The batch of ``step``: draw prompts, roll out (one turn, or several with an environment:
    rlhf/experience/episodes.py; an agent's episodes through the gateway: rlhf/experience/agents.py) and score (rlhf/experience/scoring.py); with dynamic sampling,
    refill zero-variance groups; with a ``teacher``, have it score the kept completions' tokens
    (distill/teacher_tokens, timing/teacher). ``prompts``: a saved batch's, regenerated on resume
    (RolloutProducer.restore): the first draw takes them instead of new ones (dynamic sampling's
    refills still draw new ones).

    Every generate is seeded from (rollout.seed, step, draw), so a resumed run samples exactly what
    an uninterrupted one did. Failure counts and generated tokens add up over draws. Runs in the
    producer's thread: it touches only the data, the engines and the rewards.
    """
    n, want = cfg.rollout.n, cfg.trainer.prompts_per_step
    metrics: dict[str, float] = {}
    kept_items: list[PromptItem] = []
    kept_rollouts: list[Completion] = []
    kept_scores: list[Scores] = []
    draws = cfg.algo.dynamic_sampling_max_draws if cfg.algo.dynamic_sampling else 1
    dropped = generated = 0
    for draw in range(draws):
        items = prompts if draw == 0 and prompts is not None else data.next_batch(want - len(kept_items))
        with timeline.span("generate", step, metrics):
            episodes = roll_out(env, engines, items, sampling, seed=derive_seed(cfg.rollout.seed, step, draw))
        rollouts = episodes.rollouts
        generated += rollouts.num_output_tokens
        with timeline.span("score", step, metrics):
            with_own, weight = own_reward(env)
            scored = score_episodes(rewards, items, episodes, weight, with_own)
        scores = Scores(scored.total, scored.per_fn)
        for g, item in enumerate(items):
            group = scores.rows(g * n, (g + 1) * n)
            last_draw = draw == draws - 1
            if cfg.algo.dynamic_sampling and not group_has_signal(group.total) and not last_draw:
                dropped += 1
                continue
            kept_items.append(item)
            kept_rollouts.extend(rollouts.completions[g * n : (g + 1) * n])
            kept_scores.append(group)
        for key, value in {**scored.metrics, **episodes.metrics}.items():
            counted = (key.endswith(_COUNTED) or key in ENV_COUNTED or key in AGENT_COUNTED or key in scored.counted
                       or key.startswith("gateway/") and not key.endswith("_mean"))  # the gateway's counters
            metrics[key] = metrics.get(key, 0.0) + value if counted else value
        if len(kept_items) == want:
            break
    metrics["dynamic_sampling/dropped_groups"] = dropped
    metrics["dynamic_sampling/draws"] = draw + 1
    metrics["async/regenerated"] = float(prompts is not None)
    if teacher is not None:
        with timeline.span("teacher", step, metrics):
            metrics["distill/teacher_tokens"] = float(teacher.score(kept_rollouts).tokens)
    for c in kept_rollouts:
        c.policy_version = policy_version
    return Collected(step, policy_version, kept_items, kept_rollouts, Scores.concat(kept_scores), generated, metrics)


def stale_batches(batches: list[Collected], max_staleness: int) -> list[Collected]:
    """The saved batches that ``max_staleness`` no longer admits: the batch of step t meets the
    weights after t - 1 updates, so it is t - 1 - policy_version updates stale when trained."""
    return [b for b in batches if b.step - 1 - b.policy_version > max_staleness]


def regenerate_note(stale: list[Collected], max_staleness: int) -> str:
    """The line a resume prints when it regenerates saved batches."""
    each = ", ".join(f"step {b.step} (sampled after update {b.policy_version}, "
                     f"{b.step - 1 - b.policy_version} update(s) stale)" for b in stale)
    return (f"resume: trainer.max_staleness={max_staleness} does not admit {len(stale)} batch(es) saved in the "
            f"checkpoint: {each}; each is regenerated on its saved prompts by the weights the engines hold when "
            "it is asked for, seeded from (rollout.seed, step, draw) as before (async/regenerated=1 on its step)")


class RolloutProducer:
    """Batches of steps ``first_step`` .. ``last_step``, produced by ``produce(step,
    policy_version)`` in one background thread, in the order they are asked for; a batch
    regenerated on resume by ``produce(step, policy_version, prompts)``, its saved prompts."""

    def __init__(self, produce: Callable[..., Collected], first_step: int, last_step: int) -> None:
        self._produce = produce
        self._last_step = last_step
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rollouts")
        self._batches: dict[int, Future] = {}
        self._prompts: dict[int, list[PromptItem]] = {}  # step -> saved prompts to regenerate on
        self._next = first_step  # the first step not asked for yet

    def restore(self, batches: list[Collected], max_staleness: int) -> list[Collected]:
        """Batches saved in a checkpoint, already produced: steps after the checkpoint's. Those
        ``max_staleness`` does not admit are dropped and regenerated on their prompts when asked
        for; returns them."""
        stale = stale_batches(batches, max_staleness)
        stale_steps = {b.step for b in stale}
        for b in sorted(batches, key=lambda b: b.step):
            if b.step in stale_steps:
                self._prompts[b.step] = b.items
                continue
            done: Future = Future()
            done.set_result(b)
            self._batches[b.step] = done
            self._next = max(self._next, b.step + 1)
        # Staleness never decreases with the step (versions trail steps by at most one each), so
        # the stale ones follow the kept ones: asking resumes at the first of them.
        self._next = min([self._next, *self._prompts])
        return stale

    def ask(self, upto_step: int, policy_version: int) -> None:
        """Queue the batches up to ``upto_step`` (the last step at most) not asked for yet; the
        engines hold the weights after ``policy_version`` updates."""
        while self._next <= min(upto_step, self._last_step):
            step = self._next
            if step not in self._batches:
                prompts = self._prompts.pop(step, None)
                # Only a regenerated batch gets its prompts: a plain produce(step, version) draws its own.
                job = (step, policy_version) if prompts is None else (step, policy_version, prompts)
                self._batches[step] = self._pool.submit(self._produce, *job)
            self._next += 1

    def take(self, step: int) -> Collected:
        """The batch of ``step``, once produced (its error, if producing it failed)."""
        if step not in self._batches:
            raise RuntimeError(f"the batch of step {step} was never asked for")
        return self._batches.pop(step).result()

    def wait(self) -> None:
        """Return once nothing is in flight (the engines are idle); raises a producer error."""
        for future in list(self._batches.values()):
            future.result()

    def pending(self) -> list[Collected]:
        """Every batch produced but not taken yet, in step order (after ``wait``)."""
        self.wait()
        return [self._batches[s].result() for s in sorted(self._batches)]

    def close(self, wait: bool = False) -> None:
        """Stop taking work; a batch in flight ends with its engine calls (or their shutdown), and
        with ``wait`` before this returns (its result or error dropped): it draws prompts from the
        dataset, which a learner restart puts back at the checkpoint's position."""
        self._pool.shutdown(wait=wait, cancel_futures=True)
