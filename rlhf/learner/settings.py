"""Every learner setting that can be checked before a process starts or a weight loads."""

from __future__ import annotations

from rlhf.algo.objectives import OBJECTIVES
from rlhf.config import AlgoConfig, ConfigError, LearnerConfig
from rlhf.learner.ds_config import policy_config
from rlhf.learner.optim import lr_factor
from rlhf.learner.sync import TRANSPORTS
from rlhf.types import SamplingSettings


def check_settings(cfg: LearnerConfig, algo: AlgoConfig, dtype: str, total_updates: int,
                   objective: str = "grpo") -> None:
    """Raise ConfigError naming the key and value of the first setting that cannot work.

    ``total_updates``: optimizer updates of the whole run, what the learning-rate schedule counts;
    ``objective``: the learner's (``LearnerGroup(objective=...)``), a name in OBJECTIVES."""
    if objective not in OBJECTIVES:
        raise ConfigError(
            f"learner objective={objective!r} is not a registered {OBJECTIVES.kind}; known: {OBJECTIVES.names()}"
        )
    for key, value in [
        ("learner.num_ranks", cfg.num_ranks),
        ("learner.micro_batch_size", cfg.micro_batch_size),
        ("learner.num_threads", cfg.num_threads),
        ("learner.sync_bucket_mb", cfg.sync_bucket_mb),
    ]:
        if value < 1:
            raise ConfigError(f"{key}={value} must be >= 1")
    if cfg.max_tokens_per_micro_batch < 0:
        raise ConfigError(
            f"learner.max_tokens_per_micro_batch={cfg.max_tokens_per_micro_batch} must be >= 0 (0: no budget)"
        )
    if cfg.share_prompt and cfg.gradient_checkpointing:
        # transformers drops past_key_values inside checkpointed layers, so the suffix pass
        # could not see the prompt's cache.
        raise ConfigError(
            "learner.share_prompt=true needs the prompt's KV cache across passes, which "
            "learner.gradient_checkpointing=true drops; set learner.share_prompt=false with it"
        )
    if not cfg.timeout_s > 0:
        raise ConfigError(f"learner.timeout_s={cfg.timeout_s} must be > 0")
    if cfg.backend not in ("gloo", "nccl"):
        raise ConfigError(f"learner.backend={cfg.backend!r} is not one of ['gloo', 'nccl']")
    if cfg.sync_transport not in TRANSPORTS:
        raise ConfigError(f"learner.sync_transport={cfg.sync_transport!r} is not one of {list(TRANSPORTS)}")
    if cfg.backend == "nccl" and cfg.num_gpus_per_rank <= 0:
        raise ConfigError("learner.backend=nccl needs learner.num_gpus_per_rank > 0 (one GPU per rank)")
    policy_config(cfg, dtype, cfg.micro_batch_size)
    lr_factor(cfg.lr_schedule, cfg.warmup_steps, total_updates)
    if algo.loss_agg == "seq_mean_token_sum_norm" and algo.norm_length is None:
        raise ConfigError(
            "algo.loss_agg=seq_mean_token_sum_norm needs algo.norm_length (conf/algo/dr_grpo.yaml "
            "sets it to ${rollout.max_new_tokens})"
        )


def check_sampling(sampling: SamplingSettings) -> None:
    """The engines' sampling (rollout.*), which the learner scores: log-probs of logits / temperature,
    truncated to top-k / top-p. Raise ConfigError naming the rollout key that cannot be scored."""
    if not sampling.temperature > 0:
        raise ConfigError(f"rollout.temperature={sampling.temperature} must be > 0: the learner scores "
                          "log-probs of logits / temperature")
    if not (sampling.top_k == -1 or sampling.top_k >= 1):
        raise ConfigError(f"rollout.top_k={sampling.top_k} must be -1 (off) or >= 1")
    if not 0 < sampling.top_p <= 1:
        raise ConfigError(f"rollout.top_p={sampling.top_p} must be in (0, 1]")
