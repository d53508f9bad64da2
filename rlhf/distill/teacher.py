"""Teacher answers for distillation, from an OpenAI-compatible chat-completions endpoint or a JSONL file.

``collect(rows, cfg, run_dir)`` asks the teacher for an answer to every prompt row and writes an SFT
dataset (``<run folder>/teacher.jsonl``): one object per kept answer with ``prompt``, ``messages``
(the prompt messages plus the assistant's answer), ``completion``, the row's other columns
(``answer``, ...), ``usage``, ``finish_reason`` and ``sample``. On the way:

- at most ``max_concurrency`` requests are in flight; 429, 5xx, timeouts and connection errors are
  retried with exponential back-off and jitter (waiting at least Retry-After when the server sends
  it); any other error, or running out of retries, stops the collection with an error naming the row;
- every answer is appended to a JSONL cache keyed by a hash of (model, messages, sampling), one
  fsynced line at a time, so an interrupted collection resumes without paying twice;
- prompt and completion tokens are counted as the API reports them (``usage``); paid ones go into
  the run's cost ledger;
- an optional reward function keeps only answers it scores >= ``min_reward``.

``from_jsonl(cfg, run_dir)`` turns answers collected elsewhere into the same dataset.

The API key is read from the environment variable named by ``teacher.api_key_env`` and only ever
placed in the Authorization header: it is not written to the cache, the dataset, logs or errors.
One process writes a cache at a time.
"""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import inspect
import json
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import httpx

from rlhf.config import ConfigError, TeacherConfig
from rlhf.ledger import CostLedger, atomic_write_text

# fn(prompts, completions, **columns) -> one float (or None: cannot score) per completion.
RewardFn = Callable[..., Any]

# Names the output dataset uses itself; a prompt column with one of these names would be overwritten.
OUTPUT_FIELDS = ("prompt", "messages", "completion", "usage", "finish_reason", "sample", "reward")
CACHE_FILE = "teacher_cache.jsonl"


class TeacherError(RuntimeError):
    """The teacher could not answer a prompt row; the message names the row and the last error."""


@dataclass(frozen=True)
class TeacherAnswer:
    content: str
    finish_reason: str | None
    prompt_tokens: int | None  # as the API reported them; None when it sent no usage
    completion_tokens: int | None


@dataclass
class CollectStats:
    rows: int = 0
    answers: int = 0  # rows * samples_per_prompt
    cache_hits: int = 0  # answers found in the cache (not paid again)
    paid: int = 0  # answers bought in this run
    http_requests: int = 0  # attempts, retries included
    retries: int = 0
    prompt_tokens: int = 0  # of the answers bought in this run
    completion_tokens: int = 0
    missing_usage: int = 0  # bought answers whose response had no usage field
    kept: int = 0
    rejected: int = 0  # scored below min_reward
    unscored: int = 0  # the reward returned None (dropped)


@dataclass(frozen=True)
class CollectResult:
    dataset_path: Path
    stats: CollectStats


# --- requests ----------------------------------------------------------------------------------


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


def to_messages(prompt: Any, system_prompt: str | None, row: int) -> list[dict[str, str]]:
    """A prompt cell (text, or a list of {"role", "content"} messages) as chat messages."""
    if isinstance(prompt, str) and prompt.strip():
        messages = [{"role": "user", "content": prompt}]
    elif (isinstance(prompt, list) and prompt
          and all(isinstance(m, dict) and isinstance(m.get("role"), str)
                  and isinstance(m.get("content"), str) for m in prompt)):
        messages = [{"role": m["role"], "content": m["content"]} for m in prompt]
    else:
        raise ValueError(
            f"prompt row {row}: the prompt must be non-empty text or a list of "
            f"{{'role', 'content'}} messages, got {str(prompt)[:80]!r}"
        )
    if system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


def sampling_params(cfg: TeacherConfig) -> dict[str, Any]:
    return {"temperature": cfg.temperature, "top_p": cfg.top_p, "max_tokens": cfg.max_tokens}


