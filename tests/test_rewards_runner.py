"""RewardRunner: weighted totals, and the documented outcome for each way a reward can misbehave.

Outcomes pinned here (see rewards/runner.py):
- hangs: None for what it was scoring, counted in /timeouts; a per-sample function loses only the
  hanging completion, a batch function its whole batch;
- raises: None, counted in /failures;
- NaN / inf / non-number: None for that completion, counted in /failures;
- wrong length: RewardError naming the function at once;
- more failures than max_failure_rate: RewardError naming the function and an example input.
"""

from __future__ import annotations

import sys
import textwrap
import threading

import pytest

from rlhf.config import RewardConfig, RewardFnConfig
from rewards.runner import RewardError, RewardRunner

PROMPTS = ["What is 3 + 5?", "What is 2 + 2?", "What is 9 + 1?", "What is 1 + 1?"]
COMPLETIONS = ["3 + 5 = 8", "2 + 2 = 5", "The answer is 10.", "1 + 1 = 2"]
ANSWERS = ["8", "4", "10", "2"]

# A hang that the test can end: the thread waits on this event, set at module teardown.
RELEASE = threading.Event()


@pytest.fixture(scope="module", autouse=True)
def _release_hung_threads():
    yield
    RELEASE.set()


@pytest.fixture()
def reward_file(tmp_path):
    """A user reward module with misbehaving functions, loaded by file path."""
    file = tmp_path / "bad_rewards.py"
    file.write_text(textwrap.dedent("""
        import asyncio, math, threading
        from rewards.api import per_sample

        RELEASE = None  # set by the test to its threading.Event

        def hang(prompts, completions, **columns):
            RELEASE.wait(120)
            return [1.0] * len(completions)

        @per_sample
        def hang_on_five(prompt, completion, **row):
            if completion.endswith("5"):
                RELEASE.wait(120)
            return 1.0

        def boom(prompts, completions, **columns):
            raise KeyError("no such thing")

        @per_sample
        def boom_on_ten(prompt, completion, **row):
            if "10" in completion:
                raise ZeroDivisionError("bad sample")
            return 0.5

        def nan_second(prompts, completions, **columns):
            return [1.0, math.nan, math.inf, "high"]

        def short(prompts, completions, **columns):
            return [1.0] * (len(completions) - 1)

        def scalar(prompts, completions, **columns):
            return 1.0

        def declines(prompts, completions, **columns):
            return [None, 1.0, 1.0, 1.0]

        async def async_len(prompts, completions, **columns):
            await asyncio.sleep(0)
            return [float(len(c)) for c in completions]
    """))
    from rewards.api import resolve

    sys.modules[resolve(f"{file}:hang").__module__].RELEASE = RELEASE
    return file


def runner(*fns: RewardFnConfig, timeout_s: float = 10.0, max_failure_rate: float = 0.5) -> RewardRunner:
    return RewardRunner(RewardConfig(functions=list(fns), timeout_s=timeout_s, num_workers=4,
                                     max_failure_rate=max_failure_rate))


def score(r: RewardRunner):
    with r:
        return r.score(PROMPTS, COMPLETIONS, {"answer": ANSWERS})


def test_weighted_total_and_weight_zero_is_logged_only():
    r = runner(
        RewardFnConfig(fn="math_answer", weight=2.0, kwargs={"mode": "last_number"}),
        RewardFnConfig(fn="length", weight=0.0, kwargs={"mode": "linear", "max_length": 20, "unit": "chars"}),
    )
    out = score(r)
    # Last numbers: 8 (right), 5 (wrong, 4), 10 (right), 2 (right) -> [1, 0, 1, 1]; weight 2.
    assert out.total == [2.0, 0.0, 2.0, 2.0]
    assert out.per_fn["math_answer"] == [1.0, 0.0, 1.0, 1.0]
    # Linear length penalty in chars over 20: "3 + 5 = 8" is 9 chars -> -0.45; weight 0, so not in total.
    assert out.per_fn["length"][0] == pytest.approx(-9 / 20)
    assert out.metrics["reward/math_answer/mean"] == pytest.approx(0.75)
    assert out.metrics["reward/total/mean"] == pytest.approx(1.5)
    assert out.metrics["reward/math_answer/failures"] == 0


def test_batch_function_that_hangs_times_out_and_stops_the_run(reward_file):
    # A batch function's timeout covers its whole batch: 4/4 > 0.5 -> RewardError.
    r = runner(RewardFnConfig(fn=f"{reward_file}:hang"), timeout_s=0.3)
    with pytest.raises(RewardError, match=r"reward 'hang'.*4/4.*4 timeouts.*What is 3 \+ 5"):
        score(r)


