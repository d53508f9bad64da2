"""Accuracy and pass@k of any HF checkpoint (base or exported) through vLLM engines.

    python -m rlhf.eval model.name_or_path=runs/<run>/export trainer.eval_prompts=64 trainer.eval_samples=8

Uses the same config as training: the held-out split of ``data``, the ``env`` (multi-turn
rollouts with an environment, as in training; ``env.name=null``: one turn), the ``reward`` functions (a
sample is correct when the reward ``trainer.eval_reward``, by default the first, reaches 1.0; a
failed reward is counted apart, not as wrong; an unfinished episode is wrong), ``trainer.eval_*``
for prompts, samples and temperature. Prints the result and writes it as JSON to ``trainer.output_dir``/eval.json.

With an agent (``agent.name`` or ``agent.command``: the application, rlhf/experience/agents.py) the
episodes are the application's own, through the gateway in front of the engines; with
``trainer.eval_against=closed`` the same application runs against the closed API it uses today
(``compare.base_url`` / ``compare.model`` / ``compare.api_key_env``), through a relay that records
what it saw (rollouts/gateway/relay.py), and no engine starts. Same prompts, agent and rewards:
"as good as before?" on the real application. eval.json then holds the tokens the episodes used
and, against the closed API, what they cost at ``ledger.closed_api_*`` list prices.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path


from rlhf.chat.client import Endpoint, api_key_from_env, check_served
from rlhf.cli import hydra_main
from rlhf.cluster.startup import check_storage, prepare, start_ray
from rlhf.config import Config, ConfigError
from rlhf.config.store import register_configs
from rlhf.console import component_logs
from rlhf.experience.agents import AgentRuntime, agent_configured
from rlhf.experience.episodes import EnvRuntime, env_items
from rlhf.experience.heldout import EvalResult, evaluate
from rlhf.experience.prompts import PromptDataset
from rlhf.experience.scoring import reward_column_names
from rlhf.run.ledger import api_cost_usd
from rlhf.validation import eval_reward, validate
from rewards.runner import RewardRunner
from rollouts.group import EngineGroup
from rollouts.requests import sampling_from_config

register_configs()


def run_eval(cfg: Config) -> EvalResult:
    validate(cfg)
    closed_key = check_closed(cfg)  # the closed API answers and serves its model, before anything starts
    start = prepare(cfg)  # absolute paths: the engines' nodes share no working directory with this one
    cfg, model_path = start.cfg, start.model_path
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=cfg.model.trust_remote_code)
    env = EnvRuntime(cfg.env, tokenizer, cfg.rollout.max_model_len)
    data = PromptDataset.from_config(cfg.data, tokenizer, split="eval", tools=env.tools)
    items = data.eval_items(cfg.trainer.eval_prompts)
    if not items:
        raise ConfigError(f"trainer.eval_prompts={cfg.trainer.eval_prompts}: no held-out prompts to evaluate")
    env.check(env_items(items)[0])  # a broken environment fails before the engines start
    # Ray before the rewards: a reward_model reward starts its actor when it is built.
    logs = component_logs(cfg.trainer)
    start_ray(cfg.trainer, logs)
    closed = cfg.trainer.eval_against == "closed"
    with RewardRunner(cfg.reward, columns=reward_column_names(cfg.data), run_dir=start.run_dir) as rewards, \
            ExitStack() as stack:
        stack.callback(env.close)
        engines, source = None, env
        if closed:
            source = AgentRuntime.relayed(cfg, closed_key)
            stack.callback(source.close)
        else:
            engines = EngineGroup(cfg.rollout, model_path, cfg.model.dtype, cfg.model.trust_remote_code, logs)
            stack.callback(engines.shutdown)
            check_storage(start.run_dir, model_path, engines=engines)
            if agent_configured(cfg.agent):
                source = AgentRuntime.start(cfg, engines, tokenizer, sampling_from_config(cfg.rollout))
                stack.callback(source.close)  # before the engines shut down (LIFO)
        result = evaluate(engines, items, rewards, cfg.trainer.eval_samples, cfg.trainer.eval_temperature,
                          cfg.rollout.max_new_tokens, reward=eval_reward(cfg), stop=tuple(cfg.rollout.stop),
                          env=source)
    served = f"{cfg.compare.model} at {cfg.compare.base_url}" if closed else model_path
    out = Path(cfg.trainer.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = {"model": served, "against": cfg.trainer.eval_against, **asdict(result)}
    if closed:
        report["closed_api_cost"] = closed_cost(cfg, result.reward_metrics)
    (out / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"{served}: {result.describe()}")
    return result


def check_closed(cfg: Config) -> str | None:
    """With trainer.eval_against=closed: the agent and the closed endpoint are set, it answers and
    serves compare.model; returns its key (None: none sent). Errors name the key to set."""
    if cfg.trainer.eval_against not in ("engines", "closed"):
        raise ConfigError(f"trainer.eval_against={cfg.trainer.eval_against!r} is not 'engines' or 'closed'")
    if cfg.trainer.eval_against == "engines":
        return None
    if not agent_configured(cfg.agent):
        raise ConfigError("trainer.eval_against=closed runs an application against the closed API: set agent.name "
                          "or agent.command (without one, python -m rlhf.compare compares single answers)")
    c = cfg.compare
    if not c.base_url or not c.model:
        raise ConfigError("trainer.eval_against=closed: set compare.base_url and compare.model, the closed API the "
                          "application uses today (e.g. https://api.openai.com/v1 and gpt-4o)")
    key = api_key_from_env(c.api_key_env, "compare.api_key_env")
    check_served(Endpoint.of(c, owner="compare"), c.model, key)
    return key


def closed_cost(cfg: Config, metrics: dict[str, float]) -> dict[str, float | str]:
    """What the evaluation's episodes cost at the closed API's list prices (ledger.closed_api_*)."""
    led = cfg.ledger
    prompt, completion = metrics.get("agent/prompt_tokens", 0.0), metrics.get("agent/completion_tokens", 0.0)
    usd = api_cost_usd(prompt, completion, led.closed_api_prompt_price_per_m, led.closed_api_completion_price_per_m)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "usd": usd, "prices": led.closed_api_name,
            "price_date": led.closed_api_price_date}


main = hydra_main(run_eval)


if __name__ == "__main__":
    main()
