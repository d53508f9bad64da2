"""Sending half of the broadcast weight transport, on every learner rank (rank 0 sends).

Every rank walks the same buckets (under ZeRO-3 gathering a shard is a collective); rank 0 packs
each gathered bucket into one flat tensor and broadcasts it to the engine workers over the group
of ``rlhf/sync_wire.py``, then frees it before gathering the next, so at most one bucket of full
parameters is held beyond the model itself. The layout is computed once, from parameter shapes
alone (no gather), and sent to the workers when the group is formed.
"""

from __future__ import annotations

import torch

from rlhf.learner.weights import _plan, checkpoint_format, full_parameter_buckets, is_zero3
from rlhf.sync_wire import Member, device_for, join_group, open_listener, pack, plan_buckets
from rlhf.types import BroadcastGroup, WeightBucket


def bucket_layout(model: torch.nn.Module, bucket_bytes: int) -> list[WeightBucket]:
    """The buckets ``full_parameter_buckets(..., include_tied_head=False)`` yields, as layouts.

    The tied output head is left out: the workers copy the embedding into it, as they do for
    files, which saves sending the largest matrix twice.
    """
    def meta(p: torch.nn.Parameter) -> torch.Tensor:
        return torch.empty(tuple(p.ds_shape) if is_zero3(p) else tuple(p.shape), dtype=p.dtype, device="meta")

    # Names and shapes as full_parameter_buckets sends them: in checkpoint format (MoE experts per expert).
    return plan_buckets([[(name, t.shape, t.dtype)
                          for name, t in checkpoint_format(model, {e.name: meta(e.params[0]) for e in bucket}).items()]
                         for bucket in _plan(model, bucket_bytes)])


class WeightSender:
    """One rank's part in the broadcast: rank 0 hosts the group's store and sends; the others only
    take part in the ZeRO-3 gathers."""

    def __init__(self, model: torch.nn.Module, rank: int, backend: str, bucket_bytes: int, timeout_s: float,
                 ip: str) -> None:
        self.model, self.rank, self.backend, self.timeout_s, self.ip = model, rank, backend, timeout_s, ip
        self.bucket_bytes = bucket_bytes
        self.layout = bucket_layout(model, bucket_bytes)
        self.member: Member | None = None
        self.listen_fd, self.port = open_listener(ip) if rank == 0 else (None, 0)

    def join(self, group: BroadcastGroup) -> None:
        """Rank 0 joins (and serves) the group; returns when every engine worker has joined too and
        one small broadcast has reached them all (weight_wire.join_group), naming who never came."""
        if self.rank == 0:
            fd, self.listen_fd = self.listen_fd, None  # the store owns the socket from here on
            self.member = join_group(group, 0, self.ip, self.timeout_s, listen_fd=fd)

    def send(self) -> int:
        """Gather and broadcast every bucket; returns the bytes broadcast (0 on ranks other than 0)."""
        device = device_for(self.backend)
        buckets = full_parameter_buckets(self.model, self.rank, self.bucket_bytes, include_tied_head=False,
                                         device=device)
        total = 0
        for index, tensors in enumerate(buckets):
            if self.rank != 0:
                continue  # this rank's share of the gather is done
            if self.member is None:
                raise RuntimeError("learner rank 0: weight broadcast before the group was formed")
            flat = pack(tensors, self.layout[index], device)
            self.member.broadcast(flat)
            total += sum(s.nbytes for s in self.layout[index].slots)
            del flat
        return total

    def close(self) -> None:
        if self.member is not None:
            self.member.close()
            self.member = None
        if self.listen_fd is not None:
            import os

            os.close(self.listen_fd)
            self.listen_fd = None
