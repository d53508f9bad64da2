"""The broadcast weight transport's wire: its process group and the flat-bucket layout.

Both halves use this module: the learner's rank 0 (``rlhf/learner/sync_broadcast.py``) and every vLLM
worker (``rollouts/sync.py``). The group is built directly from a TCPStore, beside the
default group each process already has (DeepSpeed's on the learner, vLLM's size-1 group in a
worker), so neither side's own collectives are disturbed. gloo on CPU, nccl on GPU: the same calls.

A bucket travels as one flat byte tensor; its layout (names, shapes, dtypes, byte offsets) is plain
data, sent once through Ray and ``collective_rpc`` (msgpack: lists and strings, never tensors).
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

import torch

from rlhf.cluster.node import listen_on
from rlhf.types import BroadcastGroup, TensorSlot, WeightBucket

_ALIGN = 16  # byte offsets are multiples of this, so any dtype's view of the flat buffer is aligned


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def plan_buckets(buckets: list[list[tuple[str, tuple[int, ...], torch.dtype]]]) -> list[WeightBucket]:
    """(name, shape, dtype) lists, one per bucket -> buckets with byte offsets into one flat buffer."""
    out = []
    for entries in buckets:
        slots, offset = [], 0
        for name, shape, dtype in entries:
            slots.append(TensorSlot(name, tuple(int(s) for s in shape), dtype_name(dtype), offset))
            offset += -(-slots[-1].nbytes // _ALIGN) * _ALIGN
        out.append(WeightBucket(tuple(slots), offset))
    return out


def to_wire(buckets: list[WeightBucket]) -> list:
    """Plain lists for msgpack: [[nbytes, [[name, shape, dtype, offset], ...]], ...]."""
    return [[b.nbytes, [[s.name, list(s.shape), s.dtype, s.offset] for s in b.slots]] for b in buckets]


def from_wire(wire: list) -> list[WeightBucket]:
    return [WeightBucket(tuple(TensorSlot(n, tuple(shape), d, o) for n, shape, d, o in slots), int(nbytes))
            for nbytes, slots in wire]


def device_for(backend: str) -> torch.device:
    """Where the flat buffers live: host memory for gloo, this process's current GPU for nccl."""
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


def views(flat: torch.Tensor, bucket: WeightBucket) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) views into a received flat bucket (no copy)."""
    for s in bucket.slots:
        piece = flat[s.offset : s.offset + s.nbytes]
        yield s.name, piece.view(getattr(torch, s.dtype)).view(s.shape)


def pack(tensors: dict[str, torch.Tensor], bucket: WeightBucket, device: torch.device) -> torch.Tensor:
    """One flat byte tensor holding ``tensors`` at the bucket's offsets; refuses a layout mismatch."""
    if set(tensors) != {s.name for s in bucket.slots}:
        raise ValueError(f"weight bucket holds {sorted(tensors)[:3]}..., its layout {bucket.slots[0].name}...")
    flat = torch.empty(bucket.nbytes, dtype=torch.uint8, device=device)
    for (name, view), s in zip(views(flat, bucket), bucket.slots):
        t = tensors[name]
        if tuple(t.shape) != s.shape or dtype_name(t.dtype) != s.dtype:
            raise ValueError(f"weight {name}: {tuple(t.shape)} {t.dtype}, layout says {s.shape} {s.dtype}")
        view.copy_(t)
    return flat


def open_listener(ip: str) -> tuple[int, int]:
    """A listening socket bound to ``ip`` only, on a free port: (fd, port). The store takes the fd,
    so it listens on this address and not on every interface (as TCPStore would by itself)."""
    sock = listen_on(ip, 0, "weight broadcast")
    port = sock.getsockname()[1]
    return sock.detach(), port


class GroupFormationError(RuntimeError):
    """The weight group did not form: names the members that never joined or answered wrongly."""


