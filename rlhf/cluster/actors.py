"""Stopping actors for good: ``ray.kill`` only asks, and returns before the actor is gone."""

from __future__ import annotations

import time
from typing import Any


def kill_and_wait(actors: list[Any], timeout_s: float = 30.0) -> list[int]:
    """``ray.kill`` each actor (no restart), then wait until calls to it fail: a call made just after
    the kill can still reach the living process, and a replacement in the same placement bundle
    cannot start until the old actor's resources are free. Returns the indexes of actors still
    answering at the deadline (best effort: nothing raises)."""
    import ray
    from ray.exceptions import GetTimeoutError, RayActorError

    for actor in actors:
        ray.kill(actor, no_restart=True)
    deadline = time.monotonic() + timeout_s
    alive = list(range(len(actors)))
    while alive and time.monotonic() < deadline:
        still = []
        for i in alive:
            try:
                ray.get(actors[i].__ray_ready__.remote(), timeout=max(0.1, deadline - time.monotonic()))
                still.append(i)
            except RayActorError:
                pass
            except GetTimeoutError:
                still.append(i)
        alive = still
        if alive:
            time.sleep(0.1)
    return alive
