"""Rollouts generated ahead of the learner (trainer.max_staleness = k): the producer the loop drives.

One background thread draws, generates and scores the batch of each step, in step order. The loop
asks for the batches up to step s + k before it trains step s, so the engines sample step s + k
while the learner trains step s, and it syncs weights only once nothing is in flight (``wait``).
So the batch of step t is sampled by the weights after update t - 1 - k (after update 0 for the
first k steps): every batch is trained on at most k updates after the policy that sampled it.
With k = 0 each batch is asked for and taken in the same step: the synchronous loop.

In-flight batches at a checkpoint are finished and saved with it (``pending`` / ``restore``), as
JSON: the weights that sampled them are gone, so they could not be regenerated.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from rlhf.data import PromptItem
from rlhf.types import Completion


@dataclass
class Collected:
    """One step's kept groups, and what every draw cost (dropped groups included)."""

    step: int  # the training step this batch is for
    policy_version: int  # learner updates (steps) applied to the weights that sampled it
    items: list[PromptItem]  # per kept group
    completions: list[Completion]  # n per kept group, in group order
    scores: list[tuple[list, dict[str, list]]]  # (total rewards, {fn: rewards}) per kept group
    generated_tokens: int  # over every draw: dropped groups were generated too
    metrics: dict[str, float] = field(default_factory=dict)  # timing/generate, score, reward runner

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> Collected:
        return cls(
            step=d["step"],
            policy_version=d["policy_version"],
            items=[PromptItem(**it) for it in d["items"]],
            completions=[Completion(**c) for c in d["completions"]],
            scores=[(list(total), dict(per_fn)) for total, per_fn in d["scores"]],
            generated_tokens=d["generated_tokens"],
            metrics=dict(d["metrics"]),
        )


class RolloutProducer:
    """Batches of steps ``first_step`` .. ``last_step``, produced by ``produce(step,
    policy_version)`` in one background thread, in the order they are asked for."""

    def __init__(self, produce: Callable[[int, int], Collected], first_step: int, last_step: int) -> None:
        self._produce = produce
        self._last_step = last_step
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rollouts")
        self._batches: dict[int, Future] = {}
        self._next = first_step  # the first step not asked for yet

    def restore(self, batches: list[Collected]) -> None:
        """Batches saved in a checkpoint, already produced: steps after the checkpoint's."""
        for b in sorted(batches, key=lambda b: b.step):
            done: Future = Future()
            done.set_result(b)
            self._batches[b.step] = done
            self._next = max(self._next, b.step + 1)

    def ask(self, upto_step: int, policy_version: int) -> None:
        """Queue the batches up to ``upto_step`` (the last step at most) not asked for yet; the
        engines hold the weights after ``policy_version`` updates."""
        while self._next <= min(upto_step, self._last_step):
            self._batches[self._next] = self._pool.submit(self._produce, self._next, policy_version)
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

    def close(self) -> None:
        """Stop taking work; a batch in flight ends with its engine calls (or their shutdown)."""
        self._pool.shutdown(wait=False, cancel_futures=True)
