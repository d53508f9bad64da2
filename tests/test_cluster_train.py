"""The training loop end to end on a simulated 3-node Ray cluster (tests/support/sim_cluster.py),
trainer.placement=separate: learner ranks and the engine on different nodes, weights by broadcast.
The scenario runs in a fresh process (the session's own Ray is already joined here)."""

from __future__ import annotations

import pytest

from support.sim_cluster import run_scenario


@pytest.fixture(scope="module")
def got():
    return run_scenario("train_separate_three_nodes", timeout_s=900)


def test_ranks_and_engine_run_on_three_different_nodes(got):
    # 2-CPU ranks fill the two 2-CPU nodes (one each); the 1-CPU engine has only the third node left.
    ranks = [n["node_id"] for n in got["placement"]["learner_ranks"]]
    engines = [n["node_id"] for n in got["placement"]["engines"]]
    assert got["placement"]["placement"] == "separate"
    assert len(set(ranks)) == 2 and len(engines) == 1 and engines[0] not in ranks


def test_files_across_nodes_is_refused_by_name_before_any_step(got):
    assert got["files_error"] is not None
    assert "learner.sync_transport=files" in got["files_error"] and "rollout engine 0" in got["files_error"]
    # Refused before the loop: no step was logged and no checkpoint written.
    assert not got["files_run_metrics"] and not got["files_run_checkpoints"]


def test_weights_reach_the_engine_by_broadcast_and_the_probe_agrees(got):
    # auto resolves to broadcast when an engine is away from rank 0: nothing was written under sync_dir.
    assert got["placement"]["weight_transport"] == "broadcast"
    assert got["sync_dir_after"] == []
    assert got["transport_metric"] == [1.0, 1.0, 1.0]
    assert all(0 <= g <= got["probe_tolerance"] for g in got["probe_gaps"])


def test_checkpoint_covers_every_rank_export_is_written_and_the_run_resumes(got):
    assert got["complete"] and got["export"]
    assert got["manifest_ranks"] == [0, 1]
    # Steps 1-2, then the resumed run's step 3 (its first sync after loading step-2 is not a step).
    assert got["steps"] == [1, 2, 3]
