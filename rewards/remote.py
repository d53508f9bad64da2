"""``reward.executor=ray``: reward calls as Ray tasks, spread over the cluster's CPUs.

A slow verifier (the code sandbox, math-verify on long answers) then scales with the nodes instead
of queueing on the driver's threads. What runs where:

- Function rewards (batch or ``@per_sample``) run as tasks: a batch function's whole batch is one
  task, a per-sample function's one completion is one task, each asking Ray for 1 CPU. The task
  loads the function itself from its spec (cached per worker process), so nothing of the driver's
  (closures, locks, file-imported modules) has to be pickled. A reward file inside the project
  travels with the shipped code (it is named relative to the project root); one outside it must be
  on storage every node sees at the same absolute path.
- Class-based rewards stay in the driver's thread pool: they hold resources built once (a reward
  model's actor, math-verify's checker process, a sandbox) that must not be rebuilt in every worker.

The semantics are the thread pool's (rewards/runner.py): each call has ``reward.timeout_s`` from the
moment it starts running, not from submission, since Ray may queue it for a free CPU. A task is a
generator whose first item says it has started; past the timeout it is cancelled
(``ray.cancel(force=True)``, which kills its worker process) and counted as a timeout.
"""

from __future__ import annotations

import json
import time
from typing import Any

from rlhf.specs import local_spec, portable_spec
from rewards.api import LoadedReward, load_reward
from rewards.pool import Task, run_maybe_async, settle

_loaded: dict[tuple[str, str], LoadedReward] = {}  # per worker process: (spec, kwargs) -> function


def call_reward(spec: str, kwargs: dict, per_sample: bool, args: tuple, columns: dict):
    """The body of one task: yields a start marker, then the reward's output for ``args``."""
    key = (spec, json.dumps(kwargs, sort_keys=True, default=str))
    if key not in _loaded:
        _loaded[key] = load_reward(local_spec(spec), kwargs)
    fn = _loaded[key]
    yield None  # started: the per-call timeout runs from here, as a pool thread's does
    target = fn.sample_fn if per_sample else fn.batch_fn
    yield run_maybe_async(lambda: target(*args, **columns))


class RayTasks:
    """Runs calls of ``body`` (a generator yielding a start marker, then its result) as Ray tasks and
    settles their futures as they finish (``poll``). Reward calls by default (``submit_reward``);
    agent episodes too (rlhf/experience/agents.py). ``key``: the config key its errors name."""

    def __init__(self, body=call_reward, num_cpus: float = 1, resources: dict[str, float] | None = None,
                 key: str = "reward.executor") -> None:
        import ray

        if not ray.is_initialized():  # never let a task start an unconfigured local Ray
            raise ValueError(f"{key}=ray needs Ray started first (rlhf.cluster.connect.init_ray)")
        # Rewards ask one CPU per call: verifiers are CPU-bound. No retries: a crashed call is a
        # failure, as in the thread pool, not a silent second attempt.
        self._task = ray.remote(num_cpus=num_cpus, max_retries=0, resources=resources or None)(body)
        self.abandoned = 0  # tasks cancelled past their timeout since start

    def submit(self, *args: Any) -> Task:
        return Task(call=None, ref=self._task.remote(*args))

    def submit_reward(self, fn: LoadedReward, kwargs: dict, per_sample: bool, args: tuple, columns: dict) -> Task:
        return self.submit(portable_spec(fn.spec), kwargs, per_sample, args, columns)

    def poll(self, tasks: list[Task], timeout_s: float) -> None:
        """Wait up to ``timeout_s`` for news; mark started tasks, settle finished ones."""
        import ray
        from ray.exceptions import RayTaskError

        live = [t for t in tasks if not t.future.done()]
        if not live:
            return
        by_id = {id(t.ref): t for t in live}
        ready, _ = ray.wait([t.ref for t in live], num_returns=len(live), timeout=timeout_s)
        for gen in ready:
            task = by_id[id(gen)]
            try:
                value = ray.get(next(task.ref))
            except StopIteration:
                settle(task.future, error=RuntimeError("the Ray task ended without a result"))
            except RayTaskError as e:  # the call raised: report its own exception
                settle(task.future, error=e.cause if isinstance(e.cause, BaseException) else e)
            except Exception as e:  # noqa: BLE001 - its worker died, or Ray failed it: a failure
                settle(task.future, error=e)
            else:
                if task.started_at is None:
                    task.started_at = time.monotonic()
                else:
                    settle(task.future, result=value)

    def abandon(self, task: Task, error: BaseException) -> None:
        """Past its timeout: fail the call and kill its task (force: a hung call ignores interrupts)."""
        import ray

        settle(task.future, error=error)
        ray.cancel(task.ref, force=True)
        self.abandoned += 1

    def close(self) -> None:
        """Nothing to release: Ray owns the workers (a cancelled task took its own with it)."""

    def cancel(self, tasks: list[Task]) -> None:
        import ray

        for t in tasks:
            if not t.future.done():
                ray.cancel(t.ref, force=True)
