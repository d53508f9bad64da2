"""Requests from every open episode go to the engines together, from one batcher thread.

A batch leaves when every open episode is waiting on the model (nobody else can join), when its
oldest request has waited ``batch_wait_s``, or when it holds ``max_batch`` requests (the oldest
ones). Its rows are ordered by episode open order, so a batch does not depend on which HTTP
thread arrived first. Rows with different generation settings (max_tokens, stop) cannot share
one vLLM call: each distinct setting is one ``engines.generate`` call, counted as one batch.
Each call is seeded from ``derive_seed(seed, k)``: ``seed`` is the first row's episode seed and
``k`` counts the calls made for that seed (no seed: unseeded). An engine error fails that call's
requests with a 500, never the thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from rlhf.types import Completion, SamplingSettings
from rollouts.engine import derive_seed
from rollouts.gateway.errors import ApiError

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Request:
    episode: str  # the episode's key (never logged)
    order: int  # the episode's open order
    seed: int | None
    context_ids: list[int]
    max_new_tokens: int
    stop: tuple[str, ...]
    arrived: float = field(default_factory=time.monotonic)
    done: threading.Event = field(default_factory=threading.Event)
    result: Completion | None = None
    error: ApiError | None = None

    def fail(self, error: ApiError) -> None:
        self.error = error
        self.done.set()


class Batcher:
    def __init__(self, engines, sampling: SamplingSettings, batch_wait_s: float, max_batch: int,
                 on_batch: Callable[[int], None]) -> None:
        """``on_batch(rows)``: called once per engine call (the gateway's metrics)."""
        self.engines, self.sampling = engines, sampling
        self.batch_wait_s, self.max_batch, self.on_batch = batch_wait_s, max_batch, on_batch
        self._cond = threading.Condition()
        self._pending: list[Request] = []
        self._open: set[str] = set()
        self._batches_per_seed: dict[int, int] = {}
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="gateway-batcher", daemon=True)
        self._thread.start()

    def opened(self, episode: str) -> None:
        with self._cond:
            self._open.add(episode)

    def closed(self, episode: str, error: ApiError) -> None:
        """The episode ended: its queued requests fail with ``error``; a batch may now be complete."""
        with self._cond:
            self._open.discard(episode)
            for r in [r for r in self._pending if r.episode == episode]:
                self._pending.remove(r)
                r.fail(error)
            self._cond.notify()

    def submit(self, request: Request) -> None:
        with self._cond:
            if self._stopped:
                raise ApiError(503, "shutdown", "the gateway is shutting down", type="server_error")
            self._pending.append(request)
            self._cond.notify()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            for r in self._pending:
                r.fail(ApiError(503, "shutdown", "the gateway is shutting down", type="server_error"))
            self._pending.clear()
            self._cond.notify()
        self._thread.join(timeout=5)

    def _next_batch(self) -> list[Request] | None:
        with self._cond:
            while True:
                if self._stopped:
                    return None
                if self._pending:
                    now = time.monotonic()
                    oldest = min(r.arrived for r in self._pending)
                    waiting = {r.episode for r in self._pending}
                    if (len(self._pending) >= self.max_batch or waiting >= self._open
                            or now - oldest >= self.batch_wait_s):
                        take = sorted(self._pending, key=lambda r: r.arrived)[: self.max_batch]
                        for r in take:
                            self._pending.remove(r)
                        return sorted(take, key=lambda r: (r.order, r.arrived))
                    self._cond.wait(timeout=oldest + self.batch_wait_s - now)
                else:
                    self._cond.wait()

    def _run(self) -> None:
        while (batch := self._next_batch()) is not None:
            groups: dict[tuple[int, tuple[str, ...]], list[Request]] = {}
            for r in batch:
                groups.setdefault((r.max_new_tokens, r.stop), []).append(r)
            for (max_new_tokens, stop), rows in groups.items():
                self._generate(rows, max_new_tokens, stop)

    def _generate(self, rows: list[Request], max_new_tokens: int, stop: tuple[str, ...]) -> None:
        s = self.sampling
        sampling = SamplingSettings(n=1, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
                                    max_new_tokens=max_new_tokens, stop=stop, stop_token_ids=s.stop_token_ids)
        seed = rows[0].seed
        if seed is not None:
            k = self._batches_per_seed.get(seed, 0)
            self._batches_per_seed[seed] = k + 1
            seed = derive_seed(seed, k)
        self.on_batch(len(rows))
        try:
            out = self.engines.generate([r.context_ids for r in rows], sampling, seed=seed)
        except Exception as err:  # the engines' failure fails these requests, not the server
            log.error("gateway: an engine call of %d requests failed: %s: %s", len(rows), type(err).__name__, err)
            for r in rows:
                r.fail(ApiError(500, "engine", f"the engines failed this request: {type(err).__name__}: {err}",
                                type="server_error"))
            return
        for r, c in zip(rows, out.completions, strict=True):
            r.result = c
            r.done.set()
