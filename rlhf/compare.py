"""The verdict: is an open model as good as the closed one you pay for, and what does each cost?

    python -m rlhf.compare compare.base_url=https://api.openai.com/v1 compare.model=gpt-4o \\
        compare.models=[smollm2-135m-instruct,runs/x/export] compare.labels=[base,tuned] \\
        compare.prompts=64 trainer.output_dir=runs/verdict

The first ``compare.prompts`` held-out prompts of ``data`` go to the closed model over its API
(compare.*, answers cached in ``<output_dir>/compare_cache.jsonl``: a rerun pays nothing; prices
ledger.closed_api_*) and to each open model in ``compare.models`` on our vLLM engines (rollout.*;
one model's engines at a time). Every answer is scored by the same ``reward`` functions, which also
see the closed model's answer as the column ``closed_answer``. rlhf/run/verdict.py does the
arithmetic (quality ± stderr, win rate with its 95% CI, cost per 1M output tokens, latency
median/p95, break-even volume); the results go to ``compare.json``, ``compare.md`` and
``compare.png`` in ``trainer.output_dir``, and one line to the console.

With an agent (agent.name or agent.command: the application, rlhf/experience/agents.py) each
side's answer to a prompt is one episode of that application: against the closed API through a
relay (rollouts/gateway/relay.py; the application samples as it asks that API), against each open
model through the gateway in front of its engines (compare.temperature, compare.max_tokens per
call). Scored by the same rewards, the agent's own among them as ``agent`` (usable as
compare.reward); rlhf/experience/answers.py says how latency and throughput are timed. These
closed episodes are not cached: they are paid on every run.

Every bad input (no closed model, key variable unset, endpoint unreachable or not serving the model,
an unknown reward, a model folder that does not exist, no price, a broken agent) is a ConfigError
before any engine starts and before anything is paid for.
"""

from __future__ import annotations

import json
import math
import os
import platform
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from rlhf.chat.client import Endpoint, api_key_from_env, check_served
from rlhf.cli import hydra_main
from rlhf.cluster.startup import check_storage, model_folder, prepare, start_ray
from rlhf.config import Config, ConfigError, RewardConfig
from rlhf.config.store import register_configs
from rlhf.console import component_logs
from rlhf.experience.agents import AgentRuntime, agent_configured
from rlhf.experience.answers import (CLOSED_ANSWER, Answers, agent_answers, closed_answers, open_answers,
                                     score_answers)
from rlhf.experience.prompts import PromptDataset, PromptItem
from rlhf.experience.scoring import reward_column_names, score_episodes
from rlhf.models import SMOLLM2, TINY, check_model_named
from rlhf.run.ledger import atomic_write_text, priced_device_kind, serving_usd_per_m
from rlhf.run.plot import plot_verdict
from rlhf.run.verdict import (ModelVerdict, Verdict, break_even_m_tokens, console_line, estimate, latency,
                              markdown, win_rate, win_scores)
from rlhf.types import SamplingSettings
from rlhf.validation import check_agent, eval_reward, reward_names
from rewards.api import check_specs
from rewards.runner import RewardRunner
from rollouts.group import EngineGroup

register_configs()

CACHE_FILE = "compare_cache.jsonl"
JSON_FILE, MD_FILE, PNG_FILE = "compare.json", "compare.md", "compare.png"


@dataclass(frozen=True)
class Setup:
    """What the checks resolved: the open models (as given, and their labels), the rewards, the
    device and the key (held in memory only)."""

    models: list[str]
    labels: list[str]
    reward: str
    win_reward: str | None
    device_kind: str
    api_key: str | None


def is_model_folder(name: str) -> bool:
    return name in (SMOLLM2, TINY) or (Path(name) / "config.json").is_file()


