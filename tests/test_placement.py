"""Placement-group arithmetic and the asked-vs-available check (rlhf/cluster/placement.py), pure functions."""

from __future__ import annotations

import pytest

from rlhf.cluster.placement import Bundle, NodeResources, PlacementError, check_fits, first_fit, plan_placement
from rlhf.config import LearnerConfig, RolloutConfig


def node(name: str, cpu: float, gpu: float = 0.0, free_cpu: float | None = None) -> NodeResources:
    return NodeResources(name * 4, "127.0.0.1", {"CPU": cpu, "GPU": gpu},
                         {"CPU": cpu if free_cpu is None else free_cpu, "GPU": gpu})


def test_colocated_bundle_i_holds_rank_i_and_engine_i():
    # 2 ranks of 0.5 CPU, 1 engine of 0.5 CPU: bundle 0 = 0.5 + 0.5 = 1.0, bundle 1 = the rank alone.
    plan = plan_placement("colocated", LearnerConfig(num_ranks=2, num_cpus_per_rank=0.5),
                          RolloutConfig(num_engines=1, num_cpus_per_engine=0.5))
    (group,) = plan.groups
    assert group.bundles == (Bundle(1.0, 0.0), Bundle(0.5, 0.0))
    assert [s.bundle for s in plan.ranks] == [0, 1] and [s.bundle for s in plan.engines] == [0]
    assert plan.totals() == {"CPU": 1.5, "GPU": 0.0}


def test_separate_gives_each_rank_and_engine_its_own_bundle():
    # gpu_zero3 + vllm_gpu style: ranks {CPU 2, GPU 1} x 4, engines {CPU 1, GPU 2} x 2 (tp=2:
    # num_gpus_per_engine is the engine's total). Totals: CPU 4*2 + 2*1 = 10, GPU 4*1 + 2*2 = 8.
    plan = plan_placement("separate", LearnerConfig(num_ranks=4, num_cpus_per_rank=2, num_gpus_per_rank=1),
                          RolloutConfig(num_engines=2, num_cpus_per_engine=1, num_gpus_per_engine=2,
                                        tensor_parallel_size=2))
    learner, engines = plan.groups
    assert (learner.name, learner.bundles) == ("learner", (Bundle(2, 1),) * 4)
    assert (engines.name, engines.bundles) == ("engines", (Bundle(1, 2),) * 2)
    assert plan.totals() == {"CPU": 10, "GPU": 8}
    assert learner.bundles[0].resources() == {"CPU": 2, "GPU": 1}


def test_a_bundle_asking_nothing_is_refused_by_name():
    with pytest.raises(PlacementError, match="learner bundle 0 asks for nothing"):
        plan_placement("separate", LearnerConfig(num_cpus_per_rank=0), RolloutConfig())


def test_more_cpu_than_the_cluster_has_names_asked_and_total():
    # 4 ranks x 1 CPU = 4 asked (+ the engine's 0.5 = 4.5); two nodes of 1 CPU = 2 in the cluster.
    plan = plan_placement("separate", LearnerConfig(num_ranks=4, num_cpus_per_rank=1), RolloutConfig(num_engines=1))
    with pytest.raises(PlacementError) as e:
        check_fits(plan, [node("a", 1), node("b", 1)])
    assert "more CPU than the Ray cluster has" in str(e.value)
    assert "CPU: asked 4.5, cluster total 2, available now 2" in str(e.value)
    assert "node 127.0.0.1 (aaaa)" in str(e.value)


def test_a_bundle_larger_than_every_node_is_refused_even_when_the_total_fits():
    # One rank of 2 CPUs; the cluster has 1.5 + 1.5 = 3 CPUs, but no single node has 2.
    plan = plan_placement("separate", LearnerConfig(num_ranks=1, num_cpus_per_rank=2),
                          RolloutConfig(num_engines=1, num_cpus_per_engine=0.5))
    with pytest.raises(PlacementError, match=r"learner bundle 0 \(\{'CPU': 2\}\) is larger than every node"):
        check_fits(plan, [node("a", 1.5), node("b", 1.5)])


