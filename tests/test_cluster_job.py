"""The README's cluster path for real: `ray start --head` on loopback, then `ray job submit
--working-dir . -- python -m rlhf.train ...` finishes with an exported model. About 95 s on the 2-core CI machine, so it runs in `make test`.

Here the head is the only node: with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (which keeps every Ray
listener on 127.0.0.1) `ray start --address` refuses a second node, so the job's driver, engine and
learner rank all run on the head. The head has its own --temp-dir and ports and is stopped by its
own processes, never by `ray stop` (which would stop every Ray on the machine).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def head_processes(temp_dir: str) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(temp_dir in arg for arg in p.info["cmdline"] or []):
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


def stop_head(temp_dir: str) -> None:
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


def test_ray_job_submit_trains_and_exports(tmp_path):
    temp_dir = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    # Token authentication on for the head, the CLI and the job's driver alike, with the test
    # session's own token ($RAY_AUTH_TOKEN_PATH, set by conftest.py): a machine that never ran Ray
    # has no ~/.ray/auth_token, and `ray start --head` refuses token mode without one.
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
        "--num-cpus", "2", "--disable-usage-stats",
    ]
    out_dir = tmp_path / "run"
    try:
        started = subprocess.run(start, env=env, capture_output=True, text=True, timeout=120)
        assert started.returncode == 0, started.stdout + started.stderr
        submit = [
            str(BIN / "ray"), "job", "submit", "--address", f"http://127.0.0.1:{dash}", "--working-dir", ".",
            "--", "python", "-m", "rlhf.train", "+experiment=tiny_smoke", f"trainer.output_dir={out_dir}",
            "trainer.eval_prompts=0", "trainer.tensorboard=false", "reward.executor=ray",
        ]
        t0 = time.monotonic()
        job = subprocess.run(submit, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
        tail = "\n".join((job.stdout + job.stderr).splitlines()[-40:])
        print(" ".join(submit), f"\n({time.monotonic() - t0:.0f}s)\n{tail}")
        assert job.returncode == 0, tail
        assert "succeeded" in job.stdout, tail
        assert (out_dir / "export" / "model.safetensors").is_file(), tail
        assert (out_dir / "checkpoints" / "step-2" / "COMPLETE").is_file()
    finally:
        stop_head(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
