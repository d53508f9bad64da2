"""A simulated multi-node Ray cluster on this machine (``ray.cluster_utils.Cluster``), on loopback.

``sim_cluster(nodes)`` starts a head (no CPUs by default, so actors land on the worker nodes)
plus one raylet per entry of ``nodes`` (keyword arguments of ``Cluster.add_node``: ``num_cpus``,
``resources={"node_a": 1}``, ...), every node registered at 127.0.0.1 (PLATFORM.md: with
RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 set before Ray is imported, nothing listens beyond loopback),
connects this process to it and shuts it all down afterwards.

The test session already runs one Ray (the ``ray_session`` fixture) and a process can join only
one, so tests run their body in a fresh process: ``run_scenario(name)`` runs
``python -m tests.support.sim_cluster_scenarios <name>`` and returns the JSON the scenario printed.
Add a scenario there with ``@scenario("name")``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parents[2]
RESULT = "SCENARIO-RESULT "  # the line prefix run_scenario looks for


@contextmanager
def sim_cluster(nodes: list[dict], head: dict | None = None) -> Iterator:
    """Yields the ``Cluster`` with this process connected (``ray.init(address=cluster.address)``)."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # before Ray is imported: loopback only
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        raise RuntimeError("sim_cluster: this process already runs Ray; use run_scenario from a test")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False,
                                                            **(head or {}), "node_ip_address": "127.0.0.1"})
    try:
        for n in nodes:
            cluster.add_node(**{**n, "node_ip_address": "127.0.0.1"})
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def run_scenario(name: str, timeout_s: float = 600) -> dict:
    """Run scenario ``name`` in a fresh process; its JSON result, or AssertionError with its output."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-m", "tests.support.sim_cluster_scenarios", name], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout_s)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT)]
    if proc.returncode != 0 or not lines:
        raise AssertionError(f"scenario {name} exited {proc.returncode}:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return json.loads(lines[-1][len(RESULT):])
