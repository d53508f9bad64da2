"""HTTP client for an OpenAI-compatible chat-completions endpoint (a closed API or `vllm serve`).

One client for every caller that talks to such an endpoint: the distillation teacher
(rlhf/distill/teacher_answers.py), the judge reward (rewards/builtin/judge.py) and the verdict's
closed model (rlhf/compare.py). One request per answer. 429, 5xx, timeouts and connection errors
are retried with exponential back-off and jitter, waiting at least what a Retry-After header asks;
other failures, and running out of retries, raise :class:`EndpointError` naming the caller's
item (``label``: "prompt row 3", "judge sample 5"). :func:`check_served` asks GET /models, before
any engine starts, whether the endpoint answers and serves the model. The API key lives only in the
Authorization header: every message this module raises has it redacted, and httpx exceptions
(which can quote header values) are never chained.
"""

from __future__ import annotations

import asyncio
import email.utils
import os
import random
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import httpx

from rlhf.config import ConfigError


class EndpointError(RuntimeError):
    """The endpoint could not answer one request; the message names the item and the last error."""


@dataclass(frozen=True)
class ChatAnswer:
    content: str
    finish_reason: str | None
    prompt_tokens: int | None  # as the API reported them; None when it sent no usage
    completion_tokens: int | None
    latency_s: float | None = None  # the successful attempt's wall time; None in older caches


@dataclass(frozen=True)
class Endpoint:
    """Where requests go and how hard to try: the fields TeacherConfig, the judge's and the
    verdict's closed model each set."""

    base_url: str
    timeout_s: float = 60.0  # per attempt, connect + read
    max_concurrency: int = 8
    max_retries: int = 5
    backoff_base_s: float = 1.0
    backoff_max_s: float = 60.0
    owner: str = "teacher"  # the config key holding these settings, named in errors

    @classmethod
    def of(cls, cfg: Any, owner: str = "teacher") -> "Endpoint":
        """The fields of any config object that has them (TeacherConfig, the judge's settings)."""
        fields = [f for f in cls.__dataclass_fields__ if f != "owner"]
        return cls(**{f: getattr(cfg, f) for f in fields}, owner=owner)


def api_key_from_env(api_key_env: str | None, key_name: str = "teacher.api_key_env") -> str | None:
    """The key from the environment variable named ``api_key_env`` (None: no key configured).
    ``key_name`` is the config key that named it, for the error."""
    if api_key_env is None:
        return None
    key = os.environ.get(api_key_env, "").strip()
    if not key:
        raise ConfigError(
            f"{key_name}={api_key_env!r}: the environment variable is not set "
            f"(set it, or set {key_name}=null for a server without a key)"
        )
    return key


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date); None if absent."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return None
    return max(0.0, when - (time.time() if now is None else now))


def retry_delay(attempt: int, retry_after: float | None, base_s: float, max_s: float,
                rng: random.Random) -> float:
    """Back-off before retry number attempt+1: base * 2**attempt, jittered to [d/2, d]; never less
    than Retry-After; capped at max_s. The jitter keeps many clients from retrying in lockstep."""
    d = min(max_s, base_s * 2**attempt)
    delay = d / 2 + rng.uniform(0, d / 2)
    if retry_after is not None:
        delay = max(delay, retry_after)
    return min(delay, max_s)


def _retryable_status(status: int) -> bool:
    return status == 429 or status >= 500