def check_compare(cfg: Config) -> Setup:
    """Every check that needs no engine, in the order a user fixes them; the endpoint last."""
    c = cfg.compare
    check_model_named(cfg.model.name_or_path)
    if not c.base_url:
        raise ConfigError("compare.base_url is not set: the closed model's OpenAI-compatible endpoint "
                          "(e.g. https://api.openai.com/v1)")
    if not c.model:
        raise ConfigError("compare.model is not set: the closed model's name at compare.base_url")
    for key, low in [("prompts", 1), ("latency_requests", 1), ("max_tokens", 1), ("max_concurrency", 1),
                     ("max_retries", 0)]:
        if getattr(c, key) < low:
            raise ConfigError(f"compare.{key}={getattr(c, key)} must be >= {low}")
    for key in ("monthly_hours", "timeout_s"):
        if not getattr(c, key) > 0:
            raise ConfigError(f"compare.{key}={getattr(c, key)} must be > 0")
    if c.max_tokens + cfg.data.max_prompt_tokens > cfg.rollout.max_model_len:
        raise ConfigError(f"compare.max_tokens + data.max_prompt_tokens = {c.max_tokens} + "
                          f"{cfg.data.max_prompt_tokens} exceeds rollout.max_model_len={cfg.rollout.max_model_len}")
    if not cfg.ledger.closed_api_completion_price_per_m > 0:
        raise ConfigError("ledger.closed_api_completion_price_per_m must be > 0: the closed model's list price "
                          "per 1M output tokens (with ledger.closed_api_name and ledger.closed_api_price_date)")
    if cfg.env.name is not None:
        raise ConfigError(f"env.name={cfg.env.name!r}: the verdict asks single-turn questions, or runs an agent "
                          "(agent.name / agent.command); set env=none")
    check_agent(cfg)
    models = list(c.models) or [cfg.model.name_or_path]
    for i, m in enumerate(models):
        if not is_model_folder(m):
            raise ConfigError(f"compare.models[{i}]={m!r}: no such model folder (a built-in name, "
                              f"{SMOLLM2} or {TINY}, or a local HF folder with config.json)")
    if c.labels and len(c.labels) != len(models):
        raise ConfigError(f"compare.labels has {len(c.labels)} labels for {len(models)} models")
    labels = list(c.labels) or models
    try:  # every reward resolves and finds its columns, closed_answer among them (nothing is built)
        check_specs(cfg.reward.functions, columns=reward_columns(cfg))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    names = reward_names(cfg)
    reward = c.reward or eval_reward(cfg)
    for key, name in (("compare.reward" if c.reward else "trainer.eval_reward", reward),
                      ("compare.win_reward", c.win_reward)):
        if name is not None and name not in names:
            raise ConfigError(f"{key}={name!r} is not a configured reward (reward.functions: {names})")
    kind = priced_device_kind(cfg.ledger)
    key = api_key_from_env(c.api_key_env, "compare.api_key_env")
    check_served(Endpoint.of(c, owner="compare"), c.model, key)
    return Setup(models, labels, reward, c.win_reward, kind, key)


def held_out(cfg: Config, model_path: str) -> list[PromptItem]:
    """The first compare.prompts held-out prompts, templated and tokenized for this model."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=cfg.model.trust_remote_code)
    items = PromptDataset.from_config(cfg.data, tokenizer, split="eval").eval_items(cfg.compare.prompts)
    if not items:
        raise ConfigError(f"compare.prompts={cfg.compare.prompts}: data has no held-out prompts")
    return items


def machine() -> dict[str, Any]:
    """Which hardware the open figures were measured on, and how busy it was."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "load_average": list(os.getloadavg())}


def reward_columns(cfg: Config) -> list[str]:
    """What the rewards are passed: training's columns and the closed model's answer."""
    return [*reward_column_names(cfg.data), CLOSED_ANSWER]


def quality_only(cfg: Config, reward: str) -> RewardConfig:
    """cfg.reward with only the function named ``reward`` (and no agreement between two)."""
    keep = [f for f, name in zip(cfg.reward.functions, reward_names(cfg)) if name == reward]
    return replace(cfg.reward, functions=keep, agreement=[])


def run_compare(cfg: Config) -> Verdict:
    setup = check_compare(cfg)  # before anything is paid for or started
    cfg = prepare(cfg).cfg  # absolute paths: the engines' nodes share no working directory
    out = Path(cfg.trainer.output_dir)
    paths = [model_folder(m, cfg.model.cache_dir) for m in setup.models]
    items = [held_out(cfg, p) for p in paths]  # bad data fails before Ray starts
    for i, its in enumerate(items[1:], start=1):
        if [it.raw_prompt for it in its] != [it.raw_prompt for it in items[0]]:
            raise ConfigError(f"compare.models[{i}]={setup.models[i]!r} keeps other held-out prompts than "
                              f"compare.models[0] (data.max_prompt_tokens filters by each tokenizer)")
    out.mkdir(parents=True, exist_ok=True)
    answer = agent_episodes if agent_configured(cfg.agent) else single_answers
    closed, closed_scores, opened = answer(cfg, setup, paths, items, out)
    verdict = build_verdict(cfg, setup, closed, closed_scores.per_fn, opened)
    write_report(verdict, out, items[0], closed, [a for a, _ in opened])
    print(console_line(verdict), flush=True)
    return verdict


