"""Fault injection for the reliability tests (tests/test_reliability_*.py). Off unless $RLHF_FAULT is set.

``RLHF_FAULT="<point>"`` or ``"<point>@<step>"`` (active from that step on) turns on one fault:

- ``save_crash@N``: the process SIGKILLs itself while checkpoint N is being written (after the
  learner's files, before the manifest marker): a crash in the middle of a save.
- ``learner_stall``: every learner rank sleeps in train_step, as a hung collective would.
- ``nonfinite_loss@N``: every learner rank's loss is NaN from its N-th update on.
- ``skip_sync``: weights are written but never loaded into the engines (the probe must catch it).

Learner ranks get the variable through their Ray runtime environment (``env``). Nothing here runs
unless the variable is set; production code only asks ``active(...)``.
"""

from __future__ import annotations

import os
import signal
import time

ENV = "RLHF_FAULT"


def active(point: str, step: int | None = None) -> bool:
    """True when $RLHF_FAULT names ``point`` (and, for ``point@N``, when ``step`` >= N)."""
    spec = os.environ.get(ENV, "")
    name, _, at = spec.partition("@")
    if name != point:
        return False
    return not at or (step is not None and step >= int(at))


def crash(point: str, step: int | None = None) -> None:
    """SIGKILL this process (no clean-up at all) when ``point`` is active."""
    if active(point, step):
        os.kill(os.getpid(), signal.SIGKILL)


def stall(point: str) -> None:
    """Sleep (practically) forever when ``point`` is active."""
    while active(point):
        time.sleep(60)


def env() -> dict[str, str]:
    """$RLHF_FAULT for an actor's runtime environment ({} when unset)."""
    return {ENV: os.environ[ENV]} if os.environ.get(ENV) else {}
