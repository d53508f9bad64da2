"""The learner ranks' rendezvous: a torch.distributed TCPStore listening on learner.master_addr only.

When torch's TCPStore server makes its own socket it listens on every interface ("::"), whatever
host it is given. Handed a socket already bound to ``master_addr`` (``master_listen_fd``) it
listens there only, so on one machine (master_addr 127.0.0.1, the default) nothing outside can
reach it. Rank 0 hosts the store; DeepSpeed's init_distributed then finds the group initialised.
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta


def init_process_group(backend: str, master_addr: str, port: int, rank: int, world_size: int,
                       timeout: timedelta) -> None:
    import torch
    import torch.distributed as dist

    listen_fd = None
    if rank == 0:
        family = socket.AF_INET6 if ":" in master_addr else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((master_addr, port))
        sock.listen()
        listen_fd = sock.detach()  # the store owns the socket from here on
    store = dist.TCPStore(master_addr, port, world_size, is_master=rank == 0, timeout=timeout,
                          master_listen_fd=listen_fd)
    kwargs = {}
    if backend == "nccl" and world_size > 1:  # as DeepSpeed does: bind the rank's GPU eagerly
        kwargs["device_id"] = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout, **kwargs)
