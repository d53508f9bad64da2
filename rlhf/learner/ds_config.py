"""DeepSpeed configuration dictionaries built from ``LearnerConfig``.

One function per engine: the trainable policy and the frozen reference model. Both are plain
dicts handed to ``deepspeed.initialize``; nothing here touches torch.distributed.
"""

from __future__ import annotations

from typing import Any

from rlhf.config import ConfigError, LearnerConfig

DTYPES = ("float32", "bfloat16", "float16")


def _check(cfg: LearnerConfig, dtype: str) -> None:
    if cfg.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"learner.zero_stage={cfg.zero_stage} is not one of [0, 1, 2, 3]")
    if cfg.offload_params and cfg.zero_stage != 3:
        raise ConfigError(
            f"learner.offload_params=true needs learner.zero_stage=3 (got {cfg.zero_stage}): "
            "only stage 3 partitions (and so can offload) parameters"
        )
    if dtype not in DTYPES:
        raise ConfigError(f"model.dtype={dtype!r} is not one of {list(DTYPES)}")
    if dtype == "float16":
        raise ConfigError("model.dtype=float16 is not supported by the learner (use bfloat16 or float32)")


def zero_stage(cfg: LearnerConfig, dtype: str) -> int:
    """The ZeRO stage the policy engine runs: ``learner.zero_stage``, except 0 for ZeRO-1/2 on one
    rank in fp32 without optimizer offload.

    One rank has nothing to partition over, and ZeRO-1/2 still copy every gradient into flat
    buffers and step a second, flat fp32 copy of the weights: +65% wall time over a bare torch loop
    at SmolLM2-135M on 2 Xeon cores, against +9% without ZeRO (scripts/bench_learner.py). bf16 keeps
    the requested stage: without ZeRO it would go through DeepSpeed's BF16_Optimizer, a path the CPU
    tests here cannot cover. Stage 3 is kept: one rank may want it for parameter offload.
    """
    if cfg.num_ranks == 1 and cfg.zero_stage in (1, 2) and dtype == "float32" and not cfg.offload_optimizer:
        return 0
    return cfg.zero_stage


def policy_config(cfg: LearnerConfig, dtype: str, micro_batch_size: int) -> dict[str, Any]:
    """The training engine's config.

    Gradient accumulation is driven by the learner (it marks the accumulation boundary itself and
    calls ``backward(scale_wrt_gas=False)``), so DeepSpeed's own ``gradient_accumulation_steps`` is 1.
    Without ZeRO in fp32 the optimizer (``optim.CheckedAdamW``) clips, so that it can also keep the
    norm and skip a non-finite update; DeepSpeed's own clipping is then off.
    """
    _check(cfg, dtype)
    stage = zero_stage(cfg, dtype)
    zero: dict[str, Any] = {"stage": stage}
    if stage in (1, 2):
        # Gloo has no reduce-scatter fast path worth overlapping on CPU; contiguous grads keep memory flat.
        zero.update({"overlap_comm": False, "contiguous_gradients": True, "reduce_scatter": True})
    if stage == 3:
        zero.update(
            {
                "overlap_comm": False,
                "contiguous_gradients": True,
                # Gather whole layers at once: tiny models would otherwise prefetch nothing useful.
                "stage3_prefetch_bucket_size": cfg.zero3_prefetch_bucket_size,
                "stage3_param_persistence_threshold": cfg.zero3_param_persistence_threshold,
            }
        )
    if cfg.offload_optimizer and stage >= 1:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": cfg.pin_memory}
    if cfg.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": cfg.pin_memory}
    out: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0 if optimizer_clips(cfg, dtype) else cfg.grad_clip,
        "zero_optimization": zero,
        # A plain torch AdamW is not on DeepSpeed's tested list for ZeRO but works: tests/test_learner.py
        # matches ZeRO-2 and ZeRO-3 updates against torch's own AdamW step.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if dtype == "bfloat16":
        # check_grad_overflow: a non-finite gradient skips the step in bf16 too (fp32 always checks).
        out["bf16"] = {"enabled": True, "check_grad_overflow": True}
    return out


def optimizer_clips(cfg: LearnerConfig, dtype: str) -> bool:
    """No ZeRO in fp32: the torch optimizer runs as it is, so it must clip and skip itself."""
    return zero_stage(cfg, dtype) == 0 and dtype == "float32"


def reference_config(cfg: LearnerConfig, dtype: str, micro_batch_size: int) -> dict[str, Any]:
    """The frozen reference model's config: stage 3 (sharded, optionally offloaded) when the policy
    is stage 3, otherwise stage 0 (a full copy per rank, as ZeRO-1/2 keep full parameters too)."""
    _check(cfg, dtype)
    zero: dict[str, Any] = {"stage": 3 if cfg.zero_stage == 3 else 0}
    if cfg.zero_stage == 3:
        zero["stage3_param_persistence_threshold"] = cfg.zero3_param_persistence_threshold
        if cfg.offload_params:
            zero["offload_param"] = {"device": "cpu", "pin_memory": cfg.pin_memory}
    out: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": 1,
        "zero_optimization": zero,
        "steps_per_print": 10**9,
    }
    if dtype == "bfloat16":
        out["bf16"] = {"enabled": True}
    return out
