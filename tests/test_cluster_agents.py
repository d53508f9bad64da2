"""Agents as Ray tasks on a node of their own, the engine on another (tests/support/sim_cluster.py):
they reach the gateway at the driver's node address, and a step trains on their episodes."""

from __future__ import annotations

import math

import pytest

from support.sim_cluster import run_scenario


@pytest.mark.slow  # about 60 s on 2 cores (a 3-raylet cluster, one step): past the CI budget's share
def test_agents_run_on_their_node_and_reach_the_gateway_across_nodes():
    got = run_scenario("agents_on_their_own_node", timeout_s=900)
    # Every one of the step's 4 prompts x 4 episodes ran on the node with the `agents` resource, which
    # has no CPU for the learner rank or the engine: those share the other node.
    assert got["agent_episodes"] == 16 and got["agent_task_nodes"] == got["agents_node"]
    assert got["engine_nodes"] == got["rank_nodes"] and got["engine_nodes"][0] not in got["agents_node"]
    m = got["metrics"]
    # Two calls each, through the gateway, none failed.
    assert m["agent/calls_mean"] == 2.0 and m["gateway/requests"] == 32.0
    assert m["agent/errors"] == m["agent/timeouts"] == m["agent/no_calls"] == 0.0
    assert math.isfinite(m["loss"])