def single_answers(cfg: Config, setup: Setup, paths: list[str], items: list[list[PromptItem]], out: Path
                   ) -> tuple[Answers, Any, list[tuple[Answers, Any]]]:
    """One answer per prompt from the closed model (cached) and from each open model; all scored."""
    c = cfg.compare
    closed = closed_answers(items[0], Endpoint.of(c, owner="compare"), setup.api_key, c.model,
                            {"temperature": c.temperature, "max_tokens": c.max_tokens},
                            cfg.data.system_prompt, c.latency_requests, out / CACHE_FILE)
    print(f"closed model {c.model}: {len(closed.texts)} answers ({closed.cache_hits} from the cache, "
          f"{closed.requests_paid} bought)", flush=True)

    logs = component_logs(cfg.trainer)
    start_ray(cfg.trainer, logs)
    sampling = SamplingSettings(n=1, temperature=c.temperature, max_new_tokens=c.max_tokens,
                                stop=tuple(cfg.rollout.stop))
    opened: list[tuple[Answers, Any]] = []
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(paths[0], trust_remote_code=cfg.model.trust_remote_code)
    closed_ids = [tok(t, add_special_tokens=False)["input_ids"] for t in closed.texts]
    # The closed answers by the quality reward alone: the others (a pairwise judge reading
    # closed_answer) would compare each closed answer with itself, paid judge calls for nothing.
    with RewardRunner(quality_only(cfg, setup.reward), columns=reward_columns(cfg), run_dir=out) as runner:
        closed_scores = score_answers(runner, items[0], closed.texts, closed_ids, closed.texts)
    with RewardRunner(cfg.reward, columns=reward_columns(cfg), run_dir=out) as runner:
        for path, its in zip(paths, items):
            engines = EngineGroup(cfg.rollout, path, cfg.model.dtype, cfg.model.trust_remote_code, logs)
            try:  # one model's engines at a time
                check_storage(out, path, engines=engines)
                answers, ids = open_answers(engines, its, sampling, c.latency_requests)
            finally:
                engines.shutdown()
            opened.append((answers, score_answers(runner, its, answers.texts, ids, closed.texts)))
            print(f"{path}: {len(answers.texts)} answers, {answers.tokens_per_s:.1f} tokens/s", flush=True)
    return closed, closed_scores, opened


def agent_episodes(cfg: Config, setup: Setup, paths: list[str], items: list[list[PromptItem]], out: Path
                   ) -> tuple[Answers, Any, list[tuple[Answers, Any]]]:
    """One agent episode per prompt against the closed API (relayed, paid each run) and against each
    open model's engines (through the gateway); all scored, the agent's own reward as ``agent``."""
    c = cfg.compare
    logs = component_logs(cfg.trainer)
    start_ray(cfg.trainer, logs)  # before the relay: its address is this node's as Ray knows it
    sampling = SamplingSettings(n=1, temperature=c.temperature, max_new_tokens=c.max_tokens,
                                stop=tuple(cfg.rollout.stop))
    weight, agent = cfg.agent.reward_weight, agent_label(cfg)
    runtime = AgentRuntime.relayed(cfg, setup.api_key)
    try:
        closed, closed_eps = agent_answers(runtime, items[0], c.latency_requests, throughput=False)
    finally:
        runtime.close()
    print(f"closed model {c.model}: {len(closed.texts)} episodes of agent {agent} "
          f"({closed.requests_paid} calls bought)", flush=True)
    closed_column = {CLOSED_ANSWER: list(closed.texts)}
    # The closed episodes by the quality reward (and the agent's own) alone, as single_answers does.
    with RewardRunner(quality_only(cfg, setup.reward), columns=reward_columns(cfg), run_dir=out) as runner:
        closed_scores = score_episodes(runner, items[0], closed_eps, weight, True, closed_column)
    opened: list[tuple[Answers, Any]] = []
    from transformers import AutoTokenizer

    with RewardRunner(cfg.reward, columns=reward_columns(cfg), run_dir=out) as runner:
        for path, its in zip(paths, items):
            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.model.trust_remote_code)
            engines = EngineGroup(cfg.rollout, path, cfg.model.dtype, cfg.model.trust_remote_code, logs)
            try:  # one model's engines at a time
                check_storage(out, path, engines=engines)
                runtime = AgentRuntime.start(cfg, engines, tokenizer, sampling)
                try:
                    answers, episodes = agent_answers(runtime, its, c.latency_requests, throughput=True)
                finally:
                    runtime.close()  # before its engines
            finally:
                engines.shutdown()
            opened.append((answers, score_episodes(runner, its, episodes, weight, True, closed_column)))
            print(f"{path}: {len(answers.texts)} episodes of agent {agent}, {answers.tokens_per_s:.1f} "
                  "completion tokens/s", flush=True)
    return closed, closed_scores, opened


