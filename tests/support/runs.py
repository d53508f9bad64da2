"""Helpers for tests that run the real training loop: compose a config, start `python -m rlhf.train`
in its own process tree (with its own Ray), watch it, and kill every process of that tree.

In-process runs (``compose``) share the test session's Ray. A subprocess run gets a private
``RAY_TMPDIR`` so its ``ray.init`` starts a fresh local cluster instead of joining the session's,
and ``TrainProcess.kill_tree`` SIGKILLs every process the run ever had (driver, Ray's own
processes, actors, vLLM engine processes), then checks that none is left.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[2]
TOKEN_REWARDS = ROOT / "tests" / "support" / "token_rewards.py"


def compose(*overrides: str):
    """The typed config for ``python -m rlhf.train <overrides>``."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from rlhf.config.store import register_configs, to_object

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return to_object(hydra_compose(config_name="config", overrides=list(overrides)))


def reward_override(spec: str, **kwargs) -> str:
    """``reward.functions=[...]`` with one function given by file path spec ``path.py:Name``."""
    args = ", ".join(f"{k}: {json.dumps(v)}" for k, v in kwargs.items())
    return f"reward.functions=[{{fn: '{spec}', weight: 1.0, kwargs: {{{args}}}}}]"


def axis_reward(model_path: str) -> str:
    """The tests' learnable reward (tests/support/token_rewards.py): rewards vary, so weights move."""
    return reward_override(f"{TOKEN_REWARDS.as_posix()}:EmbeddingAxisShare", model_path=model_path)


def steps_logged(run_dir: Path) -> dict[int, dict]:
    """step -> training metrics of that step (the last record wins, e.g. after a resume)."""
    path = Path(run_dir) / "metrics.jsonl"
    out: dict[int, dict] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a kill
                continue
            if "loss" in record:
                out[record["step"]] = record
    return out


def assert_same_run(straight: Path, other: Path, steps, keys) -> None:
    """Each of ``keys`` exactly equal in both runs at every one of ``steps`` (a redone step's last
    record), and their exported parameters ``torch.equal``."""
    import torch
    from safetensors.torch import load_file

    a, b = steps_logged(straight), steps_logged(other)
    for step in steps:
        for key in keys:
            assert b[step][key] == a[step][key], (step, key, a[step][key], b[step][key])
    x = load_file(str(Path(straight) / "export" / "model.safetensors"))
    y = load_file(str(Path(other) / "export" / "model.safetensors"))
    assert x.keys() == y.keys()
    for name in x:
        assert torch.equal(x[name], y[name]), name


@contextmanager
def kills(plan: list[tuple[Path | None, str]], with_children: bool = True) -> Iterator[list[int]]:
    """While the body runs, for each ``(marker, title)`` of ``plan`` in turn: once ``marker`` exists
    (None: at once), SIGKILL the next descendant seen running ``title`` (``kill_descendant_running``;
    a checkpoint's COMPLETE file as the marker times a kill to the step after it). Yields the pids
    killed so far."""
    killed: list[int] = []
    stop = threading.Event()

    def killer() -> None:
        for marker, title in plan:
            while marker is not None and not Path(marker).exists() and not stop.is_set():
                stop.wait(0.05)
            kill_descendant_running(title, killed, stop, with_children)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    try:
        yield killed
    finally:
        stop.set()
        thread.join()


def descendant_running(title: str) -> psutil.Process | None:
    """The first descendant of this process whose command line shows ``title`` (Ray titles a busy
    actor process ``ray::Class.method``), or None."""
    for p in psutil.Process(os.getpid()).children(recursive=True):
        try:
            if title in " ".join(p.cmdline()):
                return p
        except psutil.NoSuchProcess:
            continue
    return None


