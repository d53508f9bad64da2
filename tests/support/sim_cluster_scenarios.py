"""Scenarios on a simulated multi-node cluster, one per fresh process:
``python -m tests.support.sim_cluster_scenarios <name>`` prints ``SCENARIO-RESULT <json>``.

A scenario is a function returning a JSON-able dict, registered with ``@scenario("name")``; it
starts its own cluster with ``sim_cluster``. Tests call ``run_scenario(name)`` and assert on the dict.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tests.support.sim_cluster import RESULT, sim_cluster  # noqa: E402

SCENARIOS: dict[str, Callable[[], dict]] = {}


def scenario(name: str):
    def register(fn: Callable[[], dict]) -> Callable[[], dict]:
        SCENARIOS[name] = fn
        return fn
    return register


def _listening_on(port: int) -> list[str]:
    """Addresses with a TCP listener on ``port`` (any process of this machine)."""
    import psutil

    return sorted({c.laddr.ip for c in psutil.net_connections(kind="tcp")
                   if c.status == psutil.CONN_LISTEN and c.laddr.port == port})


@scenario("learner_separate_two_nodes")
def learner_separate_two_nodes() -> dict:
    """2 ZeRO-3 ranks (2 CPUs each) on two worker nodes of 3 CPUs (Ray takes whole node CPUs):
    PACK cannot put both on one node, so rank 1 is on another node than rank 0 and must dial rank 0's node to rendezvous. An
    engine-sized group (1 CPU) is reserved beside them (placement=separate); the group trains one step."""
    from rlhf.config import AlgoConfig, LearnerConfig, RolloutConfig
    from rlhf.learner import LearnerGroup
    from rlhf.models import TINY, resolve_model_path
    from rlhf.placement import plan_placement, reserve
    from tests.test_learner import make_batch

    with sim_cluster([{"num_cpus": 3, "resources": {"node_a": 1}},
                      {"num_cpus": 3, "resources": {"node_b": 1}}]):
        cfg = LearnerConfig(num_ranks=2, zero_stage=3, num_cpus_per_rank=2, num_threads=1, micro_batch_size=4,
                            lr=1e-3, timeout_s=300.0)
        plan = plan_placement("separate", cfg, RolloutConfig(num_engines=1, num_cpus_per_engine=1))
        placement = reserve(plan, timeout_s=60)
        try:
            group = LearnerGroup(cfg, AlgoConfig(), resolve_model_path(TINY), "float32", False, total_steps=10,
                                 placement=placement.learner)
            try:
                nodes = group._call("node", "node")
                listeners = _listening_on(group.rendezvous.port)
                metrics = group.train_step(make_batch(0))
            finally:
                group.shutdown()
            return {"rank_nodes": [n.node_id for n in nodes],
                    "learner_bundle_nodes": placement.bundle_nodes("learner"),
                    "engine_bundle_nodes": placement.bundle_nodes("engines"),
                    "rendezvous": [group.rendezvous.addr, group.rendezvous.port],
                    "listeners": listeners, "loss": metrics["loss"]}
        finally:
            placement.remove()


@scenario("unsatisfiable")
def unsatisfiable() -> dict:
    """4 ranks x 1 CPU on a cluster of 2 CPUs, with a placement timeout of 600 s: must raise at once."""
    from rlhf.config import LearnerConfig, RolloutConfig
    from rlhf.placement import PlacementError, plan_placement, reserve

    with sim_cluster([{"num_cpus": 1}, {"num_cpus": 1}]):
        plan = plan_placement("separate", LearnerConfig(num_ranks=4, num_cpus_per_rank=1),
                              RolloutConfig(num_engines=1, num_cpus_per_engine=0.5))
        try:
            reserve(plan, timeout_s=600)
        except PlacementError as e:
            return {"error": type(e).__name__, "message": str(e)}
        return {"error": None}


if __name__ == "__main__":
    result = SCENARIOS[sys.argv[1]]()
    print(RESULT + json.dumps(result), flush=True)
