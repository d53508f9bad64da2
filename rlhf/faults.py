"""Fault injection for the reliability tests (tests/test_reliability_*.py). Off unless $RLHF_FAULT is set.

``RLHF_FAULT="<point>"`` or ``"<point>@<step>"`` (active from that step on) turns on one fault:

- ``save_crash@N``: the process SIGKILLs itself while checkpoint N is being written (after the
  learner's files, before the manifest marker): a crash in the middle of a save.
- ``save_stall@N``: the driver sleeps at that same point of checkpoint N's save, so a test can stop
  the job there (``ray job stop``) rather than at whatever moment its signal happens to land.
- ``learner_stall``: every learner rank sleeps in train_step, as a hung collective would.
- ``nonfinite_loss@N``: every learner rank's loss is NaN from its N-th update on.
- ``skip_sync``: weights are written but never loaded into the engines (the probe must catch it).
- ``engine_stall``: a rollout engine's generate never returns, as a hung kernel would.

With ``$RLHF_FAULT_ONCE=<file>`` as well, the fault fires in one process only, the first to create
that file: a replacement engine or rank then runs normally, as after a real one-off fault.

Learner ranks get the variable through their Ray runtime environment (``env``). Nothing here runs
unless the variable is set; production code only asks ``active(...)``.
"""

from __future__ import annotations

import os
import signal
import time

ENV = "RLHF_FAULT"
ONCE = "RLHF_FAULT_ONCE"


def active(point: str, step: int | None = None) -> bool:
    """True when $RLHF_FAULT names ``point`` (and, for ``point@N``, when ``step`` >= N); with
    $RLHF_FAULT_ONCE, only in the first process to ask (it creates that file)."""
    spec = os.environ.get(ENV, "")
    name, _, at = spec.partition("@")
    if name != point or (at and (step is None or step < int(at))):
        return False
    return _first(os.environ.get(ONCE, ""))


_claimed: set[str] = set()  # marker files this process created: it keeps the fault it fired


def _first(marker: str) -> bool:
    """True without a marker file, or in the process that created it (once per file, across processes)."""
    if not marker or marker in _claimed:
        return True
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    _claimed.add(marker)
    return True


def crash(point: str, step: int | None = None) -> None:
    """SIGKILL this process (no clean-up at all) when ``point`` is active."""
    if active(point, step):
        os.kill(os.getpid(), signal.SIGKILL)


def stall(point: str, step: int | None = None) -> None:
    """Sleep (practically) forever when ``point`` is active (at ``step``, for ``point@N``)."""
    while active(point, step):
        time.sleep(60)


def env() -> dict[str, str]:
    """$RLHF_FAULT (and $RLHF_FAULT_ONCE) for an actor's runtime environment ({} when unset)."""
    return {k: os.environ[k] for k in (ENV, ONCE) if os.environ.get(ENV) and os.environ.get(k)}
