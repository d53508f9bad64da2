"""Where the learner ranks and the rollout engines run: Ray placement groups, checked before use.

``trainer.placement`` picks one of two layouts (``plan_placement``):

- ``colocated``: ONE placement group; bundle i holds learner rank i and engine i (whichever
  exist), so a rank and an engine share a node and take turns (the engines sleep while the
  learner steps). Each bundle is the sum of what its actors ask, and the actors keep asking
  exactly what they asked before placement groups existed (fractional CPUs, PLATFORM.md: Ray's
  CPU counts are bookkeeping, not pinning), so on one machine the same actors get the same
  resources: today's single-machine run, now through a placement group. We use a placement group
  there too rather than none, so that one code path serves one node and many.
- ``separate``: two placement groups, ``learner`` (one bundle per rank) and ``engines`` (one per
  engine, holding all of its tensor-parallel GPUs: ``rollout.num_gpus_per_engine`` is already
  the engine's total, see conf/rollout/vllm_gpu.yaml), each on resources of its own.

A teacher for on-policy distillation (``teacher.engines``) is placed the same way: colocated,
teacher engine i joins bundle i; separate, its engines get a third group, ``teacher``.

Every group uses PACK, so ranks fill a node before spilling to the next (cheaper collectives).

Failing fast (``reserve``): before creating anything, the bundles are compared with the cluster's
alive nodes; asking more of a resource than the cluster has, or a bundle larger than every node,
raises ``PlacementError`` listing asked vs available per resource and node. A request the
cluster could hold but does not now (resources busy) waits for ``pg.ready()`` at most
``trainer.placement_timeout_s`` and then raises the same error, instead of pending forever.

The groups take one ``PlacementGroupSchedulingStrategy`` per actor (``Placement.learner`` /
``Placement.engines``), a Ray type, so the components need nothing from this module.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rlhf.cluster.node import NodeInfo
from rlhf.config import EngineConfig, LearnerConfig

MODES = ("colocated", "separate")
STRATEGY = "PACK"
RESOURCES = ("CPU", "GPU")  # what our actors ask for; a node's other resources are not compared
_EPS = 1e-9  # Ray's resource arithmetic is fixed-point (1e-4); float sums must not fail on rounding


class PlacementError(ValueError):
    """The asked placement cannot be had: the message lists resources asked vs available."""


@dataclass(frozen=True)
class Bundle:
    """Resources of one placement-group bundle."""

    cpu: float = 0.0
    gpu: float = 0.0

    def __add__(self, other: Bundle) -> Bundle:
        return Bundle(self.cpu + other.cpu, self.gpu + other.gpu)

    def amount(self, resource: str) -> float:
        return {"CPU": self.cpu, "GPU": self.gpu}[resource]

    def resources(self) -> dict[str, float]:
        """As Ray takes it; zero entries left out (Ray refuses a bundle of only zeros)."""
        return {r: self.amount(r) for r in RESOURCES if self.amount(r) > 0}


@dataclass(frozen=True)
class GroupSpec:
    """One placement group to create: its name (``colocated``, ``learner`` or ``engines``) and bundles."""

    name: str
    bundles: tuple[Bundle, ...]
    strategy: str = STRATEGY


@dataclass(frozen=True)
class Slot:
    """Where one actor goes: bundle ``bundle`` of group ``group``."""

    group: str
    bundle: int


@dataclass(frozen=True)
class PlacementPlan:
    mode: str
    groups: tuple[GroupSpec, ...]
    ranks: tuple[Slot, ...]  # learner rank r -> its slot
    engines: tuple[Slot, ...]  # engine e -> its slot
    teachers: tuple[Slot, ...] = ()  # teacher engine t -> its slot (on-policy distillation)

    def bundles(self) -> list[tuple[str, int, Bundle]]:
        """(group, index, bundle) for every bundle of every group."""
        return [(g.name, i, b) for g in self.groups for i, b in enumerate(g.bundles)]

    def totals(self) -> dict[str, float]:
        return {r: sum(b.amount(r) for _, _, b in self.bundles()) for r in RESOURCES}


def rank_bundle(cfg: LearnerConfig) -> Bundle:
    return Bundle(cfg.num_cpus_per_rank, cfg.num_gpus_per_rank)


def engine_bundle(cfg: EngineConfig) -> Bundle:
    return Bundle(cfg.num_cpus_per_engine, cfg.num_gpus_per_engine)


def plan_placement(mode: str, learner: LearnerConfig, rollout: EngineConfig,
                   teacher: EngineConfig | None = None) -> PlacementPlan:
    """The placement groups for ``trainer.placement=mode`` (pure arithmetic; nothing is created);
    ``teacher``: the teacher's engines (teacher.engines), None without a teacher."""
    R, E = learner.num_ranks, rollout.num_engines
    T = teacher.num_engines if teacher is not None else 0
    rank, engine = rank_bundle(learner), engine_bundle(rollout)
    tutor = engine_bundle(teacher) if teacher is not None else Bundle()
    if mode == "colocated":
        bundles = tuple((rank if i < R else Bundle()) + (engine if i < E else Bundle()) + (tutor if i < T else Bundle())
                        for i in range(max(R, E, T)))
        plan = PlacementPlan(mode, (GroupSpec("colocated", bundles),),
                             tuple(Slot("colocated", r) for r in range(R)), tuple(Slot("colocated", e) for e in range(E)),
                             tuple(Slot("colocated", t) for t in range(T)))
    elif mode == "separate":
        groups = (GroupSpec("learner", (rank,) * R), GroupSpec("engines", (engine,) * E))
        plan = PlacementPlan(mode, groups + ((GroupSpec("teacher", (tutor,) * T),) if T else ()),
                             tuple(Slot("learner", r) for r in range(R)), tuple(Slot("engines", e) for e in range(E)),
                             tuple(Slot("teacher", t) for t in range(T)))
    else:
        raise PlacementError(f"trainer.placement={mode!r} is not one of {list(MODES)}")
    for name, i, b in plan.bundles():
        if not b.resources():
            raise PlacementError(
                f"trainer.placement={mode}: {name} bundle {i} asks for nothing (learner.num_cpus_per_rank="
                f"{learner.num_cpus_per_rank}, num_gpus_per_rank={learner.num_gpus_per_rank}, "
                f"rollout.num_cpus_per_engine={rollout.num_cpus_per_engine}, num_gpus_per_engine="
                f"{rollout.num_gpus_per_engine}); a placement-group bundle needs a CPU or GPU amount > 0"
            )
    return plan


