"""Every rule a composed config must meet, checked before anything loads or starts.

The schema (``rlhf.config``) knows types; the rules that need more live here, one floor up: names
looked up in the algorithm registries, reward specs resolved to their functions, the engines' and
the learner's own checks, and the batch arithmetic. ``plan=true`` runs exactly these checks, so a
plan that prints is a run that starts.
"""

from __future__ import annotations

import math

from rlhf.algo import ADVANTAGES, AGGREGATIONS, KL_ESTIMATORS, POLICY_LOSSES, ROLLOUT_CORRECTIONS
from rlhf.algo.distill import DISTILL_OBJECTIVES
from rlhf.cluster.placement import plan_placement
from rlhf.config import Config, ConfigError, EngineConfig
from rlhf.config.batches import BatchPlan, plan_batches, total_updates
from rlhf.console import CONSOLE_MODES
from rlhf.experience.agent_api import EXECUTORS as AGENT_EXECUTORS
from rlhf.experience.agent_api import check_command, load_agent
from rlhf.experience.agents import AGENT_REWARD, agent_configured
from rlhf.experience.scoring import ENV_REWARD, reward_column_names
from rlhf.learner.lora import check_adapter_serving, check_lora
from rlhf.learner.packing import sliding_windows
from rlhf.learner.settings import check_sampling, check_settings
from rlhf.models import check_model_named
from rewards.api import check_specs, default_name
from rewards.runner import EXECUTORS, check_agreement
from rollouts.engine import bound_cores
from rollouts.env.api import load_env
from rollouts.requests import sampling_from_config


def validate(cfg: Config) -> BatchPlan:
    """Raise ConfigError naming the key and value of the first setting that cannot work."""
    check_model_named(cfg.model.name_or_path)
    choices = {
        "learner.lr_schedule": (cfg.learner.lr_schedule, ("constant", "cosine")),
        "learner.zero_stage": (cfg.learner.zero_stage, (0, 1, 2, 3)),
        "data.on_too_long": (cfg.data.on_too_long, ("filter", "error")),
        "trainer.placement": (cfg.trainer.placement, ("colocated", "separate")),
        "trainer.console": (cfg.trainer.console, CONSOLE_MODES),
        "model.dtype": (cfg.model.dtype, ("float32", "bfloat16", "float16")),
        "reward.executor": (cfg.reward.executor, EXECUTORS),
        "agent.executor": (cfg.agent.executor, AGENT_EXECUTORS),
        "gateway.client_sampling": (cfg.gateway.client_sampling, ("override", "refuse")),
    }
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is not one of {list(allowed)}")
    for key, registry in [
        ("algo.advantage", ADVANTAGES),
        ("algo.policy_loss", POLICY_LOSSES),
        ("algo.loss_agg", AGGREGATIONS),
        ("algo.kl_estimator", KL_ESTIMATORS),
        ("algo.rollout_correction", ROLLOUT_CORRECTIONS),
        ("algo.distill", DISTILL_OBJECTIVES),
    ]:
        name = getattr(cfg.algo, key.split(".")[1])
        if name not in registry:
            raise ConfigError(f"{key}={name!r} is not a registered {registry.kind}; known: {registry.names()}")
    check_distill(cfg)
    # Every registered estimator takes its baseline from the prompt's own group of samples (pure
    # distillation has no task reward to compare).
    if cfg.rollout.n < 2 and has_task_reward(cfg):
        raise ConfigError(
            f"rollout.n={cfg.rollout.n}: algo.advantage={cfg.algo.advantage} compares samples within a "
            "group, so it needs at least 2 samples per prompt"
        )
    if cfg.algo.clip_low < 0 or cfg.algo.clip_high < 0:
        raise ConfigError(
            f"algo.clip_low={cfg.algo.clip_low}, algo.clip_high={cfg.algo.clip_high} must be >= 0"
        )
    if cfg.algo.dual_clip is not None and cfg.algo.dual_clip <= 1:
        raise ConfigError(f"algo.dual_clip={cfg.algo.dual_clip} must be > 1 (or null)")
    if cfg.algo.kl_coef < 0:
        raise ConfigError(f"algo.kl_coef={cfg.algo.kl_coef} must be >= 0")
    if not cfg.trainer.placement_timeout_s > 0:
        raise ConfigError(f"trainer.placement_timeout_s={cfg.trainer.placement_timeout_s} must be > 0")
    if cfg.trainer.max_restarts < 0:
        raise ConfigError(f"trainer.max_restarts={cfg.trainer.max_restarts} must be >= 0 (learner group restarts "
                          "from the last checkpoint per run; 0: a lost learner rank stops the run)")
    if cfg.rollout.max_engine_restarts < 0:
        raise ConfigError(f"rollout.max_engine_restarts={cfg.rollout.max_engine_restarts} must be >= 0")
    if cfg.rollout.max_new_tokens < 1:
        raise ConfigError(f"rollout.max_new_tokens={cfg.rollout.max_new_tokens} must be >= 1")
    if cfg.data.max_prompt_tokens + cfg.rollout.max_new_tokens > cfg.rollout.max_model_len:
        raise ConfigError(
            f"data.max_prompt_tokens + rollout.max_new_tokens = {cfg.data.max_prompt_tokens} + "
            f"{cfg.rollout.max_new_tokens} exceeds rollout.max_model_len={cfg.rollout.max_model_len}"
        )
    try:
        bound_cores(cfg.rollout.cpu_threads_bind)
        plan_placement(cfg.trainer.placement, cfg.learner, cfg.rollout, teacher_engines(cfg))  # a bundle asking nothing
        check_specs(cfg.reward.functions, columns=reward_column_names(cfg.data))
        check_agreement(cfg.reward)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    check_env(cfg)
    check_agent(cfg)
    names = reward_names(cfg)
    if cfg.trainer.eval_reward is not None and cfg.trainer.eval_reward not in names:
        raise ConfigError(f"trainer.eval_reward={cfg.trainer.eval_reward!r} is not one of the rewards {names}")
    check_off_policy(cfg)
    check_weight_sync(cfg)
    plan = plan_batches(cfg)
    check_settings(cfg.learner, cfg.algo, cfg.model.dtype, total_updates(cfg))
    check_lora(cfg.model.lora)
    return plan


