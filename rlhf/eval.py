"""Accuracy and pass@k of any HF checkpoint (base or exported) through vLLM engines.

    python -m rlhf.eval model.name_or_path=runs/<run>/export trainer.eval_prompts=64 trainer.eval_samples=8

Uses the same config as training: the held-out split of ``data``, the ``env`` (multi-turn
rollouts with an environment, as in training; ``env.name=null``: one turn), the ``reward`` functions (a
sample is correct when the reward ``trainer.eval_reward``, by default the first, reaches 1.0; a
failed reward is counted apart, not as wrong; an unfinished episode is wrong), ``trainer.eval_*``
for prompts, samples and temperature. Prints the result and writes it as JSON to ``trainer.output_dir``/eval.json.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path


from rlhf.cli import hydra_main
from rlhf.cluster.startup import check_storage, prepare, start_ray
from rlhf.config import Config, ConfigError
from rlhf.config.store import register_configs
from rlhf.console import component_logs
from rlhf.experience.episodes import EnvRuntime, env_items
from rlhf.experience.heldout import EvalResult, evaluate
from rlhf.experience.prompts import PromptDataset
from rlhf.experience.scoring import reward_column_names
from rlhf.validation import eval_reward, validate
from rewards.runner import RewardRunner
from rollouts.group import EngineGroup

register_configs()


def run_eval(cfg: Config) -> EvalResult:
    validate(cfg)
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
    with RewardRunner(cfg.reward, columns=reward_column_names(cfg.data), run_dir=start.run_dir) as rewards:
        engines = EngineGroup(cfg.rollout, model_path, cfg.model.dtype, cfg.model.trust_remote_code, logs)
        try:
            check_storage(start.run_dir, model_path, engines=engines)
            result = evaluate(engines, items, rewards, cfg.trainer.eval_samples, cfg.trainer.eval_temperature,
                              cfg.rollout.max_new_tokens, reward=eval_reward(cfg), stop=tuple(cfg.rollout.stop),
                              env=env, env_weight=cfg.env.reward_weight)
        finally:
            engines.shutdown()
            env.close()
    out = Path(cfg.trainer.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps({"model": model_path, **asdict(result)}, indent=2) + "\n")
    print(f"{model_path}: {result.describe()}")
    return result


main = hydra_main(run_eval)


if __name__ == "__main__":
    main()
