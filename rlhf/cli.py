"""Hydra entry points: compose conf/, hand the typed config to a run, report config errors in one line.

With trainer.console=progress the run's own lines reach the terminal and its components' logs go to
files (rlhf/console.py); an error is shown on the terminal with where those logs are.
"""

from __future__ import annotations

import sys
import traceback
from pathlib import Path
from typing import Any, Callable

import hydra
from omegaconf import DictConfig

from rlhf.config import Config, ConfigError
from rlhf.config.store import register_configs, to_object
from rlhf.console import component_logs, driver_console, where_logs_are

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")


def hydra_main(run: Callable[[Config], Any]) -> Callable[[], None]:
    """A ``main()`` that composes the config from the command line and calls ``run(cfg)``."""
    register_configs()

    @hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
    def main(dcfg: DictConfig) -> None:
        logs = None
        try:
            cfg = to_object(dcfg)
            logs = None if cfg.plan else component_logs(cfg.trainer)  # a plan starts nothing
            with driver_console(logs):
                run(cfg)
        except ConfigError as err:
            print(f"config error: {err}", file=sys.stderr)
            sys.exit(2)
        except Exception:
            if logs is None:
                raise  # trainer.console=full: hydra reports it, as it always has
            traceback.print_exc()  # the terminal is back: the error, then where the logs are
            print(where_logs_are(logs), file=sys.stderr)
            sys.exit(1)

    return main
