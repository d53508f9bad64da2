"""Hydra entry points: compose conf/, hand the typed config to a run, report config errors in one line."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable

import hydra
from omegaconf import DictConfig

from rlhf.config import Config, ConfigError
from rlhf.config.store import register_configs, to_object

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")


def hydra_main(run: Callable[[Config], Any]) -> Callable[[], None]:
    """A ``main()`` that composes the config from the command line and calls ``run(cfg)``."""
    register_configs()

    @hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
    def main(dcfg: DictConfig) -> None:
        try:
            run(to_object(dcfg))
        except ConfigError as err:
            print(f"config error: {err}", file=sys.stderr)
            sys.exit(2)

    return main
