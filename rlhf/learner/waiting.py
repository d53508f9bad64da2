"""Waiting on Ray calls to named actors with deadlines: the first failure is named at once."""

from __future__ import annotations

import time
from typing import Any


def wait_named(stage: str, calls: list[tuple[str, Any, float]], error: type[Exception]) -> list[Any]:
    """Results of Ray calls given as (who, ref, timeout_s), in order; failures raise ``error``.

    The first to fail or die is named as soon as it does (its peers may be stuck in the collective
    it left); past a call's own timeout, every call still running past its own is named.
    """
    import ray
    from ray.exceptions import RayActorError, RayTaskError

    start = time.monotonic()
    pending = {ref: i for i, (_, ref, _) in enumerate(calls)}
    results: list[Any] = [None] * len(calls)
    while pending:
        next_deadline = min(start + calls[i][2] for i in pending.values())
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=max(0.0, next_deadline - time.monotonic()))
        if not ready:
            late = [calls[i] for i in sorted(pending.values()) if time.monotonic() >= start + calls[i][2]]
            if not late:  # ray.wait may return a hair before the deadline it was given
                continue
            timeouts = {t for _, _, t in late}
            if len(timeouts) == 1:
                names = f"{', '.join(who for who, _, _ in late)} did not finish {stage} within {timeouts.pop():g}s"
            else:
                names = ", ".join(f"{who} (timeout {t:g}s)" for who, _, t in late) + f" did not finish {stage}"
            raise error(names)
        i = pending.pop(ready[0])
        who = calls[i][0]
        try:
            results[i] = ray.get(ready[0])
        except RayActorError as e:
            raise error(f"{who} died during {stage}: {e}") from e
        except RayTaskError as e:
            cause = e.cause if getattr(e, "cause", None) is not None else e
            raise error(f"{who} failed in {stage}: {type(cause).__name__}: {cause}") from e
    return results
