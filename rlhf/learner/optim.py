"""Optimizer parameter groups and the learning-rate schedule (warm-up, then constant or cosine).

Shared by the DeepSpeed ranks and by the plain-torch baselines in tests and benchmarks, so both
sides of a comparison build the very same optimizer.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from rlhf.config import ConfigError, LearnerConfig

SCHEDULES = ("constant", "cosine")


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Matrices decay; vectors (norm scales, biases) do not, as is usual for transformers."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


class CheckedAdamW(torch.optim.AdamW):
    """torch AdamW that clips by the global gradient norm and skips an update whose gradients are
    not finite, as DeepSpeed's ZeRO and mixed-precision optimizers do.

    For DeepSpeed without ZeRO in fp32 (``ds_config.zero_stage``), which steps a plain torch
    optimizer as it is: it would apply a NaN gradient, and it clips without keeping the norm.
    DeepSpeed reads ``overflow`` (the update was skipped: no LR-scheduler step, ``skipped_steps``
    counts it) and ``_global_grad_norm`` (``engine.get_global_grad_norm()``) after ``step``.
    """

    def __init__(self, params, max_norm: float, **kwargs) -> None:
        super().__init__(params, **kwargs)
        self.max_norm = max_norm
        self.overflow = False
        self._global_grad_norm: torch.Tensor | None = None

    @torch.no_grad()
    def step(self, closure=None):
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        norm = torch.nn.utils.get_total_norm([p.grad for p in params]) if params else torch.zeros(())
        self._global_grad_norm = norm
        self.overflow = not bool(torch.isfinite(norm))
        if self.overflow:
            return None  # DeepSpeed zeroes the gradients after step either way
        if self.max_norm > 0:
            torch.nn.utils.clip_grads_with_norm_(params, self.max_norm, norm)  # reads each p.grad
        return super().step(closure)


def build_adamw(model: torch.nn.Module, cfg: LearnerConfig, fused: bool = False,
                checked: bool = False) -> torch.optim.Optimizer:
    """torch AdamW; with ``learner.offload_optimizer``, DeepSpeed's CPU AdamW (the same update rule),
    which ZeRO-Offload requires and which DeepSpeed compiles on first use (~3 min on 2 cores).
    ``checked``: ``CheckedAdamW``, clipping at ``learner.grad_clip`` itself (no ZeRO, fp32)."""
    if cfg.lr <= 0:
        raise ConfigError(f"learner.lr={cfg.lr} must be > 0")
    if len(cfg.betas) != 2:
        raise ConfigError(f"learner.betas={list(cfg.betas)} must hold two numbers")
    groups = param_groups(model, cfg.weight_decay)
    betas = (float(cfg.betas[0]), float(cfg.betas[1]))
    if cfg.offload_optimizer:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=cfg.lr, betas=betas, eps=cfg.adam_eps, adamw_mode=True)
    if checked:
        return CheckedAdamW(groups, cfg.grad_clip, lr=cfg.lr, betas=betas, eps=cfg.adam_eps, fused=fused or None)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=betas, eps=cfg.adam_eps, fused=fused or None)


def lr_factor(schedule: str, warmup_steps: int, total_updates: int) -> Callable[[int], float]:
    """Multiplier of the base learning rate for the update that follows ``step`` applied updates.

    Warm-up rises linearly: update k (0-based) of W warm-up updates uses (k + 1) / W. Cosine then
    decays from 1 to 0 over the remaining ``total_updates - warmup_steps`` updates.
    """
    if schedule not in SCHEDULES:
        raise ConfigError(f"learner.lr_schedule={schedule!r} is not one of {list(SCHEDULES)}")
    if warmup_steps < 0:
        raise ConfigError(f"learner.warmup_steps={warmup_steps} must be >= 0")
    if schedule == "cosine" and total_updates <= warmup_steps:
        raise ConfigError(
            f"learner.lr_schedule=cosine needs total optimizer updates ({total_updates}) > learner.warmup_steps "
            f"({warmup_steps})"
        )

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / (total_updates - warmup_steps))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor
