"""Shared fixtures: one Ray cluster per test session, model paths, shared engines."""

from __future__ import annotations

import os

import pytest

# Tests never reach a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model_path() -> str:
    from rlhf.models import TINY, resolve_model_path

    return resolve_model_path(TINY)


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    from rlhf.models import SMOLLM2, resolve_model_path

    return resolve_model_path(SMOLLM2)


@pytest.fixture(scope="session")
def ray_session():
    """Start Ray once for the whole test session (loopback, 2 CPUs of bookkeeping)."""
    import ray

    from rlhf.cluster import init_ray

    init_ray(num_cpus=max(4, os.cpu_count() or 2))
    yield ray
    ray.shutdown()