def kill_descendant_running(title: str, killed: list[int], stop, with_children: bool = False) -> None:
    """SIGKILL the first descendant running ``title`` (``descendant_running``), and its own children
    when ``with_children``; appends its pid to ``killed``. Polls every 50 ms until then or until
    ``stop`` (a threading.Event) is set."""
    while not stop.is_set():
        if (p := descendant_running(title)) is not None:
            try:
                for q in [p, *(p.children(recursive=True) if with_children else [])]:
                    q.kill()
                killed.append(p.pid)
                return
            except psutil.NoSuchProcess:
                pass
        stop.wait(0.05)


class TrainProcess:
    """``python -m rlhf.train *overrides`` in a new session, with its own Ray (``python_args``
    replaces ``-m rlhf.train`` to run another script the same way)."""

    def __init__(self, overrides: list[str], log_path: Path, env: dict[str, str] | None = None,
                 python_args: tuple[str, ...] = ("-m", "rlhf.train")):
        self.ray_tmp = tempfile.mkdtemp(prefix="rlr-", dir="/tmp")  # short: Ray's socket paths
        full_env = {**os.environ, "RAY_TMPDIR": self.ray_tmp, "HF_HUB_OFFLINE": "1", **(env or {})}
        full_env.pop("RAY_ADDRESS", None)
        self.log_path = Path(log_path)
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, *python_args, *overrides], cwd=ROOT, env=full_env, stdin=subprocess.PIPE,
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        self.seen: dict[int, psutil.Process] = {self.proc.pid: psutil.Process(self.proc.pid)}

    def track(self) -> None:
        """Remember every descendant alive now (they outlive the driver when it is killed)."""
        try:
            for child in psutil.Process(self.proc.pid).children(recursive=True):
                self.seen.setdefault(child.pid, child)
        except psutil.NoSuchProcess:
            pass

    def wait_until(self, condition: Callable[[], bool], timeout_s: float) -> bool:
        """Poll ``condition`` every 0.2 s while the run is alive; False if it exited or timed out."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.track()
            if condition():
                return True
            if self.proc.poll() is not None:
                return condition()
            time.sleep(0.2)
        return False

    def wait(self, timeout_s: float) -> int:
        """The driver's exit code (negative: killed by that signal)."""
        if not self.wait_until(lambda: self.proc.poll() is not None, timeout_s):
            raise TimeoutError(f"training run still going after {timeout_s}s; log: {self.output()[-3000:]}")
        return self.proc.returncode

    def kill_tree(self) -> list[psutil.Process]:
        """SIGKILL the process group and every process seen; returns survivors (should be none)."""
        self.track()
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for p in self.seen.values():
            try:
                p.kill()  # psutil checks the pid still belongs to the process it saw
            except psutil.NoSuchProcess:
                pass
        self.proc.wait(timeout=30)
        _, alive = psutil.wait_procs(list(self.seen.values()), timeout=30)
        return alive

    def output(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def close(self) -> list[psutil.Process]:
        """Kill the whole tree and remove its Ray folder; returns survivors (should be none)."""
        alive = self.kill_tree()
        self.proc.stdin.close()
        self._log.close()
        shutil.rmtree(self.ray_tmp, ignore_errors=True)
        return alive


def run_to_success(overrides: list[str], log_path: Path, timeout_s: float = 900) -> str:
    """``python -m rlhf.train *overrides`` in its own process tree, which must exit 0; its output."""
    run = TrainProcess(overrides, log_path)
    try:
        code = run.wait(timeout_s=timeout_s)
        log = run.output()
    finally:
        run.close()
    assert code == 0, log[-4000:]
    return log


def run_with_fault(overrides: list[str], log_path: Path, fault: str, timeout_s: float = 900) -> tuple[int, list]:
    """The same run with $RLHF_FAULT=``fault``; (exit code, processes that outlived the tree kill)."""
    run = TrainProcess(overrides, log_path, env={"RLHF_FAULT": fault})
    try:
        code = run.wait(timeout_s=timeout_s)
    finally:
        survivors = run.close()
    return code, survivors