def check_model(cfg: Config, hf_config, model: str) -> None:
    """Rules that need the model's HF config, checked once its path is known and before any engine
    or learner rank starts (train.py).

    Shared prompts and sliding-window attention: the prompt cache of a sliding layer keeps only
    the last window of the padded prompt block, so rows with shorter prompts are scored wrongly
    (rlhf/learner/packing.py). Refused unless the smallest window covers every sequence
    (rollout.max_model_len, which bounds prompt + completion), where the window never applies.
    """
    # LoRA served by the engines (model.lora.sync=adapter): vLLM's model class must support it.
    check_adapter_serving(cfg.model.lora, cfg.model.dtype, list(getattr(hf_config, "architectures", None) or []),
                          model)
    windows = sliding_windows(hf_config)
    if cfg.learner.share_prompt and windows and min(windows) < cfg.rollout.max_model_len:
        raise ConfigError(
            f"learner.share_prompt=true: {model} ({getattr(hf_config, 'model_type', '?')}) has sliding-window "
            f"attention with a {min(windows)}-token window, shorter than rollout.max_model_len="
            f"{cfg.rollout.max_model_len}; the shared-prompt cache would drop the keys of rows with shorter "
            "prompts (silently wrong log-probs). Set learner.share_prompt=false"
        )


def check_weight_sync(cfg: Config) -> None:
    """NCCL takes no two ranks of one communicator on one device. Colocated, bundle 0 holds learner
    rank 0 and engine 0; when their GPU shares add up to one GPU at most, Ray gives both the same
    one, so an nccl broadcast group cannot form. Refused here, before anything starts; connect
    checks the GPU ids the actors actually got (transport.on_rank0_device) for every other case."""
    lrn, r = cfg.learner, cfg.rollout
    shares = 0 < lrn.num_gpus_per_rank and 0 < r.num_gpus_per_engine
    if (lrn.backend == "nccl" and lrn.sync_transport == "broadcast" and cfg.trainer.placement == "colocated"
            and shares and lrn.num_gpus_per_rank + r.num_gpus_per_engine <= 1):
        raise ConfigError(
            f"learner.sync_transport=broadcast with learner.backend=nccl: trainer.placement=colocated puts "
            f"learner rank 0 (learner.num_gpus_per_rank={lrn.num_gpus_per_rank:g}) and rollout engine 0 "
            f"(rollout.num_gpus_per_engine={r.num_gpus_per_engine:g}) on one GPU, and NCCL refuses two ranks "
            "of one communicator on one device: use learner.sync_transport=auto or files (one node), or "
            "whole GPUs, or trainer.placement=separate")


