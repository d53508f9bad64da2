"""Placement and rendezvous on a simulated 2-node Ray cluster (tests/support/sim_cluster.py), each
scenario in a fresh process because the session's own Ray (ray_session) is already joined here."""

from __future__ import annotations

from support.sim_cluster import run_scenario


def test_separate_ranks_land_on_their_bundles_nodes_and_rendezvous_across_nodes():
    got = run_scenario("learner_separate_two_nodes")
    # Each rank runs on the node its bundle was reserved on ...
    assert got["rank_nodes"] == got["learner_bundle_nodes"]
    # ... and with 3-CPU nodes and 2-CPU ranks (2 + 2 > 3), those are two different nodes: rank 1 reached
    # rank 0's store on another node, and the group trained (a finite loss from both ranks).
    assert len(set(got["rank_nodes"])) == 2
    assert got["loss"] == got["loss"]  # not NaN
    # The engines' bundle was reserved as a group of its own (1 CPU, in the 1 CPU left on either node).
    assert len(got["engine_bundle_nodes"]) == 1 and got["engine_bundle_nodes"][0] in got["rank_nodes"]
    # The store listened on rank 0's node address only (127.0.0.1 here), not on every interface.
    assert got["rendezvous"][0] == "127.0.0.1"
    assert got["listeners"] == ["127.0.0.1"]


def test_an_unsatisfiable_placement_fails_at_once_naming_the_resources():
    # 4 ranks x 1 CPU + 0.5 for the engine = 4.5 CPUs asked of 2. reserve() had 600 s to wait, and
    # the scenario returned at all: it failed before waiting (the subprocess itself has 600 s).
    got = run_scenario("unsatisfiable")
    assert got["error"] == "PlacementError"
    assert "CPU: asked 4.5, cluster total 2, available now 2" in got["message"]
