"""Where a judge's questions go: the backend interface, and its HTTP implementation.

A backend answers a list of chat-completions bodies, one answer or one :class:`EndpointError` per
body, in order, synchronously. ``HttpJudge`` sends them to an OpenAI-compatible endpoint through
the shared client (rlhf/chat/client.py: retries with back-off on 429/5xx/timeouts, the key only in
the Authorization header), at most ``max_concurrency`` at a time. The judge on our own engines
(rewards/builtin/judge_engines.py) has the same three members.
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

import httpx

from rlhf.chat.client import ChatAnswer, ChatClient, Endpoint, EndpointError
from rlhf.config import ConfigError


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


def check_served(endpoint: Endpoint, model: str, api_key: str | None) -> None:
    """GET {base_url}/models must answer and list ``model``: a ConfigError naming the endpoint
    otherwise, raised before any engine starts. The key is never in the message."""
    owner, url = endpoint.owner, f"{endpoint.base_url.rstrip('/')}/models"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def redact(text: str) -> str:
        return text.replace(api_key, "***") if api_key else text

    try:
        resp = httpx.get(url, headers=headers, timeout=endpoint.timeout_s)
    except httpx.HTTPError as e:  # not chained: httpx errors can quote header values
        raise ConfigError(redact(f"{owner}.base_url={endpoint.base_url!r}: the endpoint is unreachable "
                                 f"(GET {url}: {type(e).__name__}: {e})")) from None
    if resp.status_code != 200:
        raise ConfigError(redact(f"{owner}.base_url={endpoint.base_url!r}: GET {url} answered HTTP "
                                 f"{resp.status_code}: {resp.text[:200]}"))
    served = _model_ids(resp)
    if served is None:
        raise ConfigError(redact(f"{owner}.base_url={endpoint.base_url!r}: GET {url} did not answer a "
                                 f"model list: {resp.text[:200]}"))
    if model not in served:
        raise ConfigError(f"{owner}.model={model!r}: {endpoint.base_url} serves {served}, not {model!r}")


def _model_ids(resp: httpx.Response) -> list[str] | None:
    try:
        data: Any = resp.json()
        return [str(m["id"]) for m in data["data"]]
    except (ValueError, KeyError, TypeError):
        return None
