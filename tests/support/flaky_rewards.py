"""Misbehaving reward functions for the reliability tests, plugged in by file path.

``flaky`` scores every completion 1.0 (so every group's valid rewards are equal), except that of
every 16 calls, call 1 raises, call 2 returns NaN and call 3 hangs past reward.timeout_s. With 4
prompts x 4 samples a step is exactly 16 calls, so each step has 2 failures and 1 timeout.
"""

from __future__ import annotations

import itertools
import threading
import time

from rewards.api import per_sample

_calls = itertools.count()
_lock = threading.Lock()


@per_sample
def flaky(prompt, completion, hang_s: float = 30.0, **_):
    with _lock:
        call = next(_calls) % 16
    if call == 1:
        raise ValueError("flaky reward: deliberate error")
    if call == 2:
        return float("nan")
    if call == 3:
        time.sleep(hang_s)
    return 1.0


def one_short(prompts, completions, **_):
    """A batch function with a bug: one value fewer than completions."""
    return [0.0] * (len(completions) - 1)


@per_sample
def always_raises(prompt, completion, **_):
    raise KeyError("always_raises: the column it wanted is not there")


@per_sample
def flaky_by_text(prompt, completion, hang_s: float = 30.0, **_):
    """``flaky``'s outcomes chosen by the completion instead of a call counter, so that an executor
    whose calls run in other processes (reward.executor=ray) meets exactly the same ones: "raise"
    raises, "nan" returns NaN, "hang" hangs past reward.timeout_s, "none" declines; else 1.0."""
    if completion == "raise":
        raise ValueError("flaky reward: deliberate error")
    if completion == "nan":
        return float("nan")
    if completion == "hang":
        time.sleep(hang_s)
    return None if completion == "none" else 1.0


def batch_raises_on_hang(prompts, completions, hang_s: float = 30.0, **_):
    """A batch function: hangs on a batch holding "hang", raises on one holding "raise", else 0.5 each."""
    if "hang" in completions:
        time.sleep(hang_s)
    if "raise" in completions:
        raise RuntimeError("batch reward: deliberate error")
    return [0.5] * len(completions)


@per_sample
def where(prompt, completion, pid_file: str = "", **_):
    """The scoring process's pid; on "hang" it records its pid in ``pid_file`` first, then hangs."""
    import os

    if completion == "hang":
        with open(pid_file, "w") as f:
            f.write(str(os.getpid()))
        time.sleep(60)
    return float(os.getpid())


def _first_attempt(marker_dir: str, key: str) -> bool:
    """True the first time ``key`` is seen under ``marker_dir`` (a file made atomically), whichever
    process asks: the marker outlives a worker that dies."""
    import hashlib
    import os

    path = os.path.join(marker_dir, hashlib.sha1(key.encode()).hexdigest())
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def _kill_own_worker() -> None:
    """SIGKILL this process (a Ray worker under reward.executor=ray): what the OOM killer does."""
    import os
    import signal

    os.kill(os.getpid(), signal.SIGKILL)


@per_sample
def dies_first(prompt, completion, marker_dir: str = "", **_):
    """Kills its own worker on its first attempt at a completion holding "die"; scores len(completion)."""
    if "die" in completion and _first_attempt(marker_dir, completion):
        _kill_own_worker()
    return float(len(completion))


def batch_dies_first(prompts, completions, marker_dir: str = "", **_):
    """A batch function: kills its own worker on its first attempt at a batch; then len of each."""
    if _first_attempt(marker_dir, "batch:" + "\n".join(completions)):
        _kill_own_worker()
    return [float(len(c)) for c in completions]


@per_sample
def dies_always(prompt, completion, **_):
    """Kills its own worker on every attempt at a completion holding "die"; else 1.0."""
    if "die" in completion:
        _kill_own_worker()
    return 1.0
