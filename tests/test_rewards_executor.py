"""reward.executor=ray runs function rewards as Ray tasks with the thread pool's semantics: the same
flaky reward gives the same values and the same counted failures, timeouts and Nones either way."""

from __future__ import annotations

import math
import os
import time

import pytest

from rlhf.config import RewardConfig, RewardFnConfig
from rlhf.specs import PROJECT_ROOT, portable_spec
from rewards.runner import RewardError, RewardRunner

FLAKY = (PROJECT_ROOT / "tests" / "support" / "flaky_rewards.py").as_posix()
# 16 completions: per step of `flaky` (tests/support/flaky_rewards.py) 2 failures and 1 timeout,
# plus one declined (None) and 12 scored 1.0.
COMPLETIONS = ["raise", "nan", "hang", "none"] + [f"answer {i}" for i in range(12)]


def runner(executor: str, *functions: RewardFnConfig, timeout_s: float = 2.0, max_retries: int = 3) -> RewardRunner:
    return RewardRunner(RewardConfig(functions=list(functions), timeout_s=timeout_s, executor=executor,
                                     max_failure_rate=1.0, max_retries=max_retries))


def score(executor: str, *functions: RewardFnConfig):
    with runner(executor, *functions) as r:
        start = time.monotonic()
        result = r.score(["q"] * len(COMPLETIONS), list(COMPLETIONS), {})
        return result, time.monotonic() - start


def per_sample_fn(hang_s: float = 20.0) -> RewardFnConfig:
    return RewardFnConfig(fn=f"{FLAKY}:flaky_by_text", kwargs={"hang_s": hang_s})


@pytest.mark.parametrize("executor", ["threads", "ray"])
def test_per_sample_outcomes_are_counted_alike(ray_session, executor):
    result, seconds = score(executor, per_sample_fn())
    m = result.metrics
    assert (m["reward/flaky_by_text/failures"], m["reward/flaky_by_text/timeouts"],
            m["reward/flaky_by_text/none"]) == (2, 1, 1)  # raise + NaN; the hang; the declined one
    assert m["reward/flaky_by_text/retries"] == 0  # a call that raises is its own error: never retried
    assert result.per_fn["flaky_by_text"] == [None] * 4 + [1.0] * 12
    assert m["reward/abandoned_tasks"] == 1  # cumulative since the runner started: the hang
    assert seconds < 2.0 + 10  # the hang (20 s) was cut at reward.timeout_s=2, not waited out


def test_ray_and_threads_give_the_same_result_and_metrics(ray_session):
    batch = RewardFnConfig(fn=f"{FLAKY}:batch_raises_on_hang", kwargs={"hang_s": 20.0})
    threads, _ = score("threads", per_sample_fn(), batch)
    ray_, _ = score("ray", per_sample_fn(), batch)
    assert ray_.per_fn == threads.per_fn and ray_.total == threads.total
    same = {k: v for k, v in threads.metrics.items() if not (isinstance(v, float) and math.isnan(v))}
    assert {k: ray_.metrics[k] for k in same} == same
    # The batch function hung on its one batch: all 16 completions are timeouts.
    assert threads.metrics["reward/batch_raises_on_hang/timeouts"] == 16


def test_calls_run_in_ray_workers_and_a_timed_out_one_is_killed(ray_session, tmp_path):
    import psutil

    pid_file = tmp_path / "hung.pid"
    spec = RewardFnConfig(fn=f"{FLAKY}:where", kwargs={"pid_file": str(pid_file)})
    with runner("ray", spec) as r:
        result = r.score(["q", "q"], ["pid", "hang"], {})
    pid = result.per_fn["where"][0]
    assert pid is not None and pid != os.getpid()  # scored in a Ray worker, not in this driver
    assert result.metrics["reward/where/timeouts"] == 1
    hung = int(pid_file.read_text())
    deadline = time.monotonic() + 30
    while psutil.pid_exists(hung) and psutil.Process(hung).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, f"the cancelled call's worker {hung} still runs"
        time.sleep(0.2)