def request_key(model: str, messages: list[dict[str, str]], sampling: Mapping[str, Any],
                sample: int) -> str:
    """Cache key: the same question asked the same way (and the same sample index) is one answer."""
    blob = json.dumps({"model": model, "messages": messages, "sampling": dict(sampling),
                       "sample": sample}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


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

    def __init__(self, cfg: TeacherConfig, api_key: str | None, stats: CollectStats,
                 rng: random.Random | None = None):
        self.cfg = cfg
        self._key = api_key
        self._stats = stats
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
            self._stats.http_requests += 1
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
                self._stats.retries += 1
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


# --- cache -------------------------------------------------------------------------------------


class ResponseCache:
    """Append-only JSONL of answers by request key. A crash mid-append leaves at most one partial
    last line: it is cut off on open (that answer is asked again). Any other bad line is an error."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.entries: dict[str, TeacherAnswer] = {}
        if self.path.exists():
            self._load()
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def _load(self) -> None:
        raw = self.path.read_bytes()
        complete_end = raw.rfind(b"\n") + 1  # every whole entry ends with a newline
        if complete_end < len(raw):
            print(f"{self.path}: dropping a partial last line ({len(raw) - complete_end} bytes) "
                  "left by an interrupted run")
            with open(self.path, "r+b") as f:
                f.truncate(complete_end)
        for lineno, line in enumerate(raw[:complete_end].decode().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                self.entries[entry["key"]] = TeacherAnswer(**entry["answer"])
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{self.path} line {lineno}: not a cache entry ({e})") from e

    def get(self, key: str) -> TeacherAnswer | None:
        return self.entries.get(key)

    def put(self, key: str, answer: TeacherAnswer, model: str) -> None:
        line = json.dumps({"key": key, "model": model, "answer": answer.__dict__}, ensure_ascii=False)
        # One write of one whole line, then fsync: a crash loses at most this line.
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.entries[key] = answer


# --- collection --------------------------------------------------------------------------------


def _check_api_config(cfg: TeacherConfig) -> None:
    if not cfg.model:
        raise ConfigError("teacher.model is not set (the model name sent to the endpoint)")
    for key, value, low in [("teacher.samples_per_prompt", cfg.samples_per_prompt, 1),
                            ("teacher.max_concurrency", cfg.max_concurrency, 1),
                            ("teacher.max_retries", cfg.max_retries, 0)]:
        if value < low:
            raise ConfigError(f"{key}={value} must be >= {low}")
    if cfg.timeout_s <= 0:
        raise ConfigError(f"teacher.timeout_s={cfg.timeout_s} must be > 0")


def _extra_columns(rows: list[dict[str, Any]], exclude: tuple[str, ...], where: str) -> list[str]:
    """Columns carried into the dataset (and to the reward): those of the first row, in every row."""
    if not rows:
        raise ValueError(f"{where}: no prompt rows")
    columns = [c for c in rows[0] if c not in exclude]
    clash = sorted(set(columns) & set(OUTPUT_FIELDS))
    if clash:
        raise ValueError(f"{where}: column(s) {clash} clash with fields the teacher dataset writes "
                         f"({', '.join(OUTPUT_FIELDS)}); rename them")
    for i, row in enumerate(rows):
        missing = [c for c in columns if c not in row]
        if missing:
            raise ValueError(f"{where}: prompt row {i} lacks column(s) {missing} that row 0 has")
    return columns


async def _fetch(jobs: dict[str, tuple[int, dict[str, Any]]], cfg: TeacherConfig,
                 api_key: str | None, cache: ResponseCache, stats: CollectStats,
                 ledger: CostLedger | None) -> None:
    """Ask for every (key -> (row, body)) job, at most max_concurrency at once, caching each answer."""
    sem = asyncio.Semaphore(cfg.max_concurrency)
    async with TeacherClient(cfg, api_key, stats) as client:

        async def one(key: str, row: int, body: dict[str, Any]) -> None:
            async with sem:
                answer = await client.complete(body, row)
            cache.put(key, answer, cfg.model)
            stats.paid += 1
            if answer.prompt_tokens is None or answer.completion_tokens is None:
                stats.missing_usage += 1
            pt, ct = answer.prompt_tokens or 0, answer.completion_tokens or 0
            stats.prompt_tokens += pt
            stats.completion_tokens += ct
            if ledger is not None:
                ledger.add_teacher(pt, ct)

        tasks = [asyncio.create_task(one(key, row, body)) for key, (row, body) in jobs.items()]
        try:
            await asyncio.gather(*tasks)
        except BaseException:
            # Stop paying for the rest; answers already received are in the cache.
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise


async def acollect(rows: list[dict[str, Any]], cfg: TeacherConfig, run_dir: str | Path,
                   reward_fn: RewardFn | None = None,
                   ledger: CostLedger | None = None) -> CollectResult:
    """Teacher answers for ``rows`` (dicts with cfg.prompt_column), written as an SFT dataset."""
    _check_api_config(cfg)
    for i, row in enumerate(rows):
        if cfg.prompt_column not in row:
            raise ValueError(f"teacher prompts: prompt row {i} has no column "
                             f"teacher.prompt_column={cfg.prompt_column!r}")
    columns = _extra_columns(rows, (cfg.prompt_column,), "teacher prompts")
    messages = [to_messages(row[cfg.prompt_column], cfg.system_prompt, i) for i, row in enumerate(rows)]
    api_key = api_key_from_env(cfg)  # before any request, so a missing key costs nothing
    run_dir = Path(run_dir)
    cache = ResponseCache(cfg.cache_path or run_dir / CACHE_FILE)
    sampling = sampling_params(cfg)
    stats = CollectStats(rows=len(rows), answers=len(rows) * cfg.samples_per_prompt)

    keys = [[request_key(cfg.model, m, sampling, s) for s in range(cfg.samples_per_prompt)]
            for m in messages]
    jobs: dict[str, tuple[int, dict[str, Any]]] = {}  # one request per distinct key
    for i, row_keys in enumerate(keys):
        for key in row_keys:
            if cache.get(key) is not None:
                stats.cache_hits += 1
            elif key not in jobs:
                jobs[key] = (i, {"model": cfg.model, "messages": messages[i], "n": 1, **sampling})
    await _fetch(jobs, cfg, api_key, cache, stats, ledger)

    records = []
    for i, row in enumerate(rows):
        for s, key in enumerate(keys[i]):
            answer = cache.entries[key]
            records.append(_record(row[cfg.prompt_column], messages[i], answer.content,
                                   {c: row[c] for c in columns}, s, answer.finish_reason,
                                   answer.prompt_tokens, answer.completion_tokens))
    rewards = await ascore(records, columns, reward_fn) if reward_fn else None
    return _finish(records, rewards, cfg, run_dir, stats)


def collect(rows: list[dict[str, Any]], cfg: TeacherConfig, run_dir: str | Path,
            reward_fn: RewardFn | None = None, ledger: CostLedger | None = None) -> CollectResult:
    """Synchronous :func:`acollect` (not from inside a running event loop)."""
    return asyncio.run(acollect(rows, cfg, run_dir, reward_fn, ledger))


def from_jsonl(cfg: TeacherConfig, run_dir: str | Path,
               reward_fn: RewardFn | None = None) -> CollectResult:
    """The SFT dataset from answers collected elsewhere: cfg.path holds prompt and completion columns."""
    if not cfg.path:
        raise ConfigError("teacher.path is not set (the JSONL of prompts and teacher answers)")
    rows = read_jsonl(cfg.path, [cfg.prompt_column, cfg.completion_column])
    columns = _extra_columns(rows, (cfg.prompt_column, cfg.completion_column, "usage"), cfg.path)
    records = []
    for i, row in enumerate(rows):
        completion = row[cfg.completion_column]
        if not isinstance(completion, str):
            raise ValueError(f"{cfg.path} row {i}: column {cfg.completion_column!r} must be text")
        usage = row.get("usage") or {}
        messages = to_messages(row[cfg.prompt_column], cfg.system_prompt, i)
        records.append(_record(row[cfg.prompt_column], messages, completion,
                               {c: row[c] for c in columns}, 0, None,
                               usage.get("prompt_tokens"), usage.get("completion_tokens")))
    stats = CollectStats(rows=len(rows), answers=len(rows))
    rewards = asyncio.run(ascore(records, columns, reward_fn)) if reward_fn else None
    return _finish(records, rewards, cfg, Path(run_dir), stats)


def read_jsonl(path: str | Path, required: list[str]) -> list[dict[str, Any]]:
    """Rows of a JSONL file; errors name the file, the line and the missing column."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} line {lineno}: not valid JSON ({e})") from e
            if not isinstance(row, dict):
                raise ValueError(f"{path} line {lineno}: expected a JSON object, got {type(row).__name__}")
            missing = [c for c in required if c not in row]
            if missing:
                raise ValueError(f"{path} line {lineno}: missing column(s) {missing} "
                                 f"(it has {sorted(row)})")
            rows.append(row)
    return rows


