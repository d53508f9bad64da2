"""One small engine group on a model folder, as the tests that need real vLLM sampling start it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from rlhf.config import RolloutConfig
from rollouts.group import EngineGroup


@contextlib.contextmanager
def one_engine(model_path: str, max_model_len: int = 256, dtype: str = "float32") -> Iterator[EngineGroup]:
    """One engine with a 0.25 GiB KV cache, shut down on exit."""
    group = EngineGroup(RolloutConfig(num_engines=1, max_model_len=max_model_len, kv_cache_gb=0.25, timeout_s=600.0),
                        model_path, dtype=dtype)
    try:
        yield group
    finally:
        group.shutdown()
