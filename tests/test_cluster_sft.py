"""SFT (python -m rlhf.distill.sft) on a simulated 2-node Ray cluster (tests/support/sim_cluster.py):
its two learner ranks on different nodes, once with a run folder both nodes see, once with one
only the driver sees, which the start-up storage check (rlhf/cluster/startup.py) must refuse by
name before any update, as it refuses a training run. The scenario runs in a fresh process (the
session's own Ray is already joined here)."""

from __future__ import annotations

import re

import pytest

from support.sim_cluster import run_scenario


@pytest.fixture(scope="module")
def got():
    return run_scenario("sft_two_nodes", timeout_s=600)


def test_sft_across_two_nodes_with_shared_storage_trains_saves_and_exports(got):
    # 8 answers, sft.batch_size=4, 1 epoch: 8 // 4 = 2 updates; the final checkpoint is step 2.
    assert got["steps"] == [1, 2]
    assert got["rank_logs"] == ["learner-rank-0.log", "learner-rank-1.log"]
    assert got["manifest_ranks"] == [0, 1]  # both ranks' shards, each checked where the driver sees it
    assert got["export"]


def test_a_run_folder_a_node_cannot_see_is_refused_naming_each_rank_and_its_node(got):
    error = got["private_error"]
    assert error is not None, "SFT ran with a run folder the ranks' nodes cannot see"
    marker = f"{got['private_path']}/.storage-check"
    named = re.findall(r"learner rank (\d) on node 127\.0\.0\.1 \(host [^,]+, node id (\w+)\) "
                       r"cannot read trainer\.output_dir file (\S+)", error)
    # Both ranks, on two different nodes (1 CPU each, the head has none), each unable to read the marker.
    assert sorted(r for r, _, _ in named) == ["0", "1"], error
    assert len({node for _, node, _ in named}) == 2, error
    assert {path for _, _, path in named} == {marker}, error
    assert "storage every node mounts at the same absolute path" in error
    # Refused before the first update: the driver's folder has no metrics, checkpoint or export,
    # and nothing was written into the folder the ranks see under that path.
    assert not {"metrics.jsonl", "checkpoints", "export"} & set(got["private_seen_by_driver"])
    assert not got["private_made_in_ranks_folder"]