def _record(prompt: Any, messages: list[dict[str, str]], completion: str, extra: dict[str, Any],
            sample: int, finish_reason: str | None, prompt_tokens: int | None,
            completion_tokens: int | None) -> dict[str, Any]:
    return {
        "prompt": prompt,
        "messages": [*messages, {"role": "assistant", "content": completion}],
        "completion": completion,
        **extra,
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens},
        "finish_reason": finish_reason,
        "sample": sample,
    }


async def ascore(records: list[dict[str, Any]], columns: list[str],
                 reward_fn: RewardFn) -> list[float | None]:
    """The reward of every record: fn(prompts, completions, **columns), sync or async."""
    result = reward_fn([r["prompt"] for r in records], [r["completion"] for r in records],
                       **{c: [r[c] for r in records] for c in columns})
    if inspect.isawaitable(result):
        result = await result
    rewards = list(result)
    if len(rewards) != len(records):
        raise ValueError(f"teacher.filter_reward returned {len(rewards)} scores for "
                         f"{len(records)} answers")
    return [None if r is None else float(r) for r in rewards]


def _finish(records: list[dict[str, Any]], rewards: list[float | None] | None, cfg: TeacherConfig,
            run_dir: Path, stats: CollectStats) -> CollectResult:
    """Keep answers scoring >= min_reward (when scored) and write the dataset atomically."""
    if rewards is not None:
        kept = []
        for record, reward in zip(records, rewards):
            if reward is None:
                stats.unscored += 1
            elif reward < cfg.min_reward:
                stats.rejected += 1
            else:
                kept.append({**record, "reward": reward})
        records = kept
    stats.kept = len(records)
    path = run_dir / cfg.output_file
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return CollectResult(dataset_path=path, stats=stats)
