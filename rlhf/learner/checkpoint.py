"""Atomic, verified run checkpoints: ``<run>/checkpoints/step-N``.

A save writes everything into ``.tmp-step-N``, then a manifest (every file with its size and
SHA-256) as the marker ``COMPLETE``, last, and only then renames the folder to ``step-N``. So a
``step-N`` folder is always whole, a crash leaves at most a ``.tmp-*`` folder that nothing reads,
and older checkpoints are pruned (to the last ``keep_last``) only after the new one is in place.

Layout of ``step-N``:
- ``deepspeed/``: DeepSpeed's own files (``mp_rank_00_model_states.pt``, one
  ``*zero_pp_rank_<r>_mp_rank_00_optim_states.pt`` per rank: model, optimizer and LR-scheduler
  state). DeepSpeed writes these with ``torch.save`` and reads them with ``torch.load(...,
  weights_only=False)``, i.e. they are pickles; DeepSpeed also drops a copy of its
  ``zero_to_fp32.py`` beside them.
- ``client_state.json``: our run state (step, RNG states, data position, ...), JSON only.
- ``config.yaml``: the run's composed config, when the client state carries one under ``config``.
- ``COMPLETE``: the manifest, written last.

Trust: checkpoints are artefacts of our own runs, not a format for exchanging models (use the HF
export for that). Because DeepSpeed's files are pickles, ``read_checkpoint`` refuses a folder
whose files differ from its manifest in any way (a file added, removed, resized or altered)
before anything in it is unpickled. The manifest proves integrity, not origin (whoever can write
the folder can rewrite it), so before DeepSpeed's own unrestricted ``torch.load`` sees a file,
``check_pickles`` test-loads every ``.pt`` file with torch's weights-only unpickler, which admits
tensors, containers and the few DeepSpeed classes in ``DEEPSPEED_PICKLE_CLASSES`` and refuses
anything that could run code.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

from rlhf import faults

MARKER = "COMPLETE"
CLIENT_STATE = "client_state.json"
CONFIG_YAML = "config.yaml"
_STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint folder that is incomplete or does not match its manifest."""


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step-{step}"


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir() and (p / MARKER).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_complete(root: str | Path) -> Path | None:
    """The complete checkpoint with the highest step under ``root``, or None."""
    found = complete_checkpoints(Path(root))
    return found[-1][1] if found else None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MARKER)


def _manifest(folder: Path) -> dict[str, dict]:
    return {
        str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in _files(folder)
    }


def _write_durable(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    root: Path,
    step: int,
    write_model_state: Callable[[Path], None],
    client_state: dict,
    keep_last: int,
) -> Path:
    """Write checkpoint ``step`` atomically under ``root`` and prune to the last ``keep_last``.

    ``write_model_state(folder)`` writes the learner's files (all ranks) into ``folder``; it may
    return each rank's ``RankFiles``, which must then all be in ``folder`` (the manifest lists them
    under ``ranks``, so a checkpoint missing a rank's shard is refused naming that rank).
    ``client_state`` must be JSON-serialisable (the RNG states of rlhf.run.rng are).
    """
    if keep_last < 1:
        raise ValueError(f"trainer.keep_last={keep_last} must be >= 1")
    if step < 0:
        raise ValueError(f"checkpoint step={step} must be >= 0")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    # Serialise first: a state that is not JSON fails here, before any heavy write.
    state_text = json.dumps(client_state, indent=1, allow_nan=True) + "\n"
    tmp = root / f".tmp-step-{step}"
    if tmp.exists():  # left by a save that crashed; never read
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        shards = write_model_state(tmp)
        faults.crash("save_crash", step)  # tests only: a kill in the middle of a save
        faults.stall("save_stall", step)  # tests only: a job stopped in the middle of a save
        _write_durable(tmp / CLIENT_STATE, state_text)
        if isinstance(client_state.get("config"), dict):
            import yaml

            _write_durable(tmp / CONFIG_YAML, yaml.safe_dump(client_state["config"], sort_keys=False))
        manifest = {"step": step, "files": _manifest(tmp)}
        if shards:  # after every rank wrote: each rank's shard must be in the folder this driver sees
            manifest["ranks"] = _check_shards(tmp, shards)
        _write_durable(tmp / MARKER, json.dumps(manifest, indent=1) + "\n")  # last: marks it complete
        final = step_dir(root, step)
        old = None
        if final.exists():  # saving the same step again (e.g. after a resume): swap, then delete
            old = root / f".old-step-{step}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    for _, path in complete_checkpoints(root)[:-keep_last]:
        shutil.rmtree(path)
    return final


