"""A lost engine on a simulated 3-node cluster (tests/support/sim_cluster.py): its whole node (the
raylet) removed mid-run, with and without another node to take it (docs/reliability.md, point 3)."""

from __future__ import annotations

import pytest

from support.sim_cluster import run_scenario

pytestmark = pytest.mark.slow  # three runs on a 3-raylet cluster, ~5 min on 2 cores: past the CI budget's share


@pytest.fixture(scope="module")
def got():
    return run_scenario("engine_nodes_removed", timeout_s=1500)


def test_an_engine_whose_node_is_removed_comes_back_on_the_other_node(got):
    assert got["moved_error"] is None
    assert got["moved_removed"] is not None and got["moved_engine_node_after"] != got["moved_removed"]
    assert [got["moved_steps"][s]["faults/engine_restarts"] for s in ("1", "2", "3")] == [0.0, 1.0, 1.0]


def test_the_run_that_lost_a_node_equals_the_uninterrupted_one(got):
    a, b = got["straight_steps"], got["moved_steps"]
    assert sorted(a) == sorted(b) == ["1", "2", "3"]
    for step in a:
        for key in ("loss", "reward/mean", "grad_norm", "response_length/mean"):
            assert a[step][key] == b[step][key], (step, key)
    assert got["params_equal"]


def test_with_no_node_left_to_take_it_the_run_stops_naming_the_engine(got):
    assert got["stuck_removed"] is not None
    assert "rollout engine 0 died during generate" in got["stuck_error"]
    assert "no node has room for it" in got["stuck_error"]
    assert got["stuck_complete"] == [1]  # step 1's checkpoint, written before the loss, is intact