# ----------------------------------------------------------------------------- fitting (pure)
@dataclass(frozen=True)
class NodeResources:
    """A live Ray node's CPU/GPU: ``total`` (capacity) and ``available`` (free at the time asked)."""

    node_id: str
    ip: str
    total: dict[str, float]
    available: dict[str, float]


def _fmt(x: float) -> str:
    return f"{x:g}"


def _table(plan: PlacementPlan, nodes: list[NodeResources]) -> str:
    asked = plan.totals()
    lines = []
    for r in RESOURCES:
        total = sum(n.total.get(r, 0.0) for n in nodes)
        free = sum(n.available.get(r, 0.0) for n in nodes)
        lines.append(f"  {r}: asked {_fmt(asked[r])}, cluster total {_fmt(total)}, available now {_fmt(free)}")
    for n in nodes:
        have = ", ".join(f"{r} {_fmt(n.total.get(r, 0.0))} (free {_fmt(n.available.get(r, 0.0))})" for r in RESOURCES)
        lines.append(f"  node {n.ip} ({n.node_id[:12]}): {have}")
    return "\n".join(lines)


def _fits(b: Bundle, have: dict[str, float]) -> bool:
    return all(b.amount(r) <= have.get(r, 0.0) + _EPS for r in RESOURCES)


def check_fits(plan: PlacementPlan, nodes: list[NodeResources]) -> None:
    """Raise PlacementError when the cluster could never hold ``plan``: more of a resource than all
    nodes have together, or a bundle larger than every single node (a bundle cannot span nodes).
    Compared with the nodes' totals, not what is free now: busy resources are waited for."""
    asked = plan.totals()
    short = [r for r in RESOURCES if asked[r] > sum(n.total.get(r, 0.0) for n in nodes) + _EPS]
    if short:
        raise PlacementError(
            f"trainer.placement={plan.mode} asks for more {' and '.join(short)} than the Ray cluster has "
            f"({len(nodes)} node(s)):\n{_table(plan, nodes)}"
        )
    for name, i, b in plan.bundles():
        if not any(_fits(b, n.total) for n in nodes):
            raise PlacementError(
                f"trainer.placement={plan.mode}: {name} bundle {i} ({b.resources()}) is larger than every "
                f"node (a bundle must fit on one node):\n{_table(plan, nodes)}"
            )


def first_fit(plan: PlacementPlan, nodes: list[NodeResources]) -> dict[tuple[str, int], int] | None:
    """One way the bundles fit the nodes' AVAILABLE resources, (group, index) -> node index, largest
    bundles first, each group packed onto as few nodes as it can be; None if this greedy search
    finds none. For plan=true only: Ray's scheduler makes its own choice."""
    free = [dict(n.available) for n in nodes]
    out: dict[tuple[str, int], int] = {}
    for g in plan.groups:
        used: list[int] = []  # nodes this group already uses come first (PACK)
        for i, b in sorted(enumerate(g.bundles), key=lambda ib: (-ib[1].gpu, -ib[1].cpu)):
            order = used + [k for k in range(len(nodes)) if k not in used]
            k = next((k for k in order if _fits(b, free[k])), None)
            if k is None:
                return None
            for r in RESOURCES:
                free[k][r] = free[k].get(r, 0.0) - b.amount(r)
            if k not in used:
                used.append(k)
            out[(g.name, i)] = k
    return out