def _check_shards(folder: Path, shards: list) -> dict[str, list[str]]:
    """rank -> its shard files, each checked to be in ``folder`` as the rank wrote it (``RankFiles``
    from every rank). A rank on a node whose folder is not this one's fails the save, named."""
    for s in shards:
        for name, size in s.files.items():
            p = folder / name
            if not p.is_file() or p.stat().st_size != size:
                raise CheckpointError(
                    f"learner rank {s.rank} on node {s.node.ip} (host {s.node.hostname}) wrote {name} "
                    f"({size} bytes) into {folder}, but this driver does not see it there: the run folder "
                    "is not on storage shared by every node; the checkpoint is not marked complete"
                )
    return {str(s.rank): sorted(s.files) for s in shards}


def verify_checkpoint(folder: Path) -> dict:
    """The manifest of ``folder`` after checking every file against it; raises CheckpointError."""
    folder = Path(folder)
    marker = folder / MARKER
    if not marker.is_file():
        raise CheckpointError(f"{folder} is not a complete checkpoint (no {MARKER} marker)")
    manifest = json.loads(marker.read_text())
    expected: dict[str, dict] = manifest["files"]
    present = {str(p.relative_to(folder)): p for p in _files(folder)}
    extra = sorted(set(present) - set(expected))
    missing = sorted(set(expected) - set(present))
    owners = {f: r for r, files in manifest.get("ranks", {}).items() for f in files}
    lost = sorted({owners[f] for f in missing if f in owners}, key=int)
    if lost:
        raise CheckpointError(
            f"{folder} lacks the shard of learner rank(s) {', '.join(lost)}: missing files "
            f"{[f for f in missing if f in owners]}; refusing to resume from it"
        )
    if extra or missing:
        raise CheckpointError(
            f"{folder} does not match its manifest: unexpected files {extra}, missing files {missing}; "
            "refusing to load it (DeepSpeed's files are pickles)"
        )
    for name, meta in expected.items():
        p = present[name]
        if p.stat().st_size != meta["bytes"] or _sha256(p) != meta["sha256"]:
            raise CheckpointError(f"{folder}/{name} was changed after the checkpoint was written; refusing to load it")
    return manifest


# Classes DeepSpeed's checkpoint pickles name beyond torch's weights-only set (seen in ZeRO-0..3
# checkpoints: the loss scaler, the partition-fragment address, the ZeRO stage enum).
DEEPSPEED_PICKLE_CLASSES = (
    "deepspeed.runtime.fp16.loss_scaler:LossScaler",
    "deepspeed.runtime.fp16.loss_scaler:DynamicLossScaler",
    "deepspeed.utils.tensor_fragment:fragment_address",
    "deepspeed.runtime.zero.config:ZeroStageEnum",
)


def has_zero_partitions(deepspeed_dir: Path) -> bool:
    """A DeepSpeed folder saved by ZeRO ranks (``*zero_pp_rank_<r>_*_optim_states.pt`` each), not
    by a learner without ZeRO (its module and optimizer whole in ``mp_rank_00_model_states.pt``)."""
    return any(Path(deepspeed_dir).glob("*zero_pp_rank_*_optim_states.pt"))


def safe_load(path: Path):
    """``torch.load`` with the weights-only unpickler, admitting ``DEEPSPEED_PICKLE_CLASSES`` too."""
    import importlib

    import torch

    allowed = []
    for spec in DEEPSPEED_PICKLE_CLASSES:
        module, name = spec.split(":")
        allowed.append(getattr(importlib.import_module(module), name))
    with torch.serialization.safe_globals(allowed):
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def check_pickles(folder: Path) -> None:
    """Load every ``.pt`` file under ``folder`` with torch's weights-only unpickler (nothing can
    run); raises CheckpointError naming the file when one needs anything else."""
    for path in sorted(Path(folder).rglob("*.pt")):
        try:
            safe_load(path)
        except Exception as e:
            raise CheckpointError(
                f"{path} is not a plain tensor checkpoint ({type(e).__name__}: {str(e)[:300]}); "
                "refusing to unpickle it"
            ) from e


def read_checkpoint(folder: Path) -> dict:
    """Verify ``folder`` and return its client state (JSON)."""
    verify_checkpoint(folder)
    return json.loads((Path(folder) / CLIENT_STATE).read_text())


def open_checkpoint(folder: Path) -> dict:
    """``read_checkpoint`` for a folder DeepSpeed is about to unpickle (a resume, an export): the
    manifest verified, then every pickle checked (``check_pickles``); returns the client state."""
    state = read_checkpoint(folder)
    check_pickles(folder)
    return state
