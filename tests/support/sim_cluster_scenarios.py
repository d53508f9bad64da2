"""Scenarios on a simulated multi-node cluster, one per fresh process:
``python -m tests.support.sim_cluster_scenarios <name>`` prints ``SCENARIO-RESULT <json>``.

A scenario is a function returning a JSON-able dict, registered with ``@scenario("name")``; it
starts its own cluster with ``sim_cluster``. Tests call ``run_scenario(name)`` and assert on the dict.
"""

from __future__ import annotations

import json
from pathlib import Path
import os
import sys
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Before anything imports Ray (rlhf.train does): Ray reads it at import to keep nodes on loopback.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

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
    from rlhf.cluster.placement import plan_placement, reserve
    from rlhf.config import AlgoConfig, LearnerConfig, RolloutConfig
    from rlhf.learner import LearnerGroup
    from rlhf.models import TINY, resolve_model_path
    from tests.test_learner import make_batch

    with sim_cluster([{"num_cpus": 3, "resources": {"node_a": 1}},
                      {"num_cpus": 3, "resources": {"node_b": 1}}]):
        cfg = LearnerConfig(num_ranks=2, zero_stage=3, num_cpus_per_rank=2, num_threads=1, micro_batch_size=4,
                            lr=1e-3, timeout_s=300.0)
        plan = plan_placement("separate", cfg, RolloutConfig(num_engines=1, num_cpus_per_engine=1))
        placement = reserve(plan, timeout_s=60)
        try:
            group = LearnerGroup(cfg, AlgoConfig(), resolve_model_path(TINY), "float32", False, total_updates=10,
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
    from rlhf.cluster.placement import PlacementError, plan_placement, reserve
    from rlhf.config import LearnerConfig, RolloutConfig

    with sim_cluster([{"num_cpus": 1}, {"num_cpus": 1}]):
        plan = plan_placement("separate", LearnerConfig(num_ranks=4, num_cpus_per_rank=1),
                              RolloutConfig(num_engines=1, num_cpus_per_engine=0.5))
        try:
            reserve(plan, timeout_s=600)
        except PlacementError as e:
            return {"error": type(e).__name__, "message": str(e)}
        return {"error": None}


@scenario("train_separate_three_nodes")
def train_separate_three_nodes() -> dict:
    """python -m rlhf.train's loop on 3 worker nodes of 2, 2 and 1 CPUs with trainer.placement=separate:
    2 ZeRO-3 ranks of 2 CPUs fill the two 2-CPU nodes (one each), so the 1-CPU engine lands on the
    third node. First learner.sync_transport=files is forced (refused by name before any step), then
    the run with auto (which must pick broadcast), then a resume for one more step."""
    import tempfile

    from rlhf.learner.sync import WeightTransportError
    from rlhf.models import TINY, resolve_model_path
    from rlhf.run.metrics import read_metrics
    from rlhf.train import train
    from tests.support.runs import axis_reward, compose

    out = Path(tempfile.mkdtemp(prefix="sim-train-"))
    sync_dir = out / "shm"
    sync_dir.mkdir()
    common = ["+experiment=tiny_smoke", "learner=zero3", "learner.num_ranks=2", "learner.num_cpus_per_rank=2",
              "learner.num_threads=1", "rollout.num_cpus_per_engine=1", "trainer.placement=separate",
              "trainer.eval_prompts=0", "trainer.tensorboard=false", f"learner.sync_dir={sync_dir}",
              "rollout.top_k=8", "learner.lr=1e-2", axis_reward(resolve_model_path(TINY))]
    result: dict = {}
    with sim_cluster([{"num_cpus": 2, "resources": {"node_a": 1}}, {"num_cpus": 2, "resources": {"node_b": 1}},
                      {"num_cpus": 1, "resources": {"node_c": 1}}]):
        forced = out / "files-run"
        try:
            train(compose(*common, "learner.sync_transport=files", f"trainer.output_dir={forced}"))
            result["files_error"] = None
        except WeightTransportError as e:
            result["files_error"] = str(e)
        result["files_run_metrics"] = (forced / "metrics.jsonl").exists()
        result["files_run_checkpoints"] = (forced / "checkpoints").exists()
        result["files_run_actor_logs"] = sorted(p.name for p in (forced / "logs").glob("*.log"))

        run = out / "run"
        train(compose(*common, f"trainer.output_dir={run}"))
        result["placement"] = json.loads((run / "placement.json").read_text())
        result["sync_dir_after"] = sorted(p.name for p in sync_dir.iterdir())
        result["complete"] = (run / "checkpoints" / "step-2" / "COMPLETE").exists()
        result["export"] = (run / "export" / "model.safetensors").exists()
        manifest = json.loads((run / "checkpoints" / "step-2" / "COMPLETE").read_text())  # the manifest
        result["manifest_ranks"] = sorted(int(r) for r in manifest.get("ranks", {}))

        train(compose(*common, f"trainer.output_dir={run}", "trainer.steps=3", "trainer.resume=true",
                      "trainer.export_at_end=false"))
        steps = [m for m in read_metrics(run / "metrics.jsonl") if "sync/probe_gap" in m]
        result["steps"] = [m["step"] for m in steps]
        result["probe_gaps"] = [m["sync/probe_gap"] for m in steps]
        result["transport_metric"] = [m.get("sync/broadcast") for m in steps]
        result["probe_tolerance"] = 1e-3
    return result


def _kill_a_rank_in_step_2(prefix: str, *extra: str) -> tuple[Path, str | None, int, float]:
    """Two ZeRO-3 ranks on two nodes and the engine on a third (weights by broadcast), 3 steps with
    a checkpoint every step; once step 1's checkpoint is complete, a learner rank's process is
    SIGKILLed as soon as it runs train_step (step 2). Returns the run folder, the error the run
    raised (None: it finished), how many processes were killed and the seconds the run took."""
    import tempfile
    import time

    from rlhf.models import TINY, resolve_model_path
    from rlhf.train import train
    from tests.support.runs import axis_reward, compose, kills

    run = Path(tempfile.mkdtemp(prefix=prefix)) / "run"
    error = None
    # Cluster raylets are this process's children, so every actor process is a descendant.
    with sim_cluster([{"num_cpus": 2, "resources": {"node_a": 1}}, {"num_cpus": 2, "resources": {"node_b": 1}},
                      {"num_cpus": 1, "resources": {"node_c": 1}}]), \
            kills([(run / "checkpoints" / "step-1" / "COMPLETE", "LearnerRank.train_step")],
                  with_children=False) as killed:
        start = time.monotonic()
        try:
            train(compose("+experiment=tiny_smoke", "learner=zero3", "learner.num_ranks=2",
                          "learner.num_cpus_per_rank=2", "learner.num_threads=1", "rollout.num_cpus_per_engine=1",
                          "trainer.placement=separate", "trainer.eval_prompts=0", "trainer.tensorboard=false",
                          "trainer.steps=3", "trainer.save_every=1", "trainer.export_at_end=false",
                          "learner.timeout_s=600", "rollout.top_k=8", "learner.lr=1e-2",
                          axis_reward(resolve_model_path(TINY)), f"trainer.output_dir={run}", *extra))
        except Exception as e:  # noqa: BLE001 - the scenario reports what the run raised
            error = f"{type(e).__name__}: {e}"
    return run, error, len(killed), time.monotonic() - start


@scenario("rank_killed_mid_step")
def rank_killed_mid_step() -> dict:
    """``_kill_a_rank_in_step_2`` with trainer.max_restarts=0: the run must stop naming a learner
    rank, the stage and trainer.max_restarts, and step 1's checkpoint must still verify."""
    from rlhf.learner.checkpoint import complete_checkpoints, open_checkpoint

    run, error, killed, seconds = _kill_a_rank_in_step_2("sim-kill-", "trainer.max_restarts=0")
    result: dict = {"error": error, "seconds_after_start": seconds, "killed": killed,
                    "complete": [step for step, _ in complete_checkpoints(run / "checkpoints")]}
    try:
        result["step1_state_step"] = open_checkpoint(run / "checkpoints" / "step-1")["step"]
    except Exception as e:  # noqa: BLE001
        result["step1_state_step"] = f"{type(e).__name__}: {e}"
    return result


@scenario("rank_restarted_two_nodes")
def rank_restarted_two_nodes() -> dict:
    """``_kill_a_rank_in_step_2`` with the default trainer.max_restarts: the learner group restarts
    in the same two bundles, the broadcast group is formed again with the new ranks, and the run
    finishes from step 1's checkpoint."""
    import json

    from rlhf.learner.checkpoint import complete_checkpoints
    from tests.support.runs import steps_logged

    run, error, killed, seconds = _kill_a_rank_in_step_2("sim-restart-")
    steps = steps_logged(run)
    return {
        "error": error,
        "seconds": seconds,
        "killed": killed,
        "steps": sorted(steps),
        "restarts": [steps[s].get("faults/learner_restarts") for s in sorted(steps)],
        "seconds_lost": [steps[s].get("faults/learner_seconds_lost") for s in sorted(steps)],
        "transport_metric": [steps[s].get("sync/broadcast") for s in sorted(steps)],
        "probe_gaps": [steps[s].get("sync/probe_gap") for s in sorted(steps)],
        "complete": [step for step, _ in complete_checkpoints(run / "checkpoints")],
        "placement": json.loads((run / "placement.json").read_text()),
    }


@scenario("train_async_two_nodes")
def train_async_two_nodes() -> dict:
    """trainer.max_staleness=1 with the learner and the engine on two different worker nodes
    (placement separate, weights by broadcast): the engine generates step s + 1 on its node while
    the rank trains step s on the other."""
    import tempfile

    from rlhf.models import TINY, resolve_model_path
    from rlhf.run.metrics import read_metrics
    from rlhf.run.timeline import read_timeline
    from rlhf.train import train
    from tests.support.runs import axis_reward, compose

    run = Path(tempfile.mkdtemp(prefix="sim-async-")) / "run"
    with sim_cluster([{"num_cpus": 1, "resources": {"node_a": 1}}, {"num_cpus": 1, "resources": {"node_b": 1}}]):
        train(compose("+experiment=tiny_smoke", "learner.num_cpus_per_rank=1", "rollout.num_cpus_per_engine=1",
                      "trainer.placement=separate", "trainer.eval_prompts=0", "trainer.tensorboard=false",
                      "trainer.steps=3", "trainer.max_staleness=1", "rollout_correction=tis",
                      "algo.max_mismatch_kl=null", "trainer.export_at_end=false", "rollout.top_k=8",
                      "learner.lr=1e-2", axis_reward(resolve_model_path(TINY)), f"trainer.output_dir={run}"))
    placement = json.loads((run / "placement.json").read_text())
    steps = [m for m in read_metrics(run / "metrics.jsonl") if "loss" in m]
    return {
        "rank_nodes": [n["node_id"] for n in placement["learner_ranks"]],
        "engine_nodes": [n["node_id"] for n in placement["engines"]],
        "transport": placement["weight_transport"],
        "staleness": [m["async/staleness"] for m in steps],
        "probe_gaps": [m["sync/probe_gap"] for m in steps],
        "spans": read_timeline(run / "timeline.jsonl"),
    }


@scenario("opd_separate_three_nodes")
def opd_separate_three_nodes() -> dict:
    """On-policy distillation with trainer.placement=separate on three 1-CPU worker nodes: the
    learner rank, the policy engine and the teacher engine each fill a node, so the teacher scores
    completions generated on another node for a rank on a third."""
    import tempfile

    from rlhf.models import TINY, resolve_model_path
    from rlhf.run.metrics import read_metrics
    from rlhf.train import train
    from tests.support.runs import compose
    from tests.support.teachers import perturbed_copy

    tmp = Path(tempfile.mkdtemp(prefix="sim-opd-"))
    teacher = perturbed_copy(resolve_model_path(TINY), tmp / "teacher", std=0.05)
    nodes = [{"num_cpus": 1, "resources": {f"node_{x}": 1}} for x in "abc"]
    with sim_cluster(nodes):
        run = train(compose("+experiment=tiny_smoke", "+teacher=engines", f"teacher.model={teacher}",
                            "algo.distill_coef=1.0", "reward.functions=[]", "trainer.placement=separate",
                            "learner.num_cpus_per_rank=1", "rollout.num_cpus_per_engine=1",
                            "teacher.engines.num_cpus_per_engine=1", "teacher.engines.kv_cache_gb=0.25",
                            "trainer.eval_prompts=0", "trainer.tensorboard=false", "trainer.steps=2",
                            "trainer.export_at_end=false", f"trainer.output_dir={tmp / 'run'}"))
    placement = json.loads((run / "placement.json").read_text())
    steps = [m for m in read_metrics(run / "metrics.jsonl") if "loss" in m]
    return {
        "rank_nodes": [n["node_id"] for n in placement["learner_ranks"]],
        "engine_nodes": [n["node_id"] for n in placement["engines"]],
        "teacher_nodes": [n["node_id"] for n in placement["teacher_engines"]],
        "teacher_tokens": [m["distill/teacher_tokens"] for m in steps],
        "reverse_kl": [m["distill/reverse_kl"] for m in steps],
        "ledger": json.loads((run / "ledger.json").read_text())["totals"],
    }


@scenario("sft_two_nodes")
def sft_two_nodes() -> dict:
    """python -m rlhf.distill.sft's run with its 2 learner ranks on two 1-CPU worker nodes (the head
    has no CPUs, so rank 0 and rank 1 land on different nodes): first with the run folder on storage
    both nodes share (this machine's disk), then with a run folder that is node-private. That one is
    a symlink to /proc/self/cwd: the same absolute path names another folder in every process, as a
    local disk mounted at the same path on each node does. The driver moves to its own folder after
    the cluster starts, so the ranks (started in the cluster's working directory) see another one."""
    import tempfile

    from rlhf.cluster.storage import StorageError
    from rlhf.distill.sft import run_sft
    from rlhf.run.metrics import read_metrics
    from tests.support.runs import compose

    tmp = Path(tempfile.mkdtemp(prefix="sim-sft-"))
    data = tmp / "teacher.jsonl"
    rows = []
    for i in range(8):
        a, b = i % 5, (3 * i) % 4
        rows.append({"messages": [{"role": "user", "content": f"What is {a} + {b}?"},
                                  {"role": "assistant", "content": f"{a} + {b} = {a + b}"}]})
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def sft(out: Path, *more: str) -> Path:
        # 8 rows in batches of 4 for 1 epoch: 2 updates, each rank 2 rows a step.
        return run_sft(compose("model=tiny", "+sft=default", f"sft.data_path={data}", f"trainer.output_dir={out}",
                               "sft.batch_size=4", "sft.epochs=1", "sft.lr=1e-2", "learner.num_ranks=2",
                               "learner.num_cpus_per_rank=1", "learner.num_threads=1",
                               "learner.micro_batch_size=2", "trainer.tensorboard=false",
                               "ledger.device_kind=cpu", *more))

    result: dict = {}
    with sim_cluster([{"num_cpus": 1, "resources": {"node_a": 1}}, {"num_cpus": 1, "resources": {"node_b": 1}}]):
        run = sft(tmp / "run")
        result["steps"] = [m["step"] for m in read_metrics(run / "metrics.jsonl") if "loss" in m]
        result["run_dir"] = str(run)
        result["rank_logs"] = sorted(p.name for p in (run / "logs").glob("learner-rank-*.log"))
        manifest = json.loads((run / "checkpoints" / "step-2" / "COMPLETE").read_text())
        result["manifest_ranks"] = sorted(int(r) for r in manifest.get("ranks", {}))
        result["export"] = (run / "export" / "model.safetensors").exists()

        node_disk = tmp / "node-disk"
        node_disk.symlink_to("/proc/self/cwd")
        driver_disk = tmp / "driver-disk"
        driver_disk.mkdir()
        os.chdir(driver_disk)
        private = node_disk / f"sft-run-{os.getpid()}"
        try:
            # trainer.console=full: no rank log files, which the ranks would write into their own folder.
            sft(private, "trainer.console=full")
            result["private_error"] = None
        except StorageError as e:
            result["private_error"] = str(e)
        result["private_path"] = str(private)
        result["private_seen_by_driver"] = sorted(p.name for p in (driver_disk / private.name).iterdir())
        # The ranks' working directory is the project (the cluster started there): the same name, unseen.
        result["private_made_in_ranks_folder"] = (Path(__file__).resolve().parents[2] / private.name).exists()
    return result


@scenario("agents_on_their_own_node")
def agents_on_their_own_node() -> dict:
    """An agent run (agent.executor=ray, agent.resources={agents: 0.01}) on two worker nodes: one of
    1 CPU holds the learner rank and the engine (placement colocated), one with no CPU but the
    custom resource ``agents`` takes the agent tasks. The gateway listens on the driver's node
    address; the agents (tests/support/agents.py on_node) write down the node they ran on."""
    import tempfile

    import ray

    from rlhf.run.metrics import read_metrics
    from rlhf.train import train
    from tests.support.runs import compose

    tmp = Path(tempfile.mkdtemp(prefix="sim-agents-"))
    run, seen = tmp / "run", tmp / "nodes"
    seen.mkdir()
    agents = Path(__file__).with_name("agents.py").as_posix()
    with sim_cluster([{"num_cpus": 1, "resources": {"node_a": 1}}, {"num_cpus": 0, "resources": {"agents": 1}}]):
        agents_node = [n["NodeID"] for n in ray.nodes() if "agents" in n["Resources"]]
        train(compose("+experiment=tiny_smoke", "trainer.steps=1", "trainer.eval_prompts=0", "trainer.tensorboard=false",
                      "trainer.export_at_end=false", "reward.functions=[{fn: math_answer, weight: 0.0}]",
                      f"agent.name={agents}:on_node", f"+agent.kwargs.log_dir={seen}", "agent.executor=ray",
                      "+agent.resources.agents=0.01", "agent.timeout_s=120", f"trainer.output_dir={run}"))
    placement = json.loads((run / "placement.json").read_text())
    (step,) = [m for m in read_metrics(run / "metrics.jsonl") if "loss" in m]
    return {
        "agents_node": agents_node,
        "agent_task_nodes": sorted({p.read_text() for p in seen.iterdir()}),
        "agent_episodes": len(list(seen.iterdir())),
        "engine_nodes": [n["node_id"] for n in placement["engines"]],
        "rank_nodes": [n["node_id"] for n in placement["learner_ranks"]],
        "metrics": {k: v for k, v in step.items() if k.startswith(("agent/", "gateway/", "reward/", "loss"))},
    }


@scenario("engine_nodes_removed")
def engine_nodes_removed() -> dict:
    """The learner rank on a 2-CPU node, the 1-CPU engine on one of two 1-CPU nodes. Three runs of the
    same 3-step command: uninterrupted; then, in step 2's generate, the engine's whole node (its
    raylet) is removed, and Ray re-places the engine's bundle on the other 1-CPU node, where
    the group starts the replacement; then the same again with no 1-CPU node left to take it."""
    import tempfile
    import threading

    import torch
    from safetensors.torch import load_file

    from rlhf.learner.checkpoint import complete_checkpoints
    from rlhf.models import TINY, resolve_model_path
    from rlhf.run.metrics import read_metrics
    from rlhf.train import train
    from tests.support.runs import axis_reward, compose, descendant_running

    out = Path(tempfile.mkdtemp(prefix="sim-engine-node-"))
    common = ["+experiment=tiny_smoke", "learner.num_cpus_per_rank=2", "learner.num_threads=1",
              "rollout.num_cpus_per_engine=1", "trainer.placement=separate", "trainer.eval_prompts=0",
              "trainer.tensorboard=false", "trainer.steps=3", "trainer.save_every=1", "rollout.top_k=8",
              "learner.lr=5e-3", "rollout.timeout_s=90", axis_reward(resolve_model_path(TINY)),
              "rollout.max_new_tokens=256"]  # generations of seconds: long enough to lose a node in one
    keys = ("loss", "reward/mean", "grad_norm", "response_length/mean", "faults/engine_restarts")

    def steps(run: Path) -> dict:
        return {m["step"]: {k: m.get(k) for k in keys} for m in read_metrics(run / "metrics.jsonl") if "loss" in m}

    def engine_node(run: Path) -> str:
        return json.loads((run / "placement.json").read_text())["engines"][0]["node_id"]

    def run_removing_the_engine_node(cluster, run: Path) -> tuple[str | None, str | None]:
        """Train, removing the engine's node once step 1's checkpoint is complete; (error, removed node)."""
        removed: list[str] = []
        stop = threading.Event()

        def remover() -> None:
            while not stop.is_set() and not (run / "checkpoints" / "step-1" / "COMPLETE").exists():
                stop.wait(0.05)
            # Then mid-generation: once Ray titles the engine's process with step 2's generate (the
            # raylets are this process's children, so every actor process is a descendant).
            while not stop.is_set() and descendant_running("RolloutEngine.generate") is None:
                stop.wait(0.02)
            if stop.is_set():
                return
            target = engine_node(run)
            node = next(n for n in cluster.list_all_nodes() if n.node_id == target)
            cluster.remove_node(node, allow_graceful=False)
            removed.append(target)

        thread = threading.Thread(target=remover, daemon=True)
        thread.start()
        try:
            train(compose(*common, f"trainer.output_dir={run}"))
            error = None
        except Exception as e:  # noqa: BLE001 - the scenario reports what the run raised
            error = f"{type(e).__name__}: {e}"
        finally:
            stop.set()
            thread.join()
        return error, removed[0] if removed else None

    result: dict = {}
    with sim_cluster([{"num_cpus": 2, "resources": {"node_a": 1}}, {"num_cpus": 1, "resources": {"node_b": 1}},
                      {"num_cpus": 1, "resources": {"node_c": 1}}]) as cluster:
        straight = out / "straight"
        train(compose(*common, f"trainer.output_dir={straight}"))
        moved = out / "moved"
        result["moved_error"], result["moved_removed"] = run_removing_the_engine_node(cluster, moved)
        result["moved_engine_node_after"] = engine_node(moved)  # placement.json is rewritten on a restart
        result["straight_steps"], result["moved_steps"] = steps(straight), steps(moved)
        if result["moved_error"] is None:
            a = load_file(str(straight / "export" / "model.safetensors"))
            b = load_file(str(moved / "export" / "model.safetensors"))
            result["params_equal"] = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

        stuck = out / "no-room"  # one 1-CPU node left: its removal leaves the engine nowhere to go
        result["stuck_error"], result["stuck_removed"] = run_removing_the_engine_node(cluster, stuck)
        result["stuck_complete"] = [step for step, _ in complete_checkpoints(stuck / "checkpoints")]
    return result


if __name__ == "__main__":
    result = SCENARIOS[sys.argv[1]]()
    print(RESULT + json.dumps(result), flush=True)