# ----------------------------------------------------------------------------- the cluster
def cluster_nodes() -> list[NodeResources]:
    """The connected Ray cluster's alive nodes."""
    import ray
    from ray._private.state import available_resources_per_node

    free = available_resources_per_node()
    return [
        NodeResources(n["NodeID"], n["NodeManagerAddress"], {r: float(n["Resources"].get(r, 0.0)) for r in RESOURCES},
                      {r: float(free.get(n["NodeID"], {}).get(r, 0.0)) for r in RESOURCES})
        for n in ray.nodes() if n.get("Alive")
    ]


def reachable_nodes(address: str | None) -> list[NodeResources] | None:
    """For plan=true: the nodes of the cluster at ``address`` (joined briefly, then left), or None
    without an address. Never starts a Ray of its own."""
    import ray

    if not address or ray.is_initialized():
        return cluster_nodes() if ray.is_initialized() else None
    ray.init(address=address, log_to_driver=False)
    try:
        return cluster_nodes()
    finally:
        ray.shutdown()


class Placement:
    """The created placement groups of a plan; ``learner`` / ``engines``: one scheduling strategy
    per rank / engine, for ``LearnerGroup(placement=...)`` / ``EngineGroup(placement=...)``."""

    def __init__(self, plan: PlacementPlan, groups: dict[str, Any]) -> None:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self.plan, self.groups = plan, groups

        def strategy(slot: Slot) -> PlacementGroupSchedulingStrategy:
            # Tasks an actor starts are not captured: they would compete for the actor's own bundle.
            return PlacementGroupSchedulingStrategy(groups[slot.group], placement_group_bundle_index=slot.bundle,
                                                    placement_group_capture_child_tasks=False)

        self.learner = [strategy(s) for s in plan.ranks]
        self.engines = [strategy(s) for s in plan.engines]
        self.teachers = [strategy(s) for s in plan.teachers]

    def bundle_nodes(self, group: str) -> list[str]:
        """The node id each bundle of ``group`` was reserved on, in bundle order."""
        from ray.util import placement_group_table

        where = placement_group_table(self.groups[group])["bundles_to_node_id"]
        return [where[i] for i in range(len(where))]

    def slot_nodes(self) -> tuple[list[NodeInfo], list[NodeInfo]]:
        """The node each learner rank and each engine will run on (its bundle's), known as soon as
        the groups are reserved: checks that depend on it need not wait for the actors."""
        import ray

        known = {n["NodeID"]: NodeInfo(node_id=n["NodeID"], ip=n["NodeManagerAddress"],
                                       hostname=n.get("NodeManagerHostname", "")) for n in ray.nodes()}
        where = {name: self.bundle_nodes(name) for name in self.groups}
        return ([known[where[s.group][s.bundle]] for s in self.plan.ranks],
                [known[where[s.group][s.bundle]] for s in self.plan.engines])

    def remove(self) -> None:
        from ray.util import remove_placement_group

        for pg in self.groups.values():
            remove_placement_group(pg)
        self.groups = {}


def reserve(plan: PlacementPlan, timeout_s: float) -> Placement:
    """Create the plan's placement groups and wait until all are ready, at most ``timeout_s``.

    Raises PlacementError before creating anything if the cluster could never hold them, and after
    ``timeout_s`` (the groups removed again) if it does not now.
    """
    import ray
    from ray.util import placement_group, remove_placement_group

    check_fits(plan, cluster_nodes())
    groups = {g.name: placement_group([b.resources() for b in g.bundles], strategy=g.strategy) for g in plan.groups}
    refs = {name: pg.ready() for name, pg in groups.items()}
    ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s)
    pending = [name for name, ref in refs.items() if ref not in ready]
    if pending:
        for pg in groups.values():
            remove_placement_group(pg)
        raise PlacementError(
            f"trainer.placement={plan.mode}: placement group(s) {pending} not ready within {timeout_s:g}s "
            f"(trainer.placement_timeout_s): the cluster has the resources but not free; "
            f"bundles {[(n, i, b.resources()) for n, i, b in plan.bundles()]}\n{_table(plan, cluster_nodes())}"
        )
    return Placement(plan, groups)


def record_placement(run_dir: Path, mode: str, rank_nodes: list[NodeInfo], engine_nodes: list[NodeInfo],
                     transport: str, teacher_nodes: list[NodeInfo] = ()) -> Path:
    """``<run>/placement.json``: where every learner rank and engine ran and how weights travelled,
    so a run's layout on the cluster is on record beside its metrics."""
    path = Path(run_dir) / "placement.json"
    payload = {
        "placement": mode,
        "weight_transport": transport,
        "learner_ranks": [asdict(n) for n in rank_nodes],
        "engines": [asdict(n) for n in engine_nodes],
        "teacher_engines": [asdict(n) for n in teacher_nodes],
    }
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path
