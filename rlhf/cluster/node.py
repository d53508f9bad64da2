"""Where this process runs: the Ray node it is on and that node's address (actors report it)."""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class NodeInfo:
    node_id: str  # Ray's node id (hex)
    ip: str  # the address Ray registered the node under (127.0.0.1 on a loopback cluster)
    hostname: str
    gpu_ids: tuple[str, ...] = ()  # the GPUs Ray gave the calling actor (its node's ids); () on CPU


def this_node() -> NodeInfo:
    """The node of the calling process (inside a Ray worker or the driver)."""
    import ray

    context = ray.get_runtime_context()
    gpus = tuple(str(g) for g in context.get_accelerator_ids().get("GPU", []))
    return NodeInfo(node_id=context.get_node_id(), ip=ray.util.get_node_ip_address(),
                    hostname=socket.gethostname(), gpu_ids=gpus)


def listen_on(addr: str, port: int, purpose: str) -> socket.socket:
    """A TCP socket bound to ``addr`` only and listening; ``port`` 0: a free port the OS picks.
    A store handed this socket listens on that one address, not on every interface."""
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((addr, port))
        sock.listen()
    except OSError as e:
        sock.close()
        raise OSError(f"{purpose}: cannot listen on {addr}:{port} ({e})") from e
    return sock


@dataclass(frozen=True)
class SharedPath:
    """A file every node must see at the same absolute path (rlhf/cluster/storage.py's start-up check)."""

    path: str  # absolute
    what: str  # the config key it comes from, for the error: "trainer.output_dir", "model.name_or_path"
    token: str | None = None  # the content the file must hold; None: it need only be readable


def unseen(paths: list[SharedPath]) -> list[str]:
    """What this process cannot see of ``paths``, one line each (empty: it sees them all).

    A token proves it is the driver's folder and not a same-named local one on this node.
    """
    problems = []
    for p in paths:
        try:
            with open(p.path, encoding="utf-8") as f:
                text = f.read(4096) if p.token is not None else f.read(1)
        except OSError as e:
            problems.append(f"cannot read {p.what} file {p.path} ({type(e).__name__}: {e.strerror or e})")
            continue
        if p.token is not None and text.strip() != p.token:
            problems.append(f"{p.path} ({p.what}) holds another run's marker: a different folder by the same path")
    return problems


@dataclass(frozen=True)
class RankFiles:
    """The files one learner rank wrote into a shared folder (its checkpoint shard), as it saw them."""

    rank: int
    node: NodeInfo
    files: dict[str, int]  # path relative to the folder -> bytes


def files_where(folder: Path, keep) -> dict[str, int]:
    """relative path -> bytes of the files under ``folder`` whose name ``keep(name)`` accepts."""
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*"))
            if p.is_file() and keep(p.name)}
