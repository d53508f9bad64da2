"""Where this process runs: the Ray node it is on and that node's address (actors report it)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class NodeInfo:
    node_id: str  # Ray's node id (hex)
    ip: str  # the address Ray registered the node under (127.0.0.1 on a loopback cluster)
    hostname: str


def this_node() -> NodeInfo:
    """The node of the calling process (inside a Ray worker or the driver)."""
    import socket

    import ray

    return NodeInfo(node_id=ray.get_runtime_context().get_node_id(),
                    ip=ray.util.get_node_ip_address(), hostname=socket.gethostname())
