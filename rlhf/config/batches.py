"""Batch arithmetic: prompts, samples, mini-batches, ranks and micro-batches, derived once."""

from __future__ import annotations

from dataclasses import dataclass

from rlhf.config.schema import Config, ConfigError


@dataclass(frozen=True)
class BatchPlan:
    """Batch arithmetic derived once from the config."""

    prompts_per_step: int
    samples_per_prompt: int
    samples_per_step: int
    mini_batches_per_step: int
    samples_per_mini_batch: int
    num_ranks: int
    samples_per_rank: int  # per mini-batch
    micro_batch_size: int
    grad_accum_steps: int  # micro-batches per rank per mini-batch


def plan_batches(cfg: Config) -> BatchPlan:
    """Check the batch arithmetic and derive the sizes; errors name the keys and values."""
    P = cfg.trainer.prompts_per_step
    n = cfg.rollout.n
    M = cfg.algo.mini_batches_per_step
    R = cfg.learner.num_ranks
    mb = cfg.learner.micro_batch_size
    for key, value in [
        ("trainer.prompts_per_step", P),
        ("rollout.n", n),
        ("algo.mini_batches_per_step", M),
        ("learner.num_ranks", R),
        ("learner.micro_batch_size", mb),
        ("algo.epochs_per_step", cfg.algo.epochs_per_step),
    ]:
        if value < 1:
            raise ConfigError(f"{key}={value} must be >= 1")
    total = P * n
    if total % M:
        raise ConfigError(
            f"trainer.prompts_per_step * rollout.n = {P} * {n} = {total} samples is not divisible by "
            f"algo.mini_batches_per_step={M}"
        )
    per_mini = total // M
    if per_mini % R:
        raise ConfigError(
            f"{per_mini} samples per mini-batch (trainer.prompts_per_step * rollout.n / "
            f"algo.mini_batches_per_step) is not divisible by learner.num_ranks={R}"
        )
    per_rank = per_mini // R
    if per_rank % mb and mb < per_rank:
        raise ConfigError(
            f"{per_rank} samples per rank per mini-batch is not divisible by "
            f"learner.micro_batch_size={mb}"
        )
    mb_eff = min(mb, per_rank)
    return BatchPlan(
        prompts_per_step=P,
        samples_per_prompt=n,
        samples_per_step=total,
        mini_batches_per_step=M,
        samples_per_mini_batch=per_mini,
        num_ranks=R,
        samples_per_rank=per_rank,
        micro_batch_size=mb_eff,
        grad_accum_steps=per_rank // mb_eff,
    )


def total_updates(cfg: Config) -> int:
    """Optimizer updates of a GRPO run: what the learning-rate schedule counts."""
    return cfg.trainer.steps * cfg.algo.mini_batches_per_step * cfg.algo.epochs_per_step