def test_fractional_sums_that_exactly_fill_the_cluster_fit():
    # 0.1 * 3 is 0.30000000000000004 in floats; a 0.3-CPU node must still hold it.
    plan = plan_placement("colocated", LearnerConfig(num_ranks=1, num_cpus_per_rank=0.1),
                          RolloutConfig(num_engines=1, num_cpus_per_engine=0.2))
    check_fits(plan, [node("a", 0.3)])


def test_first_fit_packs_ranks_and_spills_to_the_next_node():
    # Nodes of 1.5 CPU; ranks of 1 CPU: rank 0 on a (0.5 left), rank 1 does not fit there -> b.
    # The engine (0.5) then fits the first node with room: a.
    plan = plan_placement("separate", LearnerConfig(num_ranks=2, num_cpus_per_rank=1),
                          RolloutConfig(num_engines=1, num_cpus_per_engine=0.5))
    assert first_fit(plan, [node("a", 1.5), node("b", 1.5)]) == {
        ("learner", 0): 0, ("learner", 1): 1, ("engines", 0): 0}


def test_first_fit_uses_what_is_free_not_the_totals():
    # Node a has 2 CPUs but only 0.5 free: the 1-CPU rank must go to b.
    plan = plan_placement("separate", LearnerConfig(num_ranks=1, num_cpus_per_rank=1),
                          RolloutConfig(num_engines=1, num_cpus_per_engine=0.5))
    assert first_fit(plan, [node("a", 2, free_cpu=0.5), node("b", 2)]) == {("learner", 0): 1, ("engines", 0): 0}
    assert first_fit(plan, [node("a", 2, free_cpu=0.5)]) is None


def test_plan_lists_bundles_and_totals_and_with_nodes_where_they_fit():
    from rlhf.plan import placement_lines

    plan = plan_placement("separate", LearnerConfig(num_ranks=2, num_cpus_per_rank=1),
                          RolloutConfig(num_engines=1, num_cpus_per_engine=0.5))
    alone = placement_lines(plan, None)
    assert alone[:3] == ["  placement group learner (PACK): [0] CPU 1; [1] CPU 1",
                         "  placement group engines (PACK): [0] CPU 0.5",
                         "  asked in all: CPU 2.5, GPU 0"]
    assert "no Ray cluster reachable" in alone[3]
    # Same fit as test_first_fit_packs_ranks_and_spills_to_the_next_node: a holds rank 0 and the engine.
    on = placement_lines(plan, [node("a", 1.5), node("b", 1.5)])
    assert on[3:] == ["  node 127.0.0.1 (aaaa, free CPU 1.5 GPU 0): learner[0], engines[0]",
                      "  node 127.0.0.1 (bbbb, free CPU 1.5 GPU 0): learner[1]"]


def test_the_rendezvous_listener_is_bound_to_its_address_only_and_holds_its_port():
    import socket

    from rlhf.learner.rendezvous import open_listener

    sock = open_listener("127.0.0.1")
    try:
        host, port = sock.getsockname()
        assert host == "127.0.0.1" and port > 0
        # The port stays ours until the store takes the socket: a second bind to it fails.
        with pytest.raises(OSError, match="cannot listen on 127.0.0.1"):
            open_listener("127.0.0.1", port).close()
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass  # and it accepts connections on that address
    finally:
        sock.close()


def test_validation_refuses_a_bundle_asking_nothing_and_a_non_positive_timeout():
    from rlhf.config import Config, ConfigError
    from rlhf.validation import validate

    cfg = Config()
    cfg.trainer.placement_timeout_s = 0
    with pytest.raises(ConfigError, match="trainer.placement_timeout_s=0 must be > 0"):
        validate(cfg)
    cfg = Config()
    cfg.learner.num_cpus_per_rank = cfg.rollout.num_cpus_per_engine = 0  # colocated bundle 0: 0 + 0
    with pytest.raises(ConfigError, match="colocated bundle 0 asks for nothing"):
        validate(cfg)