class ChatClient:
    """POSTs chat-completions requests with retries. Use as ``async with ChatClient(...)``."""

    def __init__(self, cfg: Endpoint, api_key: str | None, rng: random.Random | None = None):
        self.cfg = cfg
        self._key = api_key
        self.http_requests = 0  # attempts, retries included
        self.retries = 0
        self._rng = rng or random.Random()
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.AsyncClient(
            base_url=cfg.base_url, headers=headers, timeout=httpx.Timeout(cfg.timeout_s),
            limits=httpx.Limits(max_connections=cfg.max_concurrency),
        )

    async def __aenter__(self) -> "ChatClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self._http.aclose()

    def _redact(self, text: str) -> str:
        return text.replace(self._key, "***") if self._key else text

    def _fail(self, label: str, message: str) -> EndpointError:
        return EndpointError(self._redact(f"{label}: {message}"))

    async def complete(self, body: dict[str, Any], label: str) -> ChatAnswer:
        """One answer for ``body``; retries transient failures, raises EndpointError otherwise."""
        resp, latency_s = await self._post(body, label)
        return self._parse(resp, label, latency_s)

    async def post(self, body: dict[str, Any], label: str) -> tuple[dict[str, Any], float]:
        """The endpoint's whole response to ``body`` as JSON (tool calls and all: what a relay passes
        on) and the successful attempt's seconds; retries as ``complete`` does."""
        resp, latency_s = await self._post(body, label)
        try:
            data = resp.json()
        except ValueError:
            raise self._fail(label, f"the answer is not JSON: {resp.text[:300]}") from None
        if not isinstance(data, dict) or not isinstance(data.get("choices"), list) or not data["choices"]:
            raise self._fail(label, f"not a chat-completions response: {resp.text[:300]}")
        return data, latency_s

    async def _post(self, body: dict[str, Any], label: str) -> tuple[httpx.Response, float]:
        url = f"{self.cfg.base_url.rstrip('/')}/chat/completions"
        last = ""
        for attempt in range(self.cfg.max_retries + 1):
            retry_after = None
            self.http_requests += 1
            t0 = time.monotonic()
            try:
                resp = await self._http.post("chat/completions", json=body)
            except (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError) as e:
                last = f"{type(e).__name__}: {e}"
            except httpx.HTTPError as e:
                # Not from the exception chain: httpx errors can quote header values.
                raise self._fail(label, f"request to {url} failed: {type(e).__name__}: {e}") from None
            else:
                if resp.status_code == 200:
                    return resp, time.monotonic() - t0
                last = f"HTTP {resp.status_code}: {resp.text[:300]}"
                if not _retryable_status(resp.status_code):
                    raise self._fail(label, f"{url} answered {last}")
                retry_after = parse_retry_after(resp.headers.get("retry-after"))
            if attempt < self.cfg.max_retries:
                self.retries += 1
                await asyncio.sleep(retry_delay(attempt, retry_after, self.cfg.backoff_base_s,
                                                self.cfg.backoff_max_s, self._rng))
        raise self._fail(
            label, f"gave up after {self.cfg.max_retries + 1} attempts "
                   f"({self.cfg.owner}.max_retries={self.cfg.max_retries}) on {url}; last error: {last}"
        )

    async def complete_all(self, requests: Sequence[tuple[dict[str, Any], str]],
                           on_answer: Callable[[int, ChatAnswer], None]) -> None:
        """Every (body, label), at most ``max_concurrency`` in flight; ``on_answer(i, answer)`` as each
        arrives (cache it there: a later failure loses nothing received). The first failure cancels
        the rest, so nothing more is paid for, and is raised."""
        gate = asyncio.Semaphore(self.cfg.max_concurrency)

        async def one(i: int, body: dict[str, Any], label: str) -> None:
            async with gate:
                answer = await self.complete(body, label)
            on_answer(i, answer)

        tasks = [asyncio.create_task(one(i, body, label)) for i, (body, label) in enumerate(requests)]
        try:
            await asyncio.gather(*tasks)
        except BaseException:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise

    def _parse(self, resp: httpx.Response, label: str, latency_s: float) -> ChatAnswer:
        try:
            data = resp.json()
            choice = data["choices"][0]
            content = choice["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError) as e:
            raise self._fail(label, f"not a chat-completions response ({e!r}): {resp.text[:300]}") from None
        if not isinstance(content, str):
            raise self._fail(label, f"the answer has no text content: {resp.text[:300]}")
        usage = data.get("usage") or {}
        return ChatAnswer(content=content, finish_reason=choice.get("finish_reason"),
                          prompt_tokens=usage.get("prompt_tokens"),
                          completion_tokens=usage.get("completion_tokens"), latency_s=latency_s)


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
