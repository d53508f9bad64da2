"""What the terminal shows: our progress lines, evaluations, the cost summary, the run folder and errors.

With ``trainer.console=progress`` (the default) every component's own log goes to a file in
``<trainer.output_dir>/logs/``, written at the file-descriptor level so that C/C++ output and the
processes a component starts (vLLM's engine core) land there too:

- ``engine-<i>.log``: rollout engine i (its Ray actor, and vLLM's processes, which inherit it),
- ``learner-rank-<r>.log``: learner rank r (DeepSpeed, transformers, torch),
- ``driver.log``: this process's libraries (Ray, datasets, warnings), our own lines as well.

Each actor is handed its path (``redirect_output`` at the top of its constructor); Ray forwards
nothing from its workers (``init_ray(log_to_driver=False)``). A component's failure still reaches
the terminal as the exception the driver raises (naming the engine or rank), followed by where the
logs are. ``trainer.console=full`` leaves everything live on the terminal and writes no log files.
"""

from __future__ import annotations

import io
import logging
import os
import sys
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

from rlhf.config import ConfigError, TrainerConfig

CONSOLE_MODES = ("progress", "full")
# Our own packages: their warnings are addressed to the user (e.g. prompts dropped as too long).
OUR_LOGGERS = ("rlhf", "rollouts", "rewards")


def component_logs(cfg: TrainerConfig) -> Path | None:
    """The folder for the components' log files; None when they stay live (trainer.console=full)."""
    if cfg.console not in CONSOLE_MODES:  # here too: rlhf.distill.sft skips rlhf.validation
        raise ConfigError(f"trainer.console={cfg.console!r} is not one of {list(CONSOLE_MODES)}")
    return Path(cfg.output_dir) / "logs" if cfg.console == "progress" else None


def log_file(logs: Path | None, name: str) -> str | None:
    """``<logs>/<name>.log`` as a string for an actor's constructor, or None (no redirection)."""
    return None if logs is None else str(logs / f"{name}.log")


def redirect_output(path: str) -> None:
    """Point this process's stdout and stderr (fds 1 and 2) at ``path``, appending.

    At the descriptor level, not ``sys.stdout``: native code writes to the fds directly, and child
    processes (vLLM's engine core when rollout.reproducible=false) inherit them.
    """
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.write(fd, f"=== pid {os.getpid()} started {time.strftime('%Y-%m-%d %H:%M:%S')} ===\n".encode())
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


class _Tee(io.TextIOBase):
    """print() in the driver: to the terminal and to driver.log. Libraries may keep a reference past
    the run (Ray's colorama does, for an exit hook): ``detach_to`` then points it at plain stdout."""

    def __init__(self, terminal, log) -> None:
        self.terminal, self.log = terminal, log

    def write(self, text: str) -> int:
        self.terminal.write(text)
        if self.log is not None:
            self.log.write(text)
        return len(text)

    def flush(self) -> None:
        self.terminal.flush()
        if self.log is not None:
            self.log.flush()

    def detach_to(self, stream) -> None:
        self.terminal, self.log = stream, None

    def isatty(self) -> bool:
        return self.terminal.isatty()

    def fileno(self) -> int:
        return self.terminal.fileno()


@contextmanager
def driver_console(logs: Path | None):
    """Inside: print() and our packages' warnings reach the terminal; all else this process writes
    (library logging, warnings, progress bars, Ray's native messages) goes to ``logs``/driver.log.
    On an error the traceback is logged too, and on the way out the terminal is restored, so the
    caller can report the error there. ``logs=None``: nothing changes."""
    if logs is None:
        yield
        return
    logs.mkdir(parents=True, exist_ok=True)
    path = logs / "driver.log"
    sys.stdout.flush()
    sys.stderr.flush()
    terminal = os.fdopen(os.dup(1), "w", buffering=1)
    terminal_err = os.fdopen(os.dup(2), "w", buffering=1)
    redirect_output(str(path))
    log = open(path, "a", buffering=1, encoding="utf-8")
    ours = logging.StreamHandler(terminal_err)
    ours.setLevel(logging.WARNING)
    ours.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    for name in OUR_LOGGERS:
        logging.getLogger(name).addHandler(ours)
    stdout = sys.stdout
    sys.stdout = tee = _Tee(terminal, log)
    print(f"component logs: {logs}/ (trainer.console=full shows them here instead)", flush=True)
    try:
        yield
    except BaseException:
        traceback.print_exc()  # into driver.log, beside what led to it
        raise
    finally:
        sys.stdout = stdout
        tee.detach_to(stdout)
        for name in OUR_LOGGERS:
            logging.getLogger(name).removeHandler(ours)
        sys.stderr.flush()
        os.dup2(terminal.fileno(), 1)
        os.dup2(terminal_err.fileno(), 2)
        for stream in (log, terminal, terminal_err):
            stream.close()


def where_logs_are(logs: Path) -> str:
    """The line that follows an error on the terminal: the folder, and the files it holds."""
    names = sorted(p.name for p in logs.glob("*.log")) if logs.is_dir() else []
    return f"full logs of the run's components: {logs}/ ({', '.join(names)})"