def check_off_policy(cfg: Config) -> None:
    """The learner must score the distribution the engines sampled from, and a stale batch must be
    corrected (rlhf/algo/correction.py)."""
    r, algo = cfg.rollout, cfg.algo
    check_sampling(sampling_from_config(r))  # the learner is handed these very settings (train.py)
    if r.logprobs_mode not in ("processed_logprobs", "raw_logprobs"):
        raise ConfigError(
            f"rollout.logprobs_mode={r.logprobs_mode!r} is not one of ['processed_logprobs', 'raw_logprobs']"
        )
    sampled_raw = r.temperature != 1 or r.top_k != -1 or r.top_p != 1
    if r.logprobs_mode == "raw_logprobs" and sampled_raw and algo.rollout_correction != "none":
        raise ConfigError(
            f"rollout.logprobs_mode=raw_logprobs reports log-probs before temperature/top-k/top-p, so "
            f"algo.rollout_correction={algo.rollout_correction} would weigh by the wrong ratio: use "
            "processed_logprobs"
        )
    if not algo.correction_cap >= 1:
        raise ConfigError(f"algo.correction_cap={algo.correction_cap} must be >= 1")
    if not 0 <= algo.correction_low <= 1 <= algo.correction_high:
        raise ConfigError(
            f"algo.correction_low={algo.correction_low}, algo.correction_high={algo.correction_high}: "
            "need 0 <= low <= 1 <= high"
        )
    if algo.max_mismatch_kl is not None and not algo.max_mismatch_kl > 0:
        raise ConfigError(f"algo.max_mismatch_kl={algo.max_mismatch_kl} must be > 0 (or null: never checked)")
    if algo.max_mismatch_kl_steps < 1:
        raise ConfigError(f"algo.max_mismatch_kl_steps={algo.max_mismatch_kl_steps} must be >= 1 (consecutive "
                          "steps above algo.max_mismatch_kl that stop the run)")
    k = cfg.trainer.max_staleness
    if k < 0:
        raise ConfigError(f"trainer.max_staleness={k} must be >= 0")
    if k > 0 and algo.rollout_correction == "none":
        raise ConfigError(
            f"trainer.max_staleness={k} trains on batches sampled by an older policy, which "
            "algo.rollout_correction=none leaves uncorrected: choose tis, icepop, token_reject or seq_mask "
            "(e.g. rollout_correction=tis)"
        )
    if k > 0 and r.sleep_between_steps:
        raise ConfigError(
            f"trainer.max_staleness={k} generates while the learner trains, which "
            "rollout.sleep_between_steps=true (engines asleep during training) rules out"
        )


def teacher_engines(cfg: Config) -> EngineConfig | None:
    """The open teacher's engine settings when the run distils from one (algo.distill_coef > 0)."""
    return cfg.teacher.engines if cfg.algo.distill_coef > 0 else None


def has_task_reward(cfg: Config) -> bool:
    """Whether any reward is optimised: a reward function, the environment's or the agent's with a
    weight != 0."""
    env = cfg.env.name is not None and cfg.env.reward_weight != 0
    agent = agent_configured(cfg.agent) and cfg.agent.reward_weight != 0
    return env or agent or any(f.weight != 0 for f in cfg.reward.functions)


