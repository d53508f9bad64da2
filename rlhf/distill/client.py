"""HTTP client for an OpenAI-compatible chat-completions endpoint (a closed API or `vllm serve`).

One request per answer. 429, 5xx, timeouts and connection errors are retried with exponential
back-off and jitter, waiting at least what a Retry-After header asks; other failures, and running
out of retries, raise :class:`TeacherError` naming the prompt row. The API key lives only in the
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
from typing import Any

import httpx

from rlhf.config import ConfigError, TeacherConfig


class TeacherError(RuntimeError):
    """The teacher could not answer a prompt row; the message names the row and the last error."""


@dataclass(frozen=True)
class TeacherAnswer:
    content: str
    finish_reason: str | None
    prompt_tokens: int | None  # as the API reported them; None when it sent no usage
    completion_tokens: int | None


def api_key_from_env(cfg: TeacherConfig) -> str | None:
    """The key from the variable named by teacher.api_key_env (None: no key configured)."""
    if cfg.api_key_env is None:
        return None
    key = os.environ.get(cfg.api_key_env, "").strip()
    if not key:
        raise ConfigError(
            f"teacher.api_key_env={cfg.api_key_env!r}: the environment variable is not set "
            "(set it, or set teacher.api_key_env=null for a server without a key)"
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


class TeacherClient:
    """POSTs chat-completions requests with retries. Use as ``async with TeacherClient(...)``."""

    def __init__(self, cfg: TeacherConfig, api_key: str | None, rng: random.Random | None = None):
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

    async def __aenter__(self) -> "TeacherClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self._http.aclose()

    def _redact(self, text: str) -> str:
        return text.replace(self._key, "***") if self._key else text

    def _fail(self, row: int, message: str) -> TeacherError:
        return TeacherError(self._redact(f"prompt row {row}: {message}"))

    async def complete(self, body: dict[str, Any], row: int) -> TeacherAnswer:
        """One answer for ``body``; retries transient failures, raises TeacherError otherwise."""
        url = f"{self.cfg.base_url.rstrip('/')}/chat/completions"
        last = ""
        for attempt in range(self.cfg.max_retries + 1):
            retry_after = None
            self.http_requests += 1
            try:
                resp = await self._http.post("chat/completions", json=body)
            except (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError) as e:
                last = f"{type(e).__name__}: {e}"
            except httpx.HTTPError as e:
                # Not from the exception chain: httpx errors can quote header values.
                raise self._fail(row, f"request to {url} failed: {type(e).__name__}: {e}") from None
            else:
                if resp.status_code == 200:
                    return self._parse(resp, row)
                last = f"HTTP {resp.status_code}: {resp.text[:300]}"
                if not _retryable_status(resp.status_code):
                    raise self._fail(row, f"{url} answered {last}")
                retry_after = parse_retry_after(resp.headers.get("retry-after"))
            if attempt < self.cfg.max_retries:
                self.retries += 1
                await asyncio.sleep(retry_delay(attempt, retry_after, self.cfg.backoff_base_s,
                                                self.cfg.backoff_max_s, self._rng))
        raise self._fail(
            row, f"gave up after {self.cfg.max_retries + 1} attempts "
                 f"(teacher.max_retries={self.cfg.max_retries}) on {url}; last error: {last}"
        )

    def _parse(self, resp: httpx.Response, row: int) -> TeacherAnswer:
        try:
            data = resp.json()
            choice = data["choices"][0]
            content = choice["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError) as e:
            raise self._fail(row, f"not a chat-completions response ({e!r}): {resp.text[:300]}") from None
        if not isinstance(content, str):
            raise self._fail(row, f"the answer has no text content: {resp.text[:300]}")
        usage = data.get("usage") or {}
        return TeacherAnswer(content=content, finish_reason=choice.get("finish_reason"),
                             prompt_tokens=usage.get("prompt_tokens"),
                             completion_tokens=usage.get("completion_tokens"))
