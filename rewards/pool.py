"""A thread pool whose tasks can time out without taking a worker with them.

Python threads cannot be killed. ``concurrent.futures.ThreadPoolExecutor`` would keep a hung task's
worker forever and block interpreter exit joining it. Here workers are daemon threads: when a task
overruns, the caller abandons it, its worker is retired (it exits if the task ever returns) and a
fresh worker takes its place, so the pool keeps its size and a hung reward never stalls the run.
"""

from __future__ import annotations

import asyncio
import inspect
import queue
import threading
import time
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass(eq=False)
class Task:
    call: Callable[[], Any] | None  # None for a Ray task (rewards/remote.py)
    future: Future = field(default_factory=Future)
    started_at: float | None = None  # time.monotonic() when a worker picked it up
    worker: threading.Thread | None = None
    ref: Any = None  # a Ray task's generator (reward.executor=ray), else None: its current attempt's
    args: tuple = ()  # a Ray task's arguments, to run it again when its worker dies
    retries: int = 0  # attempts after the first (a Ray task whose worker died), see rewards/remote.py
    attempt_started: bool = False  # the current attempt's start marker arrived


class DaemonPool:
    def __init__(self, size: int, name: str = "reward"):
        if size < 1:
            raise ValueError(f"pool size {size} must be >= 1")
        self._queue: queue.SimpleQueue[Task | None] = queue.SimpleQueue()
        self._retired: set[threading.Thread] = set()
        self._lock = threading.Lock()
        self._name = name
        self._spawned = 0
        self._live = 0
        self.abandoned = 0  # tasks given up on since start (their threads may still be running)
        for _ in range(size):
            self._spawn()

    def submit(self, call: Callable[[], Any]) -> Task:
        task = Task(call)
        self._queue.put(task)
        return task

    def abandon(self, task: Task, error: BaseException) -> None:
        """Give up on a started task: fail its future, retire its worker, start a replacement."""
        settle(task.future, error=error)
        with self._lock:
            if task.worker is not None and task.worker not in self._retired:
                self._retired.add(task.worker)
                self.abandoned += 1
                self._spawn()

    def shutdown(self) -> None:
        with self._lock:
            live = self._live
        for _ in range(live):
            self._queue.put(None)

    def _spawn(self) -> None:
        self._spawned += 1
        self._live += 1
        threading.Thread(target=self._work, name=f"{self._name}-{self._spawned}", daemon=True).start()

    def _work(self) -> None:
        me = threading.current_thread()
        while True:
            task = self._queue.get()
            if task is None:
                break
            task.worker = me
            task.started_at = time.monotonic()
            try:
                settle(task.future, result=run_maybe_async(task.call))
            except BaseException as e:  # noqa: BLE001 - reported through the future
                settle(task.future, error=e)
            with self._lock:
                if me in self._retired:
                    self._retired.discard(me)
                    self._live -= 1
                    return
        with self._lock:
            self._live -= 1


def run_maybe_async(call: Callable[[], Any]) -> Any:
    """Call; if the result is awaitable (an ``async def`` reward), run it to completion here."""
    result = call()
    if inspect.isawaitable(result):

        async def wait() -> Any:
            return await result

        return asyncio.run(wait())
    return result


def settle(future: Future, result: Any = None, error: BaseException | None = None) -> None:
    """Set a future's outcome once; the loser of a timeout/finish race is ignored."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except InvalidStateError:
        pass