def check_distill(cfg: Config) -> None:
    """On-policy distillation needs an open teacher on our engines that can score every sequence;
    without a task reward, nothing may depend on one."""
    algo, teacher = cfg.algo, cfg.teacher
    if algo.distill_coef < 0:
        raise ConfigError(f"algo.distill_coef={algo.distill_coef} must be >= 0 (0: no teacher)")
    if not algo.distill_clamp > 0:
        raise ConfigError(f"algo.distill_clamp={algo.distill_clamp} must be > 0")
    if algo.distill_coef == 0:
        if not cfg.reward.functions:
            raise ConfigError("reward.functions is empty: configure at least one reward function, or distil "
                              "from a teacher (algo.distill_coef > 0 with +teacher=engines)")
        return
    if teacher.source != "engines":
        raise ConfigError(
            f"algo.distill_coef={algo.distill_coef} needs an open teacher on our own engines (+teacher=engines, "
            f"teacher.source=engines), not teacher.source={teacher.source!r}: an API returns no log-probs of "
            "the student's tokens")
    if not teacher.model:
        raise ConfigError("teacher.model is not set: the open teacher's built-in name, HF folder or hub id")
    if teacher.dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"teacher.dtype={teacher.dtype!r} is not one of ['float32', 'bfloat16', 'float16']")
    if teacher.engines.num_engines < 1:
        raise ConfigError(f"teacher.engines.num_engines={teacher.engines.num_engines} must be >= 1")
    if teacher.engines.max_model_len <= cfg.rollout.max_model_len:
        raise ConfigError(
            f"teacher.engines.max_model_len={teacher.engines.max_model_len} must exceed rollout.max_model_len="
            f"{cfg.rollout.max_model_len}: the teacher scores whole sequences (up to rollout.max_model_len "
            "tokens) as vLLM prompts, which leave room for one new token")
    try:
        bound_cores(teacher.engines.cpu_threads_bind)
    except ValueError as e:
        raise ConfigError(str(e).replace("rollout.", "teacher.engines.")) from None
    if has_task_reward(cfg):
        return
    if algo.dynamic_sampling:
        raise ConfigError("algo.dynamic_sampling drops groups whose rewards are all equal, and with no task reward "
                          "(every reward weight 0) every group is: turn it off for pure distillation")
    if cfg.trainer.eval_prompts > 0 and not cfg.reward.functions and cfg.env.name is None and not agent_configured(cfg.agent):
        raise ConfigError(
            f"trainer.eval_prompts={cfg.trainer.eval_prompts} needs a reward to tell right answers, and "
            "reward.functions is empty: set trainer.eval_prompts=0, or add a reward with weight 0 (evaluated "
            "and logged, not optimised)")


def reward_names(cfg: Config) -> list[str]:
    """The name each reward function has in metrics (its ``name``, else derived from ``fn``), and
    "env" for an environment's reward, "agent" for an agent's."""
    names = [f.name or default_name(f.fn) for f in cfg.reward.functions]
    return (names + ([ENV_REWARD] if cfg.env.name is not None else [])
            + ([AGENT_REWARD] if agent_configured(cfg.agent) else []))


def check_env(cfg: Config) -> None:
    """The environment resolves to a class with reset/step whose constructor takes env.kwargs,
    and its budgets can work (nothing is built or called)."""
    env = cfg.env
    if env.name is None:
        if env.max_turns != 1:
            raise ConfigError(f"env.max_turns={env.max_turns} needs an environment (env.name is null: one turn)")
        return
    try:
        load_env(env.name, dict(env.kwargs or {}))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    for key in ("max_turns", "max_tool_tokens", "num_workers"):
        if getattr(env, key) < 1:
            raise ConfigError(f"env.{key}={getattr(env, key)} must be >= 1")
    if not env.timeout_s > 0:
        raise ConfigError(f"env.timeout_s={env.timeout_s} must be > 0")
    if env.unfinished_reward is not None and not math.isfinite(env.unfinished_reward):
        raise ConfigError(f"env.unfinished_reward={env.unfinished_reward} must be a finite number or null")
    if env.max_total_tokens is not None:
        if env.max_total_tokens < cfg.rollout.max_new_tokens:
            raise ConfigError(f"env.max_total_tokens={env.max_total_tokens} is less than one turn "
                              f"(rollout.max_new_tokens={cfg.rollout.max_new_tokens})")
        if cfg.data.max_prompt_tokens + env.max_total_tokens > cfg.rollout.max_model_len:
            raise ConfigError(
                f"data.max_prompt_tokens + env.max_total_tokens = {cfg.data.max_prompt_tokens} + "
                f"{env.max_total_tokens} exceeds rollout.max_model_len={cfg.rollout.max_model_len}")
    clash = [f.name or default_name(f.fn) for f in cfg.reward.functions if (f.name or default_name(f.fn)) == ENV_REWARD]
    if clash:
        raise ConfigError(f"a reward function is named {ENV_REWARD!r}, the name of env.name={env.name!r}'s "
                          "reward: give it another `name`")