def test_a_killed_worker_costs_a_retry_not_a_none(ray_session, tmp_path):
    per_sample = RewardFnConfig(fn=f"{FLAKY}:dies_first", kwargs={"marker_dir": str(tmp_path)})
    batch = RewardFnConfig(fn=f"{FLAKY}:batch_dies_first", kwargs={"marker_dir": str(tmp_path)})
    completions = ["die 1", "die 22", "ok"]
    with runner("ray", per_sample, batch, timeout_s=30.0) as r:
        result = r.score(["q"] * 3, completions, {})
    # Every value is its completion's length: scored by the retry, none lost.
    assert result.per_fn == {"dies_first": [5.0, 6.0, 2.0], "batch_dies_first": [5.0, 6.0, 2.0]}
    m = result.metrics
    # dies_first killed its worker once for each of the two "die" completions ("ok" never): 2
    # retries. batch_dies_first killed it once on its one batch: 1 retry.
    assert (m["reward/dies_first/retries"], m["reward/batch_dies_first/retries"]) == (2, 1)
    assert all(m[f"reward/{f}/{k}"] == 0 for f in ("dies_first", "batch_dies_first")
               for k in ("failures", "timeouts", "none"))
    assert len(list(tmp_path.iterdir())) == 3  # the markers: each first attempt did run (and die)


def test_a_worker_dying_every_time_ends_as_a_counted_failure(ray_session):
    spec = RewardFnConfig(fn=f"{FLAKY}:dies_always")
    start = time.monotonic()
    with runner("ray", spec, timeout_s=30.0, max_retries=1) as r:
        result = r.score(["q", "q"], ["die", "ok"], {})
    m = result.metrics
    # "die": its first attempt and its one retry (reward.max_retries=1) both killed their workers;
    # then a failure, well before the 30 s timeout. "ok" scores 1.0.
    assert result.per_fn["dies_always"] == [None, 1.0]
    assert (m["reward/dies_always/retries"], m["reward/dies_always/failures"], m["reward/dies_always/timeouts"]) == (1, 1, 0)
    assert result.total == [None, 1.0]
    assert time.monotonic() - start < 20


def test_retries_never_extend_the_timeout(ray_session):
    spec = RewardFnConfig(fn=f"{FLAKY}:dies_always")
    with runner("ray", spec, timeout_s=2.0, max_retries=1000) as r:
        start = time.monotonic()
        result = r.score(["q"], ["die"], {})
        seconds = time.monotonic() - start
    m = result.metrics
    # Retries enough for ever: the 2 s from the first attempt's start end it, as a timeout.
    assert result.per_fn["dies_always"] == [None]
    assert (m["reward/dies_always/timeouts"], m["reward/dies_always/failures"]) == (1, 0)
    assert m["reward/dies_always/retries"] >= 1  # as many as fit in 2 s: a worker starts in ~0.5-1 s
    assert seconds < 2.0 + 3  # the deadline, one poll, and the first attempt's wait for a worker


def test_a_file_reward_inside_the_project_travels_by_a_relative_spec():
    assert portable_spec(f"{FLAKY}:flaky") == "tests/support/flaky_rewards.py:flaky"
    assert portable_spec("/elsewhere/r.py:f") == "/elsewhere/r.py:f"
    assert portable_spec("math_answer") == "math_answer"


def test_ray_executor_needs_ray_started_first():
    import ray

    if ray.is_initialized():
        pytest.skip("the session's Ray is up in this process")
    with pytest.raises(ValueError, match="reward.executor=ray needs Ray started first"):
        runner("ray", per_sample_fn())


def test_unknown_executor_is_named():
    with pytest.raises(ValueError, match=r"reward.executor='dask' is not one of \['threads', 'ray'\]"):
        runner("dask", per_sample_fn())


def test_a_call_that_never_gets_a_cpu_fails_instead_of_hanging(ray_session, monkeypatch):
    import rewards.runner as runner_mod

    monkeypatch.setattr(runner_mod, "_QUEUED_S", 1.0)
    with runner("ray", per_sample_fn(), timeout_s=1.0) as r:
        r._remote._task = r._remote._task.options(num_cpus=10_000)  # more than any node has
        with pytest.raises(RewardError, match="waited .* for a Ray worker and none started"):
            r.score(["q"], ["x"], {})
