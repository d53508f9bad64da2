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

A lost worker costs a retry, not a None. When the process running a call dies (SIGKILL, the
kernel's or Ray's out-of-memory killer, its node gone), the call is submitted again, up to
``reward.max_retries`` times, and each time is counted (``Task.retries``: the runner reports
``reward/<name>/retries``). The timeout still runs from the first attempt's start: a retry never
extends it, so a call whose workers keep dying ends as a counted timeout or, out of retries, a
counted failure. A call that raises is its own error and is never retried.

These are our retries, not Ray's (``max_retries`` on the task, 3 by default for a lost worker): Ray
retries a generator task silently, and nothing in Ray 2.60 tells the task or the caller which
attempt it is (the state API, which would, needs the dashboard we do not start), so its retries
could not be counted. The tasks are therefore submitted with Ray's ``max_retries=0``.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from rlhf.specs import local_spec, portable_spec
from rewards.api import LoadedReward, load_reward
from rewards.pool import Task, run_maybe_async, settle

_loaded: dict[tuple[str, str], LoadedReward] = {}  # per worker process: (spec, kwargs) -> function

log = logging.getLogger(__name__)


class WorkerLost(RuntimeError):
    """A call's Ray worker died on every attempt it was allowed (a counted failure, not a bug of its)."""


def lost_worker_errors() -> tuple[type[BaseException], ...]:
    """What Ray raises for a call whose worker process or node died rather than for the call itself:
    the system failures Ray's own ``max_retries`` would retry. A call's own exception comes as a
    RayTaskError instead."""
    from ray.exceptions import (LocalRayletDiedError, NodeDiedError, ObjectLostError, OutOfMemoryError,
                                WorkerCrashedError)

    return WorkerCrashedError, NodeDiedError, LocalRayletDiedError, OutOfMemoryError, ObjectLostError


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
    agent episodes too (rlhf/experience/agents.py). ``key``: the config key its errors name.
    ``max_retries``: how many times a call whose worker died runs again (the module docstring), the
    value of config key ``retries_key``; 0: none, the call fails with Ray's error."""

    def __init__(self, body=call_reward, num_cpus: float = 1, resources: dict[str, float] | None = None,
                 key: str = "reward.executor", max_retries: int = 0,
                 retries_key: str = "reward.max_retries") -> None:
        import ray

        if not ray.is_initialized():  # never let a task start an unconfigured local Ray
            raise ValueError(f"{key}=ray needs Ray started first (rlhf.cluster.connect.init_ray)")
        if max_retries < 0:
            raise ValueError(f"{retries_key}={max_retries} must be >= 0")
        # Rewards ask one CPU per call: verifiers are CPU-bound. Ray's own retries off: ours count.
        self._task = ray.remote(num_cpus=num_cpus, max_retries=0, resources=resources or None)(body)
        self.max_retries, self._retries_key = max_retries, retries_key
        self._lost = lost_worker_errors()
        self.abandoned = 0  # tasks cancelled past their timeout since start

    def submit(self, *args: Any) -> Task:
        return Task(call=None, ref=self._task.remote(*args), args=args)

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
            except self._lost as e:  # its worker or node died: run it again while it may
                self._retry(task, e)
            except Exception as e:  # noqa: BLE001 - Ray failed it otherwise: a failure
                settle(task.future, error=e)
            else:
                if not task.attempt_started:
                    task.attempt_started = True
                    if task.started_at is None:  # the first attempt's: the timeout runs from here
                        task.started_at = time.monotonic()
                else:
                    settle(task.future, result=value)

    def _retry(self, task: Task, error: BaseException) -> None:
        """Submit ``task`` again after its worker died, keeping its start (and so its deadline); out
        of retries, fail it with WorkerLost (with no retries allowed, with Ray's own error)."""
        if self.max_retries == 0:
            settle(task.future, error=error)
            return
        if task.retries >= self.max_retries:
            settle(task.future, error=WorkerLost(
                f"its Ray worker died on all {task.retries + 1} attempts ({self._retries_key}="
                f"{self.max_retries}); last: {type(error).__name__}: {error}"))
            return
        if task.started_at is None:  # it was running when its worker died; its marker was lost with it
            task.started_at = time.monotonic()
        task.retries += 1
        task.attempt_started = False
        task.ref = self._task.remote(*task.args)
        log.warning("a Ray task's worker died (%s); retry %d of %s=%d", type(error).__name__, task.retries,
                    self._retries_key, self.max_retries)

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
