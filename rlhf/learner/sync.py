"""How full weights get from the learner to the engines: one interface, two transports.

``files`` (one node): every rank takes part in the gather, rank 0 writes safetensors buckets into
``learner.sync_dir`` (/dev/shm) and the engines read them. It needs the engines to see rank 0's
files, so it is refused when an engine runs on another node.

``broadcast`` (any placement): learner rank 0 and every vLLM worker of every engine form one
torch.distributed group (gloo on CPU, nccl on GPU: ``learner.backend``), meeting at rank 0's node
address on a free port there. Rank 0 gathers bucket by bucket and broadcasts each as one flat
tensor; the workers rebuild the tensors from a layout sent once as plain data and feed vLLM's
``reload_weights`` exactly as the file path does. The group is formed once (first sync, or
``LearnerGroup.connect`` at start-up) and left at shutdown; forming it includes one small broadcast
(``sync_wire.Member.prove``), so under nccl, whose communicator is otherwise built lazily at the
first collective, a broken member fails here, named, and not inside the first sync.

Why our own group in the worker extension rather than vLLM 0.32's weight-transfer API
(``vllm/distributed/weight_transfer``, with an engine factory one could register a gloo engine
in): that API has no CPU engine, its registry lives in each worker process (ours would have to be
registered there before the worker is built), and its trainer side drives its own parameter
iteration, which would have to be taught ZeRO-3's collective gathers. The group here is ~100
lines over torch.distributed (rlhf/sync_wire.py), one code path for gloo and nccl, loads through
the same ``reload_weights`` call (tied head, CPU repacking) as files, and every wait has our
timeout and names the engine.

Both halves of a broadcast run at once (launched as Ray calls, then awaited together): a failure
on either side is reported as soon as it happens, naming the rank or the engine.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from rlhf import faults
from rlhf.cluster.node import NodeInfo
from rlhf.config import LearnerConfig
from rlhf.learner.waiting import wait_named
from rlhf.types import BroadcastGroup

TRANSPORTS = ("auto", "files", "broadcast")


class WeightTransportError(RuntimeError):
    """A weight transport failed, stalled, or cannot work with this placement; names who."""


class Engines(Protocol):
    """What the weight sync needs from rollouts.EngineGroup."""

    timeout_s: float
    num_engines: int
    workers_per_engine: int

    def nodes(self) -> list[NodeInfo]: ...

    def load_weights(self, paths: list[str]) -> list[float]: ...

    def load_adapter(self, path: str) -> list[float]: ...

    def start_join_weight_group(self, group: BroadcastGroup, layout: list) -> list: ...

    def start_receive_weights(self) -> list: ...

    def leave_weight_group(self) -> None: ...

    def probe(self, token_ids: list[int]) -> list[list[float]]: ...


def choose_transport(choice: str, rank0: NodeInfo, engines: list[NodeInfo], backend: str = "gloo") -> str:
    """``learner.sync_transport`` resolved against where rank 0 and the engines run.

    auto: files when every engine is on rank 0's node, broadcast otherwise. files with an engine on
    another node is refused: that engine could never read rank 0's /dev/shm. broadcast over nccl
    with an engine on one of rank 0's GPUs (colocated, fractional GPUs) is refused too: NCCL does
    not take two ranks of one communicator on one device. auto already sends such an engine files
    when every engine is on rank 0's node; when some are not, one transport cannot serve both.
    """
    if choice not in TRANSPORTS:
        raise WeightTransportError(f"learner.sync_transport={choice!r} is not one of {list(TRANSPORTS)}")
    away = [(e, node) for e, node in enumerate(engines) if node.node_id != rank0.node_id]
    resolved = ("broadcast" if away else "files") if choice == "auto" else choice
    if resolved == "files" and away:
        e, node = away[0]
        raise WeightTransportError(
            f"learner.sync_transport=files, but rollout engine {e} runs on node {_where(node)} and "
            f"learner rank 0 on node {_where(rank0)}: the engine cannot read rank 0's weight files. "
            "Use learner.sync_transport=broadcast (or auto)."
        )
    clash = on_rank0_device(rank0, engines) if resolved == "broadcast" and backend == "nccl" else []
    if clash:
        e, gpus = clash[0]
        fix = ("use learner.sync_transport=files (or auto)" if not away else
               f"engines {[i for i, _ in away]} run on other nodes and need broadcast, so give engine {e} "
               "a GPU of its own (whole GPUs per rank and engine, or trainer.placement=separate)")
        raise WeightTransportError(
            f"learner.sync_transport={choice} with learner.backend=nccl: rollout engine {e} shares GPU "
            f"{', '.join(gpus)} with learner rank 0 on node {_where(rank0)}, and NCCL refuses two ranks of "
            f"one communicator on one device; {fix}."
        )
    return resolved


def on_rank0_device(rank0: NodeInfo, engines: list[NodeInfo]) -> list[tuple[int, list[str]]]:
    """(engine, shared GPU ids) for every engine on rank 0's node holding one of rank 0's GPUs
    (Ray's ids of the node's physical devices, ``NodeInfo.gpu_ids``)."""
    mine = set(rank0.gpu_ids)
    return [(e, sorted(mine & set(node.gpu_ids))) for e, node in enumerate(engines)
            if node.node_id == rank0.node_id and mine & set(node.gpu_ids)]


def _where(node: NodeInfo) -> str:
    return f"{node.hostname} ({node.ip}, id {node.node_id[:12]})"


def _wait(stage: str, calls: list[tuple[str, Any, float]]) -> list[Any]:
    return wait_named(stage, calls, WeightTransportError)


@dataclass
class Sent:
    """What one transport call moved: bytes, seconds of the learner's half, seconds of the engines'."""

    num_bytes: int
    gather_s: float
    load_s: float


def _ranks(ranks: list, method: str, timeout_s: float, *args: Any) -> list[tuple[str, Any, float]]:
    return [(f"learner rank {r}", getattr(a, method).remote(*args), timeout_s) for r, a in enumerate(ranks)]


def _engines(refs: list, timeout_s: float) -> list[tuple[str, Any, float]]:
    return [(f"rollout engine {e}", ref, timeout_s) for e, ref in enumerate(refs)]


def _timed_load(load: Callable[[], Any]) -> float:
    """Seconds the engines took to load what rank 0 wrote."""
    start = time.perf_counter()
    if not faults.active("skip_sync"):  # tests only: the probe check must catch a lost sync
        load()
    return time.perf_counter() - start


class FileTransport:
    """Safetensors buckets in ``learner.sync_dir`` on rank 0's node; deleted after loading."""

    name = "files"

    def __init__(self, ranks: list, cfg: LearnerConfig) -> None:
        self.ranks, self.cfg = ranks, cfg

    def send(self, engines: Engines) -> Sent:
        out_dir = Path(self.cfg.sync_dir) / f"rlhf-sync-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        try:
            written = _wait("weight gather",
                            _ranks(self.ranks, "write_weights", self.cfg.timeout_s, str(out_dir), True))
            paths, nbytes, gather_s = written[0]
            if not paths:
                raise WeightTransportError("learner rank 0 wrote no weight buckets during weight gather")
            load_s = _timed_load(lambda: engines.load_weights(paths))
        finally:
            shutil.rmtree(out_dir, ignore_errors=True)
        return Sent(nbytes, gather_s, load_s)

    def close(self) -> None:
        pass


