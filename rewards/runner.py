"""Scoring a batch of completions with the configured reward functions.

Every function runs concurrently on a :class:`~rewards.pool.DaemonPool`: a batch function as one
task, a per-sample function as one task per completion. With ``reward.executor=ray`` the function
rewards' tasks are Ray tasks instead (rewards/remote.py; class-based rewards stay on the pool),
with the same outcomes and metrics. Each task has ``cfg.timeout_s`` from the moment it starts.
Outcomes, per completion:

- a number: kept;
- None returned by the function: kept as None ("could not score"), counted in ``/none``;
- the function raised, or returned NaN/inf/a non-number: None, counted in ``/failures``;
- the task overran its timeout: None, counted in ``/timeouts`` (a batch function's timeout or
  exception covers its whole batch; a per-sample function's only that completion);
- (``reward.executor=ray``) the task's worker process or node died: run again, up to
  ``cfg.max_retries`` times within the same timeout (rewards/remote.py), each counted in
  ``/retries``; out of retries, a failure;
- a batch function returning a list of the wrong length: :class:`RewardError` at once (a bug).

Given ``columns`` (the column names ``score`` will be passed), loading checks every function's
keyword parameters against them and the kwargs (:func:`rewards.api.column_problems`): one with no
default that nothing fills is a ValueError before any function is built; ones left to their
defaults are logged as one warning per function.

A class-based reward with ``usage()`` (cumulative counters, e.g. the judge's requests, tokens and
unparsable replies) has each call's increase reported as ``<name>/<counter>`` metrics
(:attr:`RewardResult.counted`: they add up over dynamic sampling's draws), and :meth:`api_usage`
sums the API requests and tokens of all of them for the ledger. ``reward.agreement`` names two
functions whose agreement (rewards/agreement.py) is logged as ``agreement/<a>_vs_<b>``.

When one function's failures + timeouts exceed ``cfg.max_failure_rate`` of the batch, ``score``
raises :class:`RewardError` naming the function, the first error and the input that caused it.
The total is the weighted sum over functions with weight != 0; it is None for a completion when
any of those gave None. Nothing is ever replaced by 0.
"""

from __future__ import annotations

import logging
import math
import numbers
import time
from concurrent.futures import FIRST_COMPLETED, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from omegaconf import OmegaConf

from rlhf.config import RewardConfig
from rewards.agreement import agreement
from rewards.api import (LoadedReward, column_problems, default_name, load_reward, missing_columns_message,
                         resolve)
from rewards.pool import DaemonPool, Task
from rewards.remote import RayTasks

_POLL_S = 0.05  # how often running tasks are checked against their deadline
EXECUTORS = ("threads", "ray")
# A Ray task that cannot start (no free CPU in the cluster) has no deadline of its own: when no call
# has started or finished for timeout_s + this long, the runner stops instead of hanging.
_QUEUED_S = 60.0

log = logging.getLogger(__name__)


class RewardError(RuntimeError):
    """A reward function is broken (wrong output length, too many failures); names the function."""


class RewardTimeout(TimeoutError):
    """A reward task ran past reward.timeout_s (distinct from a TimeoutError the function raised)."""


@dataclass
class RewardResult:
    total: list[float | None]  # weighted sum per completion; None when a weighted function gave None
    per_fn: dict[str, list[float | None]]  # every function's values, weight 0 included
    metrics: dict[str, float] = field(default_factory=dict)
    counted: frozenset[str] = frozenset()  # metric keys that count events: they add up across calls


@dataclass(frozen=True)
class ApiUsage:
    """Paid API use of the rewards that report it (``usage()``), cumulative since the runner started."""

    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class _Outcome:
    """What one function produced for the batch, before validation into values."""

    values: list[float | None]
    failures: int = 0
    timeouts: int = 0
    retries: int = 0  # attempts run again after their Ray worker died
    first_error: str | None = None
    first_error_index: int | None = None

    def fail(self, i: int, kind: str, message: str) -> None:
        self.values[i] = None
        if kind == "timeout":
            self.timeouts += 1
        else:
            self.failures += 1
        if self.first_error is None:
            self.first_error, self.first_error_index = f"{kind}: {message}", i


