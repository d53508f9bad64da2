"""Teacher answers for distillation, from an OpenAI-compatible chat-completions endpoint or a JSONL file.

``ask_teacher(rows, cfg, run_dir)`` asks the teacher for an answer to every prompt row and writes an SFT
dataset (``<run folder>/teacher.jsonl``): one object per kept answer with ``prompt``, ``messages``
(the prompt messages plus the assistant's answer), ``completion``, the row's other columns
(``answer``, ...), ``usage``, ``finish_reason`` and ``sample``. On the way:

- at most ``max_concurrency`` requests are in flight, retried as :mod:`rlhf.chat.client` says;
- every answer goes into a cache (:mod:`rlhf.chat.cache`) first, so an interrupted collection
  resumes without paying twice;
- prompt and completion tokens are counted as the API reports them (``usage``); paid ones go into
  the run's cost ledger;
- an optional reward function keeps only answers it scores >= ``min_reward``.

``from_jsonl(cfg, run_dir)`` turns answers collected elsewhere into the same dataset.

The API key is read from the environment variable named by ``teacher.api_key_env`` and only ever
placed in the Authorization header: it is not written to the cache, the dataset, logs or errors.
"""

from __future__ import annotations

import asyncio
import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from rlhf.config import ConfigError, TeacherConfig
from rlhf.chat.cache import ResponseCache, request_key
from rlhf.chat.client import ChatAnswer, ChatClient, Endpoint, api_key_from_env
from rlhf.run.ledger import CostLedger, atomic_write_text

# fn(prompts, completions, **columns) -> one float (or None: cannot score) per completion.
RewardFn = Callable[..., Any]

# Names the output dataset uses itself; a prompt column with one of these names would be overwritten.
OUTPUT_FIELDS = ("prompt", "messages", "completion", "usage", "finish_reason", "sample", "reward")
CACHE_FILE = "teacher_cache.jsonl"


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
    keys = list(jobs)

    def got(i: int, answer: ChatAnswer) -> None:
        cache.put(keys[i], answer, cfg.model)
        stats.paid += 1
        if answer.prompt_tokens is None or answer.completion_tokens is None:
            stats.missing_usage += 1
        pt, ct = answer.prompt_tokens or 0, answer.completion_tokens or 0
        stats.prompt_tokens += pt
        stats.completion_tokens += ct
        if ledger is not None:
            ledger.add_teacher(pt, ct)

    async with ChatClient(Endpoint.of(cfg), api_key) as client:
        try:  # a failure stops paying for the rest; answers already received are in the cache
            await client.complete_all([(body, f"prompt row {row}") for row, body in jobs.values()], got)
        finally:
            stats.http_requests += client.http_requests
            stats.retries += client.retries


async def ask_teacher_async(rows: list[dict[str, Any]], cfg: TeacherConfig, run_dir: str | Path,
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
    api_key = api_key_from_env(cfg.api_key_env)  # before any request, so a missing key costs nothing
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


def ask_teacher(rows: list[dict[str, Any]], cfg: TeacherConfig, run_dir: str | Path,
            reward_fn: RewardFn | None = None, ledger: CostLedger | None = None) -> CollectResult:
    """Synchronous :func:`ask_teacher_async` (not from inside a running event loop)."""
    return asyncio.run(ask_teacher_async(rows, cfg, run_dir, reward_fn, ledger))


def collect_from_config(cfg: TeacherConfig, run_dir: str | Path, reward_fn: RewardFn | None = None,
                        ledger: CostLedger | None = None) -> CollectResult:
    """The teacher dataset as the config says: source=api asks the endpoint for every prompt in
    teacher.path; source=jsonl reads answers from teacher.path."""
    if cfg.source == "jsonl":
        return from_jsonl(cfg, run_dir, reward_fn)
    if cfg.source != "api":
        raise ConfigError(f"teacher.source={cfg.source!r} is not one of ['api', 'jsonl'] (or 'engines', "
                          "collected by rlhf.distill.collect)")
    if not cfg.path:
        raise ConfigError("teacher.path is not set (the JSONL of prompts to ask the teacher)")
    _check_api_config(cfg)
    rows = read_jsonl(cfg.path, [cfg.prompt_column])
    return ask_teacher(rows, cfg, run_dir, reward_fn, ledger)


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