class AdapterTransport:
    """LoRA with model.lora.sync=adapter: rank 0 writes the PEFT adapter (safetensors and
    adapter_config.json, the export's folder) under ``root`` and every engine loads it into vLLM's
    LoRA serving; the base weights are never sent. ``root`` must be a folder every engine sees:
    ``learner.sync_dir`` when the engines share rank 0's node, else the run folder (checked to be
    shared storage at start-up). Deleted once loaded: the engines load it at once."""

    name = "adapter"

    def __init__(self, ranks: list, cfg: LearnerConfig, root: Path) -> None:
        self.ranks, self.cfg, self.root = ranks, cfg, root

    def send(self, engines: Engines) -> Sent:
        out_dir = self.root / f"rlhf-adapter-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        try:
            written = _wait("adapter write", _ranks(self.ranks, "write_adapter", self.cfg.timeout_s, str(out_dir)))
            nbytes, gather_s = written[0]
            if not nbytes:
                raise WeightTransportError("learner rank 0 wrote an empty LoRA adapter during adapter write")
            load_s = _timed_load(lambda: engines.load_adapter(str(out_dir)))
        finally:
            shutil.rmtree(out_dir, ignore_errors=True)
        return Sent(nbytes, gather_s, load_s)

    def close(self) -> None:
        pass


class BroadcastTransport:
    """Learner rank 0 -> every engine worker over one process group, formed here (a barrier)."""

    name = "broadcast"

    def __init__(self, ranks: list, cfg: LearnerConfig, engines: Engines) -> None:
        self.ranks, self.cfg, self.engines = ranks, cfg, engines
        opened = _wait("weight group set-up", _ranks(ranks, "open_weight_group", cfg.timeout_s))
        addr, port, layout = opened[0]
        world = 1 + engines.num_engines * engines.workers_per_engine
        group = BroadcastGroup(backend=cfg.backend, addr=addr, port=port, world_size=world,
                               workers_per_engine=engines.workers_per_engine)
        try:
            # Rank 0's join and the workers' are one rendezvous: both must be in flight at once.
            _wait("weight group set-up",
                  _ranks(ranks[:1], "join_weight_group", cfg.timeout_s, group)
                  + _engines(engines.start_join_weight_group(group, layout), engines.timeout_s))
        except BaseException:
            self.close()
            raise

    def send(self, engines: Engines) -> Sent:
        if engines is not self.engines:
            raise WeightTransportError("the weight broadcast group was formed with another engine group")
        if faults.active("skip_sync"):  # tests only: no broadcast without receivers, so neither half runs
            return Sent(0, 0.0, 0.0)
        n = len(self.ranks)
        results = _wait("weight broadcast",
                        _ranks(self.ranks, "broadcast_weights", self.cfg.timeout_s)
                        + _engines(engines.start_receive_weights(), engines.timeout_s))
        nbytes, gather_s = results[0]
        return Sent(nbytes, gather_s, max(results[n:]))

    def close(self) -> None:
        """Leave the group on both sides (best effort: at shutdown a side may be gone already)."""
        import ray

        self.engines.leave_weight_group()
        refs = [a.leave_weight_group.remote() for a in self.ranks]
        ray.wait(refs, num_returns=len(refs), timeout=60)