class RewardRunner:
    def __init__(self, cfg: RewardConfig, columns: Sequence[str] | None = None,
                 run_dir: str | Path | None = None):
        """``columns``: the column names ``score`` will be passed; None skips the check against them.
        ``run_dir``: the run folder, handed with ``columns`` to class rewards that ask for them
        (rewards.api.CONTEXT). No functions is allowed (pure distillation, rlhf/validation.py's
        check_distill): every total is then the empty sum, 0."""
        if cfg.timeout_s <= 0:
            raise ValueError(f"reward.timeout_s={cfg.timeout_s} must be > 0")
        if cfg.executor not in EXECUTORS:
            raise ValueError(f"reward.executor={cfg.executor!r} is not one of {list(EXECUTORS)}")
        if cfg.max_retries < 0:
            raise ValueError(f"reward.max_retries={cfg.max_retries} must be >= 0")
        self.timeout_s = float(cfg.timeout_s)
        self.max_failure_rate = float(cfg.max_failure_rate)
        self.functions: list[LoadedReward] = []
        all_kwargs = [_plain(f.kwargs) for f in cfg.functions]
        self._kwargs: dict[str, dict] = {}  # by function name: what a Ray task loads it with
        self.agreement = check_agreement(cfg)
        context = {"run_dir": run_dir, "columns": list(columns) if columns is not None else None}
        if columns is not None:  # before any function is built (a reward model starts an actor)
            for i, (f, kwargs) in enumerate(zip(cfg.functions, all_kwargs)):
                _check_columns(f"reward.functions[{i}]", f.name or default_name(f.fn), f.fn, kwargs, columns)
        try:
            for i, (f, kwargs) in enumerate(zip(cfg.functions, all_kwargs)):
                loaded = load_reward(f.fn, kwargs, f.weight, f.name, context)
                if loaded.name in {g.name for g in self.functions}:
                    raise ValueError(
                        f"reward.functions[{i}] ({f.fn!r}): a function named {loaded.name!r} is "
                        "already configured; give one of them a distinct `name`"
                    )
                self.functions.append(loaded)
                self._kwargs[loaded.name] = kwargs
        except BaseException:
            self._close_functions()
            raise
        self._pool = DaemonPool(max(1, cfg.num_workers))
        self._remote = RayTasks(max_retries=cfg.max_retries) if cfg.executor == "ray" else None
        self._usage_seen: dict[str, dict[str, float]] = {f.name: self._usage_of(f) for f in self.functions
                                                         if self._usage_of(f) is not None}

    def score(self, prompts: list[str], completions: list[str], columns: dict[str, list]) -> RewardResult:
        n = len(completions)
        if len(prompts) != n:
            raise ValueError(f"{len(prompts)} prompts but {n} completions")
        for key, values in columns.items():
            if len(values) != n:
                raise ValueError(f"column {key!r} has {len(values)} values for {n} completions")

        # Submit everything first so that all functions run at once.
        submitted: list[tuple[LoadedReward, list[Task]]] = []
        for fn in self.functions:
            if fn.sample_fn is not None:
                tasks = [
                    self._submit(fn, True, (prompts[i], completions[i]), {k: v[i] for k, v in columns.items()})
                    for i in range(n)
                ]
            else:
                tasks = [self._submit(fn, False, (list(prompts), list(completions)),
                                      {k: list(v) for k, v in columns.items()})]
            submitted.append((fn, tasks))
        self._wait([t for _, tasks in submitted for t in tasks])

        per_fn: dict[str, list[float | None]] = {}
        metrics: dict[str, float] = {}
        for fn, tasks in submitted:
            outcome = _outcome_of(fn, tasks, n)
            per_fn[fn.name] = outcome.values
            metrics.update(_fn_metrics(fn.name, outcome))
            bad = outcome.failures + outcome.timeouts
            if n and bad / n > self.max_failure_rate:
                i = outcome.first_error_index or 0
                raise RewardError(
                    f"reward {fn.name!r} ({fn.spec}) failed on {bad}/{n} completions "
                    f"({outcome.failures} errors/invalid values, {outcome.timeouts} timeouts after "
                    f"{self.timeout_s}s), above reward.max_failure_rate={self.max_failure_rate}. "
                    f"First: {outcome.first_error}. Input: prompt={_clip(prompts[i])!r} "
                    f"completion={_clip(completions[i])!r}"
                )
        total = weighted_total([(f.weight, per_fn[f.name]) for f in self.functions], n)
        metrics.update(total_metrics(total))
        metrics["reward/abandoned_tasks"] = float(self._pool.abandoned + self._abandoned_remote())
        if self.agreement:
            a, b = self.agreement
            agreed = agreement(per_fn[a], per_fn[b])
            metrics[f"agreement/{a}_vs_{b}"] = agreed.agree
            metrics[f"agreement/{a}_vs_{b}/pearson"] = agreed.pearson
        counted = self._usage_metrics()
        metrics.update(counted)
        return RewardResult(total=total, per_fn=per_fn, metrics=metrics, counted=frozenset(counted))

    def api_usage(self) -> ApiUsage:
        """Requests and tokens paid so far (cache hits are not) by the rewards that report usage()."""
        seen = [u for f in self.functions if (u := self._usage_of(f)) is not None]
        return ApiUsage(*(int(sum(u.get(k, 0.0) for u in seen))
                          for k in ("requests", "prompt_tokens", "completion_tokens")))

    @staticmethod
    def _usage_of(fn: LoadedReward) -> dict[str, float] | None:
        usage = getattr(fn.owner, "usage", None)
        return dict(usage()) if callable(usage) else None

    def _usage_metrics(self) -> dict[str, float]:
        """Each usage() counter's increase since the last call, as ``<name>/<counter>``. A call that
        timed out may still count later: its increase lands in the next call's metrics."""
        out = {}
        for fn in self.functions:
            now = self._usage_of(fn)
            if now is None:
                continue
            before = self._usage_seen.get(fn.name, {})
            out.update({f"{fn.name}/{k}": v - before.get(k, 0.0) for k, v in now.items()})
            self._usage_seen[fn.name] = now
        return out

    def close(self) -> None:
        self._pool.shutdown()
        self._close_functions()

    def _submit(self, fn: LoadedReward, per_sample: bool, args: tuple, columns: dict) -> Task:
        if self._remote is not None and fn.owner is None:  # class-based rewards keep to the driver
            return self._remote.submit_reward(fn, self._kwargs[fn.name], per_sample, args, columns)
        return self._pool.submit(_bind(fn.sample_fn if per_sample else fn.batch_fn, *args, columns))

    def _abandoned_remote(self) -> int:
        return self._remote.abandoned if self._remote is not None else 0

    def __enter__(self) -> "RewardRunner":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _wait(self, tasks: list[Task]) -> None:
        pending = set(tasks)
        progress, started = time.monotonic(), 0
        while pending:
            remote = [t for t in pending if t.ref is not None]
            if remote:
                self._remote.poll(remote, _POLL_S)
            else:
                wait([t.future for t in pending], timeout=_POLL_S, return_when=FIRST_COMPLETED)
            now = time.monotonic()
            for t in list(pending):
                if t.future.done():
                    pending.discard(t)
                    progress = now
                elif t.started_at is not None and now - t.started_at > self.timeout_s:
                    owner = self._remote if t.ref is not None else self._pool
                    owner.abandon(t, RewardTimeout(f"no result after {self.timeout_s}s"))
                    pending.discard(t)
                    progress = now
            if (now_started := sum(t.started_at is not None for t in pending)) != started:
                progress, started = now, now_started
            queued = [t for t in pending if t.ref is not None and t.started_at is None]
            if queued and now - progress > self.timeout_s + _QUEUED_S:
                self._remote.cancel(list(pending))
                raise RewardError(
                    f"reward.executor=ray: {len(queued)} reward calls waited {now - progress:.0f}s for a "
                    "Ray worker and none started; each asks for 1 CPU and the cluster has none free"
                )

    def _close_functions(self) -> None:
        for f in self.functions:
            f.close()


