"""The start-up every run shares (``rlhf.train``, ``rlhf.eval``, ``rlhf.distill.sft``, the engines'
teacher answers), in three calls, each where its caller wants it:

1. ``prepare(cfg)``, after the config checks: the run folder and model folders as absolute paths
   and the model resolved to the folder the actors load (storage.py says why absolute);
2. ``start_ray(trainer, logs)``, once the data has been read (bad data fails before Ray starts);
3. ``check_storage(...)``, once the actors run and before any work: every actor sees the run
   folder and the model folder (storage.py's ``check_shared_storage``), else ``StorageError``.

One recipe, so that no entry point skips a step on a cluster (rlhf.distill.sft once did).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhf.cluster.connect import init_ray
from rlhf.cluster.storage import absolute_paths, check_shared_storage, group_actors, local_model_dir
from rlhf.config import Config, TrainerConfig
from rlhf.models import check_model_named, resolve_model_path


@dataclass(frozen=True)
class Prepared:
    """The run's config with absolute paths, and the model folder (or hub id) the actors load."""

    cfg: Config
    model_path: str

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.trainer.output_dir)


def model_folder(name_or_path: str, cache_dir: str | None) -> str:
    """A built-in name, folder or hub id as the actors load it: a local folder as an absolute path
    (another node shares no working directory), a hub id as it is."""
    path = resolve_model_path(name_or_path, cache_dir)
    return local_model_dir(path) or path


def prepare(cfg: Config) -> Prepared:
    """``cfg`` with absolute paths (a copy; storage.py's ``absolute_paths``) and its model's folder."""
    check_model_named(cfg.model.name_or_path)
    cfg = absolute_paths(cfg)
    return Prepared(cfg, model_folder(cfg.model.name_or_path, cfg.model.cache_dir))


def start_ray(trainer: TrainerConfig, logs: Path | None) -> None:
    """Start or join Ray as ``trainer.ray_*`` say. ``logs``: the folder the actors write their log
    files to (rlhf/console.py's ``component_logs``); then Ray forwards no worker output here."""
    init_ray(trainer.ray_address, trainer.ray_bind_host, trainer.ray_num_cpus, log_to_driver=logs is None)


def check_storage(run_dir: Path, model_path: str, engines: Any = None, learner: Any = None,
                  teacher: Any = None) -> None:
    """Every actor of the groups given sees ``run_dir`` and the folder of ``model_path``; otherwise
    ``StorageError`` names each actor, its node and the path it cannot see."""
    check_shared_storage(run_dir, model_path, group_actors(engines, learner, teacher))
