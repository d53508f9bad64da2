"""A `ray start --head` of a test's own, on loopback, for tests that drive the `ray job` CLI as the
README's cluster path does (tests/test_cluster_job*.py).

The head is the only node: with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (which keeps every Ray
listener on 127.0.0.1) `ray start --address` refuses a second node, so a job's driver, engines and
learner ranks all run on the head. The head has its own --temp-dir and ports and is stopped by its
own processes, never by `ray stop` (which would stop every Ray on the machine).

Token authentication is on for the head, the CLI and the job's driver alike, with the test
session's own token ($RAY_AUTH_TOKEN_PATH, set by conftest.py): a machine that never ran Ray has
no ~/.ray/auth_token, and `ray start --head` refuses token mode without one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def head_processes(temp_dir: str) -> list[psutil.Process]:
    """Every process whose command line names the head's temp dir (GCS, raylet, dashboard, ...)."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(temp_dir in arg for arg in p.info["cmdline"] or []):
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


def stop_head(temp_dir: str) -> None:
    """SIGKILL the head's processes and all their descendants (workers, drivers, engines)."""
    procs = head_processes(temp_dir)
    for p in list(procs):
        try:
            procs += p.children(recursive=True)
        except psutil.NoSuchProcess:
            pass
    for p in procs:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)
    assert head_processes(temp_dir) == []


@dataclass(frozen=True)
class JobHead:
    address: str  # the dashboard, http://127.0.0.1:<port>, where `ray job` commands go
    env: dict[str, str]  # the CLI's environment: token auth, loopback only
    temp_dir: str

    def job(self, command: str, *args: str, timeout_s: float = 120) -> subprocess.CompletedProcess:
        """``ray job <command> --address <head> *args`` from the repository root."""
        return subprocess.run([str(BIN / "ray"), "job", command, "--address", self.address, *args], cwd=ROOT,
                              env=self.env, capture_output=True, text=True, timeout=timeout_s)


@contextlib.contextmanager
def job_head(num_cpus: int = 2, head_env: dict[str, str] | None = None) -> Iterator[JobHead]:
    """A head on 127.0.0.1 with ``num_cpus``; ``head_env`` is added to the environment of `ray start`
    only, so every process of the cluster (a job's driver included) inherits it, not the CLI."""
    temp_dir = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    assert os.environ.get("RAY_AUTH_TOKEN_PATH") and Path(os.environ["RAY_AUTH_TOKEN_PATH"]).is_file()
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token",
           "PATH": f"{BIN}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    dash = free_port()
    start = [
        str(BIN / "ray"), "start", "--head", "--node-ip-address", "127.0.0.1", "--dashboard-host", "127.0.0.1",
        "--port", str(free_port()), "--dashboard-port", str(dash), "--temp-dir", temp_dir,
        "--ray-client-server-port", str(free_port()), "--dashboard-agent-listen-port", str(free_port()),
        "--metrics-export-port", str(free_port()), "--runtime-env-agent-port", str(free_port()),
        "--num-cpus", str(num_cpus), "--disable-usage-stats",
    ]
    try:
        started = subprocess.run(start, env={**env, **(head_env or {})}, capture_output=True, text=True,
                                 timeout=120)
        assert started.returncode == 0, started.stdout + started.stderr
        yield JobHead(f"http://127.0.0.1:{dash}", env, temp_dir)
    finally:
        stop_head(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
