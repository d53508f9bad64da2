"""``judge``: an LLM grades each completion against a rubric; its grade, normalised to [0, 1], is the reward.

Pointwise (``mode: pointwise``): the judge reads the rubric with the prompt, the completion and any
dataset column filled in, and replies with ``Score: N`` on ``scale`` (or ``{"score": N}`` with
``structured: true``, which asks the endpoint for that JSON schema). Pairwise
(``mode: pairwise``): the completion against the row's ``reference_column`` answer, asked in both
orders to cancel position bias; reward = mean of win 1 / tie 0.5 / loss 0 (judge_parse.py).
Several ``criteria`` (each a rubric and a weight) combine as a weighted mean.

Nothing fails silently: an unparsable or out-of-scale reply, and a request that failed after its
retries, is a None counted in ``usage()`` (``unparsable``, ``errors``), never a 0. Answers are
cached in ``<run_dir>/judge_cache.jsonl`` by judge model + rendered rubric + sampling settings, so a
resumed run never pays twice, and identical questions within one call are asked once; the first
``log_samples`` samples of each call go to ``<run_dir>/judge_samples.jsonl`` for a person to read
(judges are gamed). The API key is read from the variable ``api_key_env`` names and lives only in
the request header.

Everything that can be checked is checked when the reward is built, before any engine starts: the
settings, the rubric's placeholders against the columns the runner will pass, the key variable,
and that the endpoint answers and serves ``model``.
"""

from __future__ import annotations

import inspect
import json
import logging
import threading
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence

from rlhf.chat.cache import ResponseCache, request_key
from rlhf.chat.client import ChatAnswer, Endpoint, EndpointError, api_key_from_env
from rlhf.config import ConfigError
from rewards.builtin.judge_http import HttpJudge, JudgeBackend
from rewards.builtin.judge_parse import (inconsistent, normalise, pairwise_reward, parse_score, parse_verdict,
                                         score_schema, verdict_schema, weighted_mean)
from rewards.builtin.judge_rubric import MODE_SLOTS, Rubric, load_rubric

CACHE_FILE = "judge_cache.jsonl"
SAMPLES_FILE = "judge_samples.jsonl"
MODES = tuple(MODE_SLOTS)
BACKENDS = ("http", "engines")
log = logging.getLogger(__name__)
COUNTERS = ("requests", "cache_hits", "unparsable", "errors", "prompt_tokens", "completion_tokens",
            "inconsistent_pairs")


@dataclass(frozen=True)
class Criterion:
    name: str
    rubric: str  # a file path or a shipped rubric's name
    weight: float = 1.0


@dataclass(frozen=True)
class JudgeSettings:
    """The judge's kwargs (README "Judge reward" has the table). ``check`` names each bad one."""

    model: str
    rubric: str | None = None
    criteria: tuple[Criterion, ...] = ()
    mode: str = "pointwise"
    scale: tuple[float, float] = (1.0, 10.0)
    structured: bool = False
    reference_column: str = "reference"
    backend: str = "http"
    base_url: str | None = None
    api_key_env: str | None = None
    max_concurrency: int = 8
    timeout_s: float = 60.0  # per request attempt
    max_retries: int = 3
    backoff_base_s: float = 1.0
    backoff_max_s: float = 30.0
    temperature: float = 0.0
    max_tokens: int = 256
    engines: dict = field(default_factory=dict)  # backend=engines: EngineConfig overrides
    dtype: str = "float32"  # backend=engines
    log_samples: int = 2

    def check(self) -> None:
        def bad(key: str, why: str) -> ConfigError:
            return ConfigError(f"judge.{key}={getattr(self, key)!r}: {why}")

        if not self.model:
            raise bad("model", "name the judge model (as the endpoint serves it, or a folder for engines)")
        if self.mode not in MODES:
            raise bad("mode", f"not one of {list(MODES)}")
        if self.backend not in BACKENDS:
            raise bad("backend", f"not one of {list(BACKENDS)}")
        if (self.rubric is None) == (not self.criteria):
            raise ConfigError(f"judge: give exactly one of rubric (one rubric) or criteria (several); got "
                              f"rubric={self.rubric!r}, criteria={[c.name for c in self.criteria]}")
        lo, hi = self.scale
        if not lo < hi:
            raise bad("scale", "must be [lo, hi] with lo < hi")
        if any(c.weight <= 0 for c in self.criteria):
            raise bad("criteria", "every criterion's weight must be > 0")
        if len({c.name for c in self.criteria}) != len(self.criteria):
            raise bad("criteria", "criterion names must be distinct")
        if self.backend == "http" and not self.base_url:
            raise bad("base_url", "backend=http needs the endpoint's URL (e.g. http://127.0.0.1:8000/v1)")
        for key in ("max_concurrency", "max_tokens"):
            if getattr(self, key) < 1:
                raise bad(key, "must be >= 1")
        for key in ("max_retries", "log_samples", "temperature"):
            if getattr(self, key) < 0:
                raise bad(key, "must be >= 0")
        if self.timeout_s <= 0:
            raise bad("timeout_s", "must be > 0")


def _signature() -> inspect.Signature:
    """Judge's constructor as the settings' fields: the names and defaults are written once (in
    JudgeSettings), and validation binds a config's kwargs to them before anything is built."""
    params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_ONLY)]
    params += [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default)
               for name, default in (("run_dir", None), ("columns", None))]
    for f in fields(JudgeSettings):
        default = (f.default if f.default is not MISSING else
                   f.default_factory() if f.default_factory is not MISSING else inspect.Parameter.empty)
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default))
    return inspect.Signature(params)


def settings_from_kwargs(kwargs: dict[str, Any]) -> JudgeSettings:
    """The typed settings from a config's kwargs; a malformed scale or criterion is named."""
    kwargs = dict(kwargs)
    scale = kwargs.pop("scale", (1.0, 10.0))
    try:
        lo, hi = (float(x) for x in scale)
    except (TypeError, ValueError):
        raise ConfigError(f"judge.scale={scale!r}: must be two numbers [lo, hi]") from None
    criteria = []
    for i, c in enumerate(kwargs.pop("criteria", None) or []):
        if not isinstance(c, dict) or set(c) - {"name", "rubric", "weight"} or "rubric" not in c:
            raise ConfigError(f"judge.criteria[{i}]={c!r}: each criterion is {{name, rubric, weight}}")
        criteria.append(Criterion(name=str(c.get("name", f"criterion{i}")), rubric=str(c["rubric"]),
                                  weight=float(c.get("weight", 1.0))))
    settings = JudgeSettings(**kwargs, scale=(lo, hi), criteria=tuple(criteria))
    settings.check()
    return settings


@dataclass
class _Job:
    """One question to the judge: sample i, criterion k, in one order (pairwise) or the only one."""

    sample: int
    criterion: int
    order: str  # "pointwise", "completion_first" or "completion_second"
    messages: list[dict[str, str]]
    reply: str | None = None


class Judge:
    """The ``judge`` reward (class-based: the runner builds one and calls it per batch)."""

    def __init__(self, run_dir: str | Path | None = None, columns: Sequence[str] | None = None, **kwargs: Any):
        """``kwargs``: :class:`JudgeSettings`' fields; ``run_dir`` and ``columns`` come from the runner."""
        s = settings_from_kwargs(kwargs)
        self.settings = s
        self.rubrics: list[Rubric] = []
        self.weights: list[float] = []
        for key, name, weight in self._rubric_specs():
            self.rubrics.append(load_rubric(name, key, self._allowed_slots(columns)))
            self.weights.append(weight)
        self._sampling: dict[str, Any] = {"temperature": s.temperature, "max_tokens": s.max_tokens}
        if s.structured:
            self._sampling["response_format"] = score_schema(*s.scale) if s.mode == "pointwise" else verdict_schema()
        self._counts = dict.fromkeys(COUNTERS, 0)
        self._lock = threading.Lock()  # training's producer thread and evaluation may both call
        self._calls = 0
        run_dir = Path(run_dir) if run_dir is not None else None
        # Without a run folder (a bare RewardRunner) nothing is cached or logged.
        self._cache = ResponseCache(run_dir / CACHE_FILE) if run_dir is not None else None
        self._samples_path = run_dir / SAMPLES_FILE if run_dir is not None else None
        self.backend = self._build_backend()  # last: it checks the endpoint, or starts engines

    def _rubric_specs(self) -> list[tuple[str, str, float]]:
        s = self.settings
        if s.rubric is not None:
            return [("judge.rubric", s.rubric, 1.0)]
        return [(f"judge.criteria[{i}].rubric", c.rubric, c.weight) for i, c in enumerate(s.criteria)]

    def _allowed_slots(self, columns: Sequence[str] | None) -> list[str] | None:
        s = self.settings
        if columns is None:
            return None
        if s.mode == "pairwise" and s.reference_column not in columns:
            raise ConfigError(f"judge.reference_column={s.reference_column!r}: pairwise mode compares each "
                              f"completion with this column, and the columns passed are {sorted(columns)} "
                              "(add it to data.reward_columns)")
        extra = ["reference"] if s.mode == "pointwise" and s.reference_column in columns else []
        return [*MODE_SLOTS[s.mode], *extra, *columns]

    def _build_backend(self) -> JudgeBackend:
        s = self.settings
        if s.backend == "engines":
            from rewards.builtin.judge_engines import EngineJudge  # Ray and vLLM only when asked for

            return EngineJudge(model=s.model, engines=dict(s.engines), dtype=s.dtype)
        endpoint = Endpoint(base_url=s.base_url, timeout_s=s.timeout_s, max_concurrency=s.max_concurrency,
                            max_retries=s.max_retries, backoff_base_s=s.backoff_base_s,
                            backoff_max_s=s.backoff_max_s, owner="judge")
        return HttpJudge(endpoint, s.model, api_key_from_env(s.api_key_env, "judge.api_key_env"))

    # --- scoring ---------------------------------------------------------------------------------

    def __call__(self, prompts: list[str], completions: list[str], **columns: list) -> list[float | None]:
        jobs = self._jobs(prompts, completions, columns)
        self._ask(jobs)
        per_sample: list[list[_Job]] = [[] for _ in completions]
        for job in jobs:
            per_sample[job.sample].append(job)
        scores = [self._score(sample_jobs) for sample_jobs in per_sample]
        self._log_samples(prompts, completions, columns, per_sample, scores)
        return scores

    def _jobs(self, prompts: list[str], completions: list[str], columns: dict[str, list]) -> list[_Job]:
        s = self.settings
        ref = columns.get(s.reference_column)
        if s.mode == "pairwise" and ref is None:
            raise ValueError(f"judge: pairwise mode needs the column {s.reference_column!r} "
                             f"(judge.reference_column); got columns {sorted(columns)}")
        jobs = []
        for i, (prompt, completion) in enumerate(zip(prompts, completions)):
            row = {k: v[i] for k, v in columns.items()}
            row["prompt"] = prompt
            if ref is not None:
                row["reference"] = ref[i]
            if s.mode == "pointwise":
                orders = [("pointwise", {"completion": completion})]
            else:
                orders = [("completion_first", {"first": completion, "second": ref[i]}),
                          ("completion_second", {"first": ref[i], "second": completion})]
            for k, rubric in enumerate(self.rubrics):
                for order, slots in orders:
                    text = rubric.render({**row, **slots})
                    jobs.append(_Job(i, k, order, [{"role": "user", "content": text}]))
        return jobs

    def _ask(self, jobs: list[_Job]) -> None:
        """Fill each job's reply from the cache or the backend; a failed request leaves it None."""
        model = self.backend.model
        # One request per distinct question: a group's identical completions (common for short
        # answers) are judged once, as the cache would answer them on a rerun.
        todo: dict[str, list[_Job]] = {}
        for job in jobs:
            key = request_key(model, job.messages, self._sampling, 0)
            hit = self._cache.get(key) if self._cache is not None else None
            if hit is not None:
                job.reply = hit.content
            else:
                todo.setdefault(key, []).append(job)
        firsts = [same[0] for same in todo.values()]
        bodies = [{"model": model, "messages": job.messages, **self._sampling} for job in firsts]
        labels = [f"judge sample {job.sample} ({job.order}, rubric {job.criterion})" for job in firsts]
        answers = self.backend.answer_all(bodies, labels) if todo else []
        failed = [a for a in answers if isinstance(a, EndpointError)]
        if failed:  # counted as Nones; say why once per call (the client keeps the key out of it)
            log.warning("judge: %d of %d requests failed; first: %s", len(failed), len(todo), failed[0])
        with self._lock:
            self._counts["cache_hits"] += len(jobs) - len(todo)  # answered without a request of their own
            self._counts["requests"] += len(todo)
            for (key, same), answer in zip(todo.items(), answers):
                if isinstance(answer, EndpointError):
                    self._counts["errors"] += len(same)  # every sample asking it gets a counted None
                    continue
                assert isinstance(answer, ChatAnswer), type(answer)
                for job in same:
                    job.reply = answer.content
                self._counts["prompt_tokens"] += answer.prompt_tokens or 0
                self._counts["completion_tokens"] += answer.completion_tokens or 0
                if self._cache is not None:
                    self._cache.put(key, answer, model)

    def _score(self, jobs: list[_Job]) -> float | None:
        """One sample's reward from its jobs (criteria in order; pairwise: both orders each)."""
        s = self.settings
        per_criterion: list[float | None] = []
        unparsable = pairs_inconsistent = 0
        for k in range(len(self.rubrics)):
            mine = [j for j in jobs if j.criterion == k]
            if s.mode == "pointwise":
                (job,) = mine
                value = None
                if job.reply is not None:
                    value = normalise(parse_score(job.reply, s.structured), *s.scale)
                    unparsable += value is None
            else:
                verdicts = {}
                for job in mine:
                    verdicts[job.order] = parse_verdict(job.reply, s.structured) if job.reply is not None else None
                    unparsable += job.reply is not None and verdicts[job.order] is None
                first, second = verdicts["completion_first"], verdicts["completion_second"]
                value = pairwise_reward(first, second)
                pairs_inconsistent += inconsistent(first, second)
            per_criterion.append(value)
        with self._lock:
            self._counts["unparsable"] += unparsable
            self._counts["inconsistent_pairs"] += pairs_inconsistent
        return weighted_mean(per_criterion, self.weights)

    def _log_samples(self, prompts: list[str], completions: list[str], columns: dict[str, list],
                     per_sample: list[list[_Job]], scores: list[float | None]) -> None:
        if self._samples_path is None or self.settings.log_samples == 0:
            return
        with self._lock:
            self._calls += 1
            call = self._calls
        ref = columns.get(self.settings.reference_column)
        lines = []
        for i in range(min(self.settings.log_samples, len(completions))):
            lines.append(json.dumps({
                "call": call, "sample": i, "prompt": prompts[i], "completion": completions[i],
                "reference": ref[i] if ref is not None else None,
                "replies": [{"rubric": str(self.rubrics[j.criterion].path.name), "order": j.order, "reply": j.reply}
                            for j in per_sample[i]],
                "score": scores[i],
            }, ensure_ascii=False, default=str))
        with self._lock, open(self._samples_path, "a", encoding="utf-8") as f:
            f.write("".join(line + "\n" for line in lines))

    def usage(self) -> dict[str, float]:
        """Cumulative counters since construction (the runner logs each step's increase)."""
        with self._lock:
            return {k: float(v) for k, v in self._counts.items()}

    def close(self) -> None:
        self.backend.close()


# On __init__, not the class: an instance's own signature (its __call__, which takes the columns)
# must stay what it is.
Judge.__init__.__signature__ = _signature()  # type: ignore[attr-defined]
