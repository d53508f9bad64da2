"""The learner ranks' rendezvous: a torch.distributed TCPStore on rank 0's node, listening on one address.

Start-up has two phases (rlhf/learner/group.py). First rank 0 chooses the point: its own node's
address (``this_node().ip``; ``learner.master_addr`` overrides it) and a port, bound there at once
(``open_listener``; port 0 lets the OS pick a free one) and held, so nothing can take the port
before the store does. Then every rank joins there (``init_process_group``); ranks on other nodes
dial rank 0's node, not their own loopback.

When torch's TCPStore server makes its own socket it listens on every interface ("::"), whatever
host it is given. Handed the socket already bound to the point's address (``master_listen_fd``) it
listens there only, so on one machine (address 127.0.0.1) nothing outside can reach it. Rank 0
hosts the store; DeepSpeed's init_distributed then finds the group initialised.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

from rlhf.cluster.node import listen_on


@dataclass(frozen=True)
class RendezvousPoint:
    """Where rank 0's store listens; every rank dials it."""

    addr: str
    port: int


def open_listener(addr: str, port: int = 0) -> socket.socket:
    """A TCP socket bound to ``addr`` only and listening; ``port`` 0: a free port the OS picks."""
    return listen_on(addr, port, "learner rendezvous")


def init_process_group(backend: str, point: RendezvousPoint, rank: int, world_size: int, timeout: timedelta,
                       listener: socket.socket | None = None) -> None:
    """Join the default process group at ``point``; rank 0 hosts the store on ``listener`` (the socket
    ``open_listener`` gave it when it chose the point), or binds the point itself if it has none."""
    import torch
    import torch.distributed as dist

    if dist.is_initialized():  # a later rank object in the same process (scripts/gpu_learner_check.py)
        if listener is not None:
            listener.close()
        return
    listen_fd = None
    if rank == 0:
        sock = listener if listener is not None else open_listener(point.addr, point.port)
        listen_fd = sock.detach()  # the store owns the socket from here on
    store = dist.TCPStore(point.addr, point.port, world_size, is_master=rank == 0, timeout=timeout,
                          master_listen_fd=listen_fd)
    kwargs = {}
    if backend == "nccl" and world_size > 1:  # as DeepSpeed does: bind the rank's GPU eagerly
        kwargs["device_id"] = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout, **kwargs)