def join_group(group: BroadcastGroup, rank: int, own_ip: str, timeout_s: float,
               listen_fd: int | None = None) -> "Member":
    """This process's member of the broadcast group; returns once all ``world_size`` have joined
    and one small broadcast has gone through (``Member.prove``).

    Rank 0 hosts the store on ``listen_fd`` (``open_listener``). gloo's own connections are bound
    to ``own_ip`` (this node's address), not to whatever the host name resolves to. Every member
    signs in at the store first, so rank 0 can name whoever never arrived (``_await_members``).
    """
    import torch.distributed as dist

    timeout = timedelta(seconds=timeout_s)
    try:
        store = dist.TCPStore(group.addr, group.port, group.world_size, is_master=rank == 0, timeout=timeout,
                              wait_for_workers=False, master_listen_fd=listen_fd)
    except (RuntimeError, OSError) as e:  # DistNetworkError is a RuntimeError
        raise GroupFormationError(f"weight group: {group.member(rank)} cannot reach learner rank 0's store at "
                                  f"{group.addr}:{group.port} within {timeout_s:g}s: {e}") from e
    store.set(f"joined/{rank}", own_ip)
    if rank == 0:
        _await_members(store, group, timeout_s)
    if group.backend == "gloo":
        opts = dist.ProcessGroupGloo._Options()
        opts._timeout = timeout
        opts._devices = [dist.ProcessGroupGloo.create_device(hostname=own_ip)]
        pg = dist.ProcessGroupGloo(store, rank, group.world_size, opts)
    elif group.backend == "nccl":
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        pg = dist.ProcessGroupNCCL(store, rank, group.world_size, opts)
    else:
        raise ValueError(f"broadcast weight transport: backend {group.backend!r} is not gloo or nccl")
    member = Member(pg, store, timeout)
    member.prove(group, rank)
    return member


def _await_members(store, group: BroadcastGroup, timeout_s: float) -> None:
    """Rank 0: wait until every member has signed in; past ``timeout_s``, name those who have not."""
    import time

    deadline = time.monotonic() + timeout_s
    missing = list(range(1, group.world_size))
    while missing:
        missing = [r for r in missing if not store.check([f"joined/{r}"])]
        if missing and time.monotonic() > deadline:
            names = ", ".join(group.member(r) for r in missing)
            raise GroupFormationError(
                f"weight group at {group.addr}:{group.port}: {names} did not join within {timeout_s:g}s "
                "(not started, stuck, or unable to reach this address)")
        time.sleep(0.05)


class Member:
    """One process's place in the group. The store is kept beside the group: rank 0's store
    serves the others for as long as the group lives."""

    def __init__(self, pg, store, timeout: timedelta) -> None:
        self.pg, self.store, self.timeout = pg, store, timeout

    def prove(self, group: BroadcastGroup, rank: int) -> None:
        """One small broadcast right after joining. nccl creates its communicator at the first
        collective, so without it a bad interface or a same-device clash would first show in the
        first weight sync, a whole step later; gloo has connected already, and this proves it.
        Every member checks it heard rank 0 of its own group (same port and size)."""
        want = torch.tensor([group.port, group.world_size], dtype=torch.int64, device=device_for(group.backend))
        got = want.clone() if rank == 0 else torch.zeros_like(want)
        try:
            self.broadcast(got)
        except Exception as e:
            raise GroupFormationError(f"weight group at {group.addr}:{group.port}: {group.member(rank)} "
                                      f"joined, but the first broadcast failed: {e}") from e
        if not torch.equal(got, want):
            raise GroupFormationError(
                f"weight group at {group.addr}:{group.port}: {group.member(rank)} heard (port, size) "
                f"{got.tolist()} from rank 0, expected {want.tolist()}")

    def broadcast(self, flat: torch.Tensor) -> None:
        """Broadcast ``flat`` from group rank 0, in place; raises after the group's timeout."""
        self.pg.broadcast(flat, 0).wait(self.timeout)

    def close(self) -> None:
        self.pg.shutdown()
        self.pg = self.store = None
