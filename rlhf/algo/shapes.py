"""Shape checks whose errors name the offending argument."""

from __future__ import annotations

import torch


def expect_shape(name: str, t: torch.Tensor, shape: tuple[int, ...]) -> None:
    """Raise ValueError naming ``name`` unless ``t`` has exactly ``shape``."""
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(shape)}")


def expect_dim(name: str, t: torch.Tensor, ndim: int, what: str) -> None:
    """Raise ValueError naming ``name`` unless ``t`` has ``ndim`` dims; ``what`` reads "[B, L]"."""
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {what}, got shape {tuple(t.shape)}")