def weighted_total(parts: Sequence[tuple[float, Sequence[float | None]]], n: int) -> list[float | None]:
    """Per completion, the weighted sum of the parts (weight, values) whose weight is not 0; None
    where any of those parts is None. The one None rule of rewards: the runner's total over its
    functions, and rlhf/experience/scoring.py's environment reward added to that total."""
    weighted = [(w, values) for w, values in parts if w != 0]
    return [None if any(values[i] is None for _, values in weighted) else sum(w * values[i] for w, values in weighted)
            for i in range(n)]


def total_metrics(total: Sequence[float | None]) -> dict[str, float]:
    """reward/total/mean over the completions scored, reward/total/none: how many were not."""
    scored = [t for t in total if t is not None]
    return {"reward/total/mean": sum(scored) / len(scored) if scored else math.nan,
            "reward/total/none": float(len(total) - len(scored))}


def check_agreement(cfg: RewardConfig) -> tuple[str, str] | None:
    """reward.agreement as (a, b), or None; a ValueError naming the key for anything else."""
    if not cfg.agreement:
        return None
    names = [f.name or default_name(f.fn) for f in cfg.functions]
    if len(cfg.agreement) != 2 or cfg.agreement[0] == cfg.agreement[1]:
        raise ValueError(f"reward.agreement={list(cfg.agreement)}: name two different functions, e.g. "
                         "[judge, math_answer]")
    unknown = [a for a in cfg.agreement if a not in names]
    if unknown:
        raise ValueError(f"reward.agreement={list(cfg.agreement)}: {unknown} not among reward.functions "
                         f"names {names}")
    return cfg.agreement[0], cfg.agreement[1]


def _plain(kwargs: Any) -> dict[str, Any]:
    return OmegaConf.to_container(kwargs) if OmegaConf.is_config(kwargs) else dict(kwargs or {})


def _check_columns(where: str, name: str, spec: str, kwargs: dict[str, Any], columns: Sequence[str]) -> None:
    required, defaulted = column_problems(resolve(spec), kwargs, columns)
    if required:
        raise ValueError(missing_columns_message(where, name, spec, required, columns))
    if defaulted:
        # Tunables (time_s=5.0) legitimately keep their defaults; a misspelt column lands here too.
        log.warning("%s %r (%s): parameter(s) %s are neither a column nor a kwarg and take their "
                    "defaults; the columns passed are %s", where, name, spec, defaulted, sorted(columns))


def _bind(fn: Any, prompt: Any, completion: Any, columns: dict[str, Any]) -> Any:
    return lambda: fn(prompt, completion, **columns)


def _outcome_of(fn: LoadedReward, tasks: list[Task], n: int) -> _Outcome:
    """One function's finished tasks as per-completion values, with its failures and timeouts."""
    out = _Outcome(values=[None] * n, retries=sum(t.retries for t in tasks))
    if fn.sample_fn is not None:
        for i, t in enumerate(tasks):
            error = t.future.exception()
            if error is not None:
                out.fail(i, _kind(error), _describe(error))
            else:
                _store(out, i, t.future.result())
        return out
    (task,) = tasks
    error = task.future.exception()
    if error is not None:
        for i in range(n):
            out.fail(i, _kind(error), _describe(error))
        return out
    values = task.future.result()
    if not isinstance(values, (list, tuple)):
        raise RewardError(
            f"reward {fn.name!r} ({fn.spec}) returned {type(values).__name__}; a reward function "
            f"returns a list with one float or None per completion ({n})"
        )
    if len(values) != n:
        raise RewardError(
            f"reward {fn.name!r} ({fn.spec}) returned {len(values)} values for {n} completions"
        )
    for i, v in enumerate(values):
        _store(out, i, v)
    return out


def _store(out: _Outcome, i: int, value: Any) -> None:
    if value is None:
        return
    if not isinstance(value, numbers.Real):
        out.fail(i, "invalid", f"returned {type(value).__name__} {value!r:.60}, not a number")
    elif not math.isfinite(float(value)):
        out.fail(i, "invalid", f"returned {value}")
    else:
        out.values[i] = float(value)


def _fn_metrics(name: str, out: _Outcome) -> dict[str, float]:
    vals = [v for v in out.values if v is not None]
    mean = sum(vals) / len(vals) if vals else math.nan
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / len(vals)) if vals else math.nan
    return {
        f"reward/{name}/mean": mean,
        f"reward/{name}/std": std,
        f"reward/{name}/failures": float(out.failures),
        f"reward/{name}/timeouts": float(out.timeouts),
        f"reward/{name}/retries": float(out.retries),
        # Deliberate Nones: completions the function declined to score.
        f"reward/{name}/none": float(len(out.values) - len(vals) - out.failures - out.timeouts),
    }


def _kind(error: BaseException) -> str:
    return "timeout" if isinstance(error, RewardTimeout) else "error"


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


def _clip(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[:limit] + "..."
