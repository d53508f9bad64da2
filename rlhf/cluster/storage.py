"""The storage rule of a run on a cluster: one run folder and one model folder, seen by every node.

Learner ranks write checkpoint shards and the export into ``trainer.output_dir``; engines and ranks
write their logs there and load the model from its folder. On a cluster those are only the same
files when they sit on storage every node mounts at the same path, and when the paths are absolute
(the driver's working directory means nothing on another node, and under ``ray job submit`` it is
a temporary copy of the project). So at start-up:

1. ``absolute_paths``: ``trainer.output_dir``, ``model.cache_dir`` and a local ``model.name_or_path``
   become absolute (a hub id stays a hub id: each node fetches it into its own HF cache);
2. ``check_shared_storage``, once the actors run and before any training: the driver writes a
   marker with a random token into the run folder, and every learner rank and engine must read
   that token and the model folder's ``config.json``; otherwise ``StorageError`` names each actor,
   its node and the path it cannot see.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rlhf.cluster.node import NodeInfo, SharedPath
from rlhf.config import Config

MARKER = ".storage-check"
_CHECK_TIMEOUT_S = 120.0  # the actors are up already: reading two small files takes milliseconds


class StorageError(RuntimeError):
    """An actor's node cannot see the run folder or the model folder; names actor, node and path."""


def absolute(path: str) -> str:
    return os.path.abspath(os.path.expanduser(path))


def absolute_paths(cfg: Config) -> Config:
    """A copy of ``cfg`` whose run folder, model cache and local model folders (the policy's and an
    open teacher's) are absolute paths."""
    model = cfg.model

    def local(name: str | None) -> str | None:  # a local folder; otherwise a built-in name or a hub id
        return absolute(name) if name and Path(name).expanduser().exists() else name

    cache = absolute(model.cache_dir) if model.cache_dir else model.cache_dir
    return dataclasses.replace(
        cfg,
        trainer=dataclasses.replace(cfg.trainer, output_dir=absolute(cfg.trainer.output_dir)),
        model=dataclasses.replace(model, name_or_path=local(model.name_or_path), cache_dir=cache),
        teacher=dataclasses.replace(cfg.teacher, model=local(cfg.teacher.model)),
    )


def local_model_dir(model_path: str) -> str | None:
    """The absolute model folder when ``model_path`` (resolved) is a local folder; None for a hub id."""
    return absolute(model_path) if Path(model_path).expanduser().is_dir() else None


def group_actors(engines: Any = None, learner: Any = None, teacher: Any = None) -> list[tuple[str, Any]]:
    """(name, actor handle) of every learner rank, rollout engine and teacher engine, as errors name them."""
    named = [(f"learner rank {r}", a) for r, a in enumerate(getattr(learner, "ranks", []))]
    named += [(f"teacher engine {i}", e) for i, e in enumerate(getattr(getattr(teacher, "group", None), "engines", []))]
    role = getattr(engines, "role", "rollout")  # an EngineGroup of the teacher's answers says "teacher"
    return named + [(f"{role} engine {i}", e) for i, e in enumerate(getattr(engines, "engines", []))]


def check_shared_storage(run_dir: Path, model_path: str, actors: Sequence[tuple[str, Any]],
                         timeout_s: float = _CHECK_TIMEOUT_S) -> None:
    """Every actor (``group_actors``) must see the run folder and the model folder; else StorageError."""
    import ray

    run_dir = Path(absolute(str(run_dir)))
    run_dir.mkdir(parents=True, exist_ok=True)
    token = secrets.token_hex(16)
    marker = run_dir / MARKER
    marker.write_text(token + "\n")
    paths = [SharedPath(str(marker), "trainer.output_dir", token)]
    model_dir = local_model_dir(model_path)
    if model_dir is not None:
        paths.append(SharedPath(str(Path(model_dir) / "config.json"), "model.name_or_path"))
    try:
        refs = [(name, a.node.remote(), a.can_see.remote(paths)) for name, a in actors]
        failures = []
        for name, node_ref, seen_ref in refs:
            node: NodeInfo
            node, problems = ray.get([node_ref, seen_ref], timeout=timeout_s)
            failures += [f"{name} on node {node.ip} (host {node.hostname}, node id {node.node_id[:12]}) "
                         f"{problem}" for problem in problems]
    finally:
        marker.unlink(missing_ok=True)
    if failures:
        raise StorageError(
            "shared storage check failed before training:\n  " + "\n  ".join(failures) + "\n"
            f"trainer.output_dir ({run_dir}) and a local model folder ({model_dir}) must be on storage "
            "every node mounts at the same absolute path (README, Launch on a cluster)"
        )
