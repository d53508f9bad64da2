"""Where a judge's questions go: the backend interface, and its HTTP implementation.

A backend answers a list of chat-completions bodies, one answer or one :class:`EndpointError` per
body, in order, synchronously. ``HttpJudge`` sends them to an OpenAI-compatible endpoint through
the shared client (rlhf/chat/client.py: retries with back-off on 429/5xx/timeouts, the key only in
the Authorization header), at most ``max_concurrency`` at a time. The judge on our own engines
(rewards/builtin/judge_engines.py) has the same three members.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from rlhf.chat.client import ChatAnswer, ChatClient, Endpoint, EndpointError, check_served


class JudgeBackend(Protocol):
    model: str  # the judge model's name: part of every cache key

    def answer_all(self, bodies: list[dict], labels: list[str]) -> list[ChatAnswer | EndpointError]:
        ...

    def close(self) -> None:
        ...


class HttpJudge:
    """A judge served over HTTP. Construction checks the endpoint (:func:`check_served`)."""

    def __init__(self, endpoint: Endpoint, model: str, api_key: str | None):
        self.model = model
        self._endpoint = endpoint
        self._key = api_key
        check_served(endpoint, model, api_key)

    def answer_all(self, bodies: list[dict], labels: list[str]) -> list[ChatAnswer | EndpointError]:
        # Its own event loop per call: the runner calls rewards from worker threads.
        return asyncio.run(self._answer_all(bodies, labels))

    async def _answer_all(self, bodies: list[dict], labels: list[str]) -> list[ChatAnswer | EndpointError]:
        gate = asyncio.Semaphore(self._endpoint.max_concurrency)
        async with ChatClient(self._endpoint, self._key) as client:
            async def one(body: dict, label: str) -> ChatAnswer | EndpointError:
                async with gate:
                    try:
                        return await client.complete(body, label)
                    except EndpointError as e:  # counted by the judge as a None, never a 0
                        return e
            return list(await asyncio.gather(*(one(b, lab) for b, lab in zip(bodies, labels))))

    def close(self) -> None:
        pass