def test_batch_function_that_hangs_below_threshold_gives_none(reward_file):
    r = runner(RewardFnConfig(fn=f"{reward_file}:hang", weight=0.0),
               RewardFnConfig(fn="math_answer", kwargs={"mode": "last_number"}),
               timeout_s=0.3, max_failure_rate=1.0)
    out = score(r)
    assert out.per_fn["hang"] == [None] * 4
    assert out.metrics["reward/hang/timeouts"] == 4
    # Weight 0: the hang does not blank the total.
    assert out.total == [1.0, 0.0, 1.0, 1.0]


def test_per_sample_hang_costs_only_that_completion(reward_file):
    r = runner(RewardFnConfig(fn=f"{reward_file}:hang_on_five"), timeout_s=0.3)
    out = score(r)
    # Only "2 + 2 = 5" ends in 5.
    assert out.per_fn["hang_on_five"] == [1.0, None, 1.0, 1.0]
    assert out.total == [1.0, None, 1.0, 1.0]
    assert out.metrics["reward/hang_on_five/timeouts"] == 1
    assert out.metrics["reward/abandoned_tasks"] == 1


def test_raising_batch_function_stops_the_run_naming_it(reward_file):
    r = runner(RewardFnConfig(fn=f"{reward_file}:boom"))
    with pytest.raises(RewardError, match=r"reward 'boom'.*KeyError.*no such thing.*prompt='What is 3 \+ 5\?'"):
        score(r)


def test_raising_sample_below_threshold_is_none_and_counted(reward_file):
    out = score(runner(RewardFnConfig(fn=f"{reward_file}:boom_on_ten")))
    # Only "The answer is 10." contains 10.
    assert out.per_fn["boom_on_ten"] == [0.5, 0.5, None, 0.5]
    assert out.metrics["reward/boom_on_ten/failures"] == 1
    assert out.metrics["reward/boom_on_ten/mean"] == pytest.approx(0.5)


def test_nan_inf_and_strings_become_none(reward_file):
    out = score(runner(RewardFnConfig(fn=f"{reward_file}:nan_second"), max_failure_rate=1.0))
    assert out.per_fn["nan_second"] == [1.0, None, None, None]
    assert out.metrics["reward/nan_second/failures"] == 3
    # 3/4 > 0.5 with the default threshold.
    with pytest.raises(RewardError, match=r"'nan_second'.*3/4.*returned nan"):
        score(runner(RewardFnConfig(fn=f"{reward_file}:nan_second")))


def test_wrong_length_is_an_error_naming_the_function(reward_file):
    with pytest.raises(RewardError, match=r"reward 'short'.*returned 3 values for 4 completions"):
        score(runner(RewardFnConfig(fn=f"{reward_file}:short"), max_failure_rate=1.0))
    with pytest.raises(RewardError, match=r"reward 'scalar'.*returned float"):
        score(runner(RewardFnConfig(fn=f"{reward_file}:scalar"), max_failure_rate=1.0))


def test_deliberate_none_is_not_a_failure(reward_file):
    out = score(runner(RewardFnConfig(fn=f"{reward_file}:declines")))
    assert out.total == [None, 1.0, 1.0, 1.0]
    assert out.metrics["reward/declines/none"] == 1
    assert out.metrics["reward/declines/failures"] == 0


def test_async_reward(reward_file):
    out = score(runner(RewardFnConfig(fn=f"{reward_file}:async_len")))
    assert out.total == [9.0, 9.0, 17.0, 9.0]


def test_duplicate_names_and_mismatched_columns():
    with pytest.raises(ValueError, match="named 'math_answer' is already configured"):
        runner(RewardFnConfig(fn="math_answer"), RewardFnConfig(fn="math_answer", weight=0.0))
    r = runner(RewardFnConfig(fn="math_answer"))
    with r, pytest.raises(ValueError, match="column 'answer' has 3 values for 4 completions"):
        r.score(PROMPTS, COMPLETIONS, {"answer": ANSWERS[:3]})


def test_missing_answer_column_fails_loudly():
    r = runner(RewardFnConfig(fn="math_answer"))
    with r, pytest.raises(RewardError, match=r"'math_answer'.*no reference answer"):
        r.score(PROMPTS, COMPLETIONS, {"answer": [None] * 4})