def agent_label(cfg: Config) -> str | None:
    """The agent as compare.json names it: agent.name, or agent.command's argv; None without one."""
    if cfg.agent.name is not None:
        return cfg.agent.name
    return " ".join(cfg.agent.command) if cfg.agent.command is not None else None


def build_verdict(cfg: Config, setup: Setup, closed: Answers, closed_per_fn: dict[str, list],
                  opened: list[tuple[Answers, Any]]) -> Verdict:
    c, ledger = cfg.compare, cfg.ledger
    hourly = ledger.device_hour_price[setup.device_kind]
    closed_price = ledger.closed_api_completion_price_per_m
    closed_q = closed_per_fn[setup.reward]
    closed_v = ModelVerdict(label=c.name or c.model, model=c.model, scores=closed_q, answer_tokens=closed.tokens,
                            quality=estimate(closed_q), usd_per_m=closed_price, latency=latency(closed.latencies_s),
                            rewards=dict(closed_per_fn))
    models = []
    for label, model, (answers, scored) in zip(setup.labels, setup.models, opened):
        q = scored.per_fn[setup.reward]
        wins = scored.per_fn[setup.win_reward] if setup.win_reward else win_scores(q, closed_q)
        cost = serving_usd_per_m(hourly * ledger.num_devices, answers.tokens_per_s)
        models.append(ModelVerdict(
            label=label, model=model, scores=q, answer_tokens=answers.tokens, quality=estimate(q),
            usd_per_m=cost, latency=latency(answers.latencies_s), tokens_per_s=answers.tokens_per_s,
            wins=wins, win_rate=win_rate(wins), rewards=dict(scored.per_fn),
            break_even_m_tokens=break_even_m_tokens(hourly, ledger.num_devices, c.monthly_hours, closed_price, cost)))
    return Verdict(
        closed=closed_v, open=models, reward=setup.reward, win_from=setup.win_reward or "reward",
        closed_price={"name": ledger.closed_api_name, "prompt_usd_per_m": ledger.closed_api_prompt_price_per_m,
                      "completion_usd_per_m": closed_price, "date": ledger.closed_api_price_date},
        device_kind=setup.device_kind, num_devices=ledger.num_devices, device_hour_usd=hourly,
        monthly_hours=c.monthly_hours, prompts=len(closed_q),
        extra={"machine": machine(), "closed_requests_paid": closed.requests_paid,
               "closed_cache_hits": closed.cache_hits, "temperature": c.temperature, "max_tokens": c.max_tokens,
               # Agent episodes: the agent, and what each side's episodes counted (calls, failures, tokens).
               **({"agent": agent, "episodes": {m.label: a.metrics for m, a in
                                                zip([closed_v, *models], [closed, *(a for a, _ in opened)])}}
                  if (agent := agent_label(cfg)) else {})})


def _finite(x: Any) -> Any:
    """NaN as null: JSON has no NaN."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite(v) for v in x]
    return x


def write_report(v: Verdict, out: Path, items: list[PromptItem], closed: Answers, opened: list[Answers]) -> None:
    """compare.json (every figure and the per-prompt table), compare.md, compare.png."""
    payload = asdict(v)
    payload.update(payload.pop("extra"))
    payload["prompts_text"] = [it.raw_prompt for it in items]
    payload["closed"]["answers"] = closed.texts
    for m, a in zip(payload["open"], opened):
        m["answers"] = a.texts
    atomic_write_text(out / JSON_FILE, json.dumps(_finite(payload), indent=2, ensure_ascii=False) + "\n")
    atomic_write_text(out / MD_FILE, markdown(v))
    points = [(m.label, m.usd_per_m, m.quality.mean, m.quality.stderr) for m in [v.closed, *v.open]]
    m = v.extra.get("machine", {})
    where = (f"open models measured on {v.num_devices} x {v.device_kind}: {m.get('cpu')}, "
             f"{m.get('cpu_count')} cores, load {m['load_average'][0]:.2f}") if m else ""
    plot_verdict(points, out / PNG_FILE, v.closed.label, where)


main = hydra_main(run_compare)


if __name__ == "__main__":
    main()