def check_agent(cfg: Config) -> None:
    """The agent resolves to a callable taking (client, row, **agent.kwargs), or its command to a
    program; its limits can work; it is the run's only source of episodes (nothing is started)."""
    agent = cfg.agent
    if not agent_configured(agent):
        return
    if agent.name is not None and agent.command is not None:
        raise ConfigError(f"agent.name={agent.name!r} and agent.command={list(agent.command)!r} are both set: an "
                          "agent is a callable or a command, not both")
    if cfg.env.name is not None:
        raise ConfigError(f"env.name={cfg.env.name!r} is set beside the agent (agent.name / agent.command): the "
                          "agent's application makes the episodes, so there is no environment turn loop; set "
                          "env=none")
    try:
        if agent.name is not None:
            load_agent(agent.name, dict(agent.kwargs or {}))
        else:
            check_command(agent.command)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if agent.command is not None and agent.kwargs:
        raise ConfigError(f"agent.kwargs {sorted(agent.kwargs)} are a callable's; agent.command gets the row on "
                          "stdin and the gateway in its environment: pass settings as its arguments")
    if agent.command is not None and agent.executor == "ray":
        raise ConfigError("agent.executor=ray runs callables as Ray tasks; agent.command runs on the driver's node "
                          "(agent.executor=threads): wrap the program in a callable to place it")
    for key in ("max_calls", "concurrency"):
        if getattr(agent, key) < 1:
            raise ConfigError(f"agent.{key}={getattr(agent, key)} must be >= 1")
    if not agent.timeout_s > 0:
        raise ConfigError(f"agent.timeout_s={agent.timeout_s} must be > 0")
    if agent.resources and agent.executor != "ray":
        raise ConfigError(f"agent.resources={dict(agent.resources)} place Ray tasks: set agent.executor=ray, or "
                          "drop them")
    if any(not (isinstance(v, (int, float)) and v > 0) for v in agent.resources.values()):
        raise ConfigError(f"agent.resources={dict(agent.resources)}: each amount must be a number > 0")
    if reserved := sorted(set(agent.resources) & {"CPU", "GPU", "memory", "object_store_memory"}):
        raise ConfigError(f"agent.resources={dict(agent.resources)}: {reserved} are Ray's own resources, not custom "
                          "ones; agent tasks ask no CPU (they wait on the gateway): name a custom resource the "
                          "agents' nodes were started with")
    if AGENT_REWARD in [f.name or default_name(f.fn) for f in cfg.reward.functions]:
        raise ConfigError(f"a reward function is named {AGENT_REWARD!r}, the name of the agent's own reward: "
                          "give it another `name`")
    if not math.isfinite(agent.reward_weight):
        raise ConfigError(f"agent.reward_weight={agent.reward_weight} must be a finite number")
    if cfg.algo.distill_coef > 0:
        # The teacher scores a completion's tokens; an episode's earlier segments are rows it never saw.
        raise ConfigError(f"algo.distill_coef={cfg.algo.distill_coef} with an agent: on-policy distillation is not "
                          "served for agent episodes (a rewritten history's earlier segments have no teacher "
                          "log-probs); set algo.distill_coef=0")


def eval_reward(cfg: Config) -> str:
    """The reward evaluation reads accuracy from: trainer.eval_reward, else the first function."""
    if not cfg.reward.functions:
        raise ConfigError("reward.functions is empty: configure at least one reward function")
    return cfg.trainer.eval_reward or reward_names(cfg)[0]
