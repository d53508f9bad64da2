"""Teacher client against a real chat-completions HTTP server on loopback.

The server below speaks the OpenAI chat-completions protocol (stdlib http.server, port 0) and
answers "What is A + B?" with "A + B = S", getting S wrong (A + B + 1) when A is odd, so a reward
can tell right from wrong. Usage counts words: prompt_tokens = words in all message contents,
completion_tokens = words in the answer. It can be told to fail (status codes, Retry-After, slow
answers) and counts every request it receives.
"""

from __future__ import annotations

import json
import re
import secrets
import threading
import time
import traceback
from http.server import BaseHTTPRequestHandler

import pytest

from rlhf.config import ConfigError, LedgerConfig, TeacherConfig
from rlhf.chat.client import EndpointError, parse_retry_after, retry_delay
from rlhf.distill.teacher_answers import CACHE_FILE, ask_teacher, from_jsonl
from rlhf.run.ledger import CostLedger
from tests.support.json_http import LoopbackServer, send_json

KEY_ENV = "TEST_TEACHER_KEY"


class ChatServer:
    """A chat-completions endpoint at http://127.0.0.1:<port>/v1 that can be scripted to fail."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests = 0
        self.times: list[float] = []
        self.auth: list[str | None] = []
        self.bodies: list[dict] = []
        # Consumed one per request before answering: ("status", code, retry_after) or ("slow", s).
        self.script: list[tuple] = []
        # Prompts containing this text always get this status (a row that never succeeds).
        self.fail_text: tuple[str, int] | None = None
        # Failures answer with a body that quotes the request's Authorization header, as a careless
        # server might: the client must not pass it on.
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests += 1
                    server.times.append(time.monotonic())
                    server.auth.append(self.headers.get("Authorization"))
                    server.bodies.append(body)
                    action = server.script.pop(0) if server.script else None
                if self.path != "/v1/chat/completions":
                    return self._send(404, {"error": {"message": f"no route {self.path}"}})
                text = body["messages"][-1]["content"]
                if server.fail_text and server.fail_text[0] in text:
                    action = ("status", server.fail_text[1], None)
                if action and action[0] == "status":
                    _, code, retry_after = action
                    echo = f"rejected request with Authorization: {self.headers.get('Authorization')}"
                    headers = {"Retry-After": retry_after} if retry_after is not None else {}
                    return self._send(code, {"error": {"message": echo}}, headers)
                if action and action[0] == "slow":
                    time.sleep(action[1])
                a, b = map(int, re.findall(r"\d+", text)[:2])
                answer = f"{a} + {b} = {a + b + (a % 2)}"
                words = sum(len(m["content"].split()) for m in body["messages"])
                self._send(200, {
                    "id": "cmpl-1", "object": "chat.completion", "model": body["model"],
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": answer}}],
                    "usage": {"prompt_tokens": words, "completion_tokens": len(answer.split()),
                              "total_tokens": words + len(answer.split())},
                })

            def _send(self, code, payload, headers=None):
                send_json(self, code, payload, headers)

        self.http = LoopbackServer(Handler)
        self.base_url = self.http.base_url

    def close(self):
        self.http.close()


@pytest.fixture
def server():
    srv = ChatServer()
    yield srv
    srv.close()


@pytest.fixture
def api_key(monkeypatch) -> str:
    key = "sk-test-" + secrets.token_hex(16)
    monkeypatch.setenv(KEY_ENV, key)
    return key


def teacher_cfg(server: ChatServer, **overrides) -> TeacherConfig:
    cfg = TeacherConfig(base_url=server.base_url, model="teacher-x", api_key_env=KEY_ENV,
                        system_prompt="Answer briefly.", temperature=0.0, max_tokens=32,
                        max_concurrency=4, timeout_s=5.0, max_retries=3, backoff_base_s=0.01,
                        backoff_max_s=2.0)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


ROWS = [
    {"prompt": "What is 2 + 3?", "answer": "5"},
    {"prompt": "What is 4 + 4?", "answer": "8"},
    {"prompt": "What is 3 + 6?", "answer": "9"},  # A odd: the teacher says 10
]


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_collects_answers_and_counts_usage(server, api_key, tmp_path):
    ledger = CostLedger(tmp_path, LedgerConfig(device_kind="cpu", save_every_s=0.0), "collect")
    result = ask_teacher(ROWS, teacher_cfg(server), tmp_path, ledger=ledger)
    ledger.close()

    records = read_jsonl(result.dataset_path)
    assert [r["completion"] for r in records] == ["2 + 3 = 5", "4 + 4 = 8", "3 + 6 = 10"]
    assert records[0]["messages"] == [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "2 + 3 = 5"},
    ]
    assert records[2]["answer"] == "9" and records[2]["prompt"] == "What is 3 + 6?"
    # prompt: "Answer briefly." (2 words) + "What is A + B?" (5 words) = 7 per row, 21 in all;
    # completion: "A + B = S" = 5 words per row, 15 in all.
    assert records[0]["usage"] == {"prompt_tokens": 7, "completion_tokens": 5}
    stats = result.stats
    assert (stats.prompt_tokens, stats.completion_tokens) == (21, 15)
    assert (stats.paid, stats.cache_hits, stats.http_requests, stats.retries) == (3, 0, 3, 0)
    ledger_totals = json.loads((tmp_path / "ledger.json").read_text())["totals"]
    assert ledger_totals["teacher_prompt_tokens"] == 21
    assert ledger_totals["teacher_completion_tokens"] == 15
    assert ledger_totals["teacher_requests"] == 3
    # The request carried the key and the configured sampling.
    assert server.auth == [f"Bearer {api_key}"] * 3
    assert {b["model"] for b in server.bodies} == {"teacher-x"}
    assert {(b["temperature"], b["max_tokens"], b["n"]) for b in server.bodies} == {(0.0, 32, 1)}


def test_retries_429_500_and_timeout_then_succeeds(server, api_key, tmp_path):
    # Attempt 1: 429 asking for 1 s; 2: a 500; 3: answers after 2 s (the client gives up at 0.5 s);
    # 4: answers.
    server.script = [("status", 429, "1"), ("status", 500, None), ("slow", 2.0)]
    result = ask_teacher(ROWS[:1], teacher_cfg(server, timeout_s=0.5), tmp_path)
    assert read_jsonl(result.dataset_path)[0]["completion"] == "2 + 3 = 5"
    assert server.requests == 4
    assert (result.stats.http_requests, result.stats.retries, result.stats.paid) == (4, 3, 1)
    # Retry-After was honoured: the back-off alone would have waited at most 0.01 s.
    assert server.times[1] - server.times[0] >= 0.9


def test_gives_up_after_max_retries_naming_the_row(server, api_key, tmp_path):
    server.fail_text = ("9 + 9", 503)
    rows = [ROWS[0], {"prompt": "What is 9 + 9?", "answer": "18"}]
    # One at a time so row 0 is answered (and cached) before row 1 fails.
    cfg = teacher_cfg(server, max_retries=2, max_concurrency=1)
    with pytest.raises(EndpointError) as err:
        ask_teacher(rows, cfg, tmp_path)
    message = str(err.value)
    assert message.startswith("prompt row 1: gave up after 3 attempts (teacher.max_retries=2)")
    assert "HTTP 503" in message
    assert server.requests == 1 + 3  # row 0 once, row 1 three times
    # Row 0's answer was kept: a rerun will not pay for it again.
    assert len((tmp_path / CACHE_FILE).read_text().splitlines()) == 1
    # The server quoted the Authorization header in its error body; it is redacted.
    assert api_key not in "".join(traceback.format_exception(err.value))
    assert "Bearer ***" in message


def test_client_errors_are_not_retried(server, api_key, tmp_path):
    server.script = [("status", 401, None)]
    with pytest.raises(EndpointError, match=r"prompt row 0: .* answered HTTP 401") as err:
        ask_teacher(ROWS[:1], teacher_cfg(server), tmp_path)
    assert server.requests == 1
    assert api_key not in "".join(traceback.format_exception(err.value))


def test_resume_from_cache_pays_only_for_new_answers(server, api_key, tmp_path):
    cfg = teacher_cfg(server)
    ask_teacher(ROWS[:2], cfg, tmp_path)  # "interrupted" after two rows
    assert server.requests == 2
    second = ask_teacher(ROWS, cfg, tmp_path)
    assert server.requests == 3  # only row 2 was asked
    assert (second.stats.cache_hits, second.stats.paid) == (2, 1)

    ledger = CostLedger(tmp_path / "again", LedgerConfig(device_kind="cpu", save_every_s=0.0),
                        "collect")
    third = ask_teacher(ROWS, cfg, tmp_path / "again", ledger=ledger)
    ledger.close()
    # The cache lives in the first run folder; point the third run at it.
    assert third.stats.paid == 3  # a fresh folder has its own cache
    server_before = server.requests
    cfg_shared = teacher_cfg(server, cache_path=str(tmp_path / CACHE_FILE))
    fourth = ask_teacher(ROWS, cfg_shared, tmp_path / "shared")
    assert server.requests == server_before  # 0 new requests
    assert (fourth.stats.cache_hits, fourth.stats.paid, fourth.stats.prompt_tokens) == (3, 0, 0)
    assert read_jsonl(fourth.dataset_path) == read_jsonl(second.dataset_path)


def test_partial_last_cache_line_is_dropped_and_asked_again(server, api_key, tmp_path):
    cfg = teacher_cfg(server)
    ask_teacher(ROWS, cfg, tmp_path)
    cache = tmp_path / CACHE_FILE
    lines = cache.read_text().splitlines(keepends=True)
    # A crash in the middle of writing the last entry: half of it, no newline.
    cache.write_text("".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2])
    result = ask_teacher(ROWS, cfg, tmp_path)
    assert server.requests == 3 + 1
    assert (result.stats.cache_hits, result.stats.paid) == (2, 1)
    assert len(cache.read_text().splitlines()) == 3
    assert cache.read_text().endswith("\n")

    # Damage anywhere else is not a crash artefact: it is reported with its line.
    cache.write_text(lines[0] + "garbage\n" + lines[1])
    with pytest.raises(ValueError, match=r"teacher_cache.jsonl line 2: not a cache entry"):
        ask_teacher(ROWS, cfg, tmp_path)


def test_api_key_never_written_to_disk(server, api_key, tmp_path):
    ledger = CostLedger(tmp_path, LedgerConfig(device_kind="cpu", save_every_s=0.0), "collect")
    ask_teacher(ROWS, teacher_cfg(server), tmp_path, ledger=ledger)
    server.fail_text = ("7 + 1", 500)
    with pytest.raises(EndpointError):
        ask_teacher([{"prompt": "What is 7 + 1?", "answer": "8"}], teacher_cfg(server, max_retries=1),
                tmp_path / "failed", ledger=ledger)
    ledger.close()
    assert f"Bearer {api_key}" in server.auth  # the key was really in use
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"teacher.jsonl", CACHE_FILE, "ledger.json"}
    for path in files:
        assert api_key.encode() not in path.read_bytes(), path


def test_reward_filter_keeps_verified_answers(server, api_key, tmp_path):
    def last_number_matches(prompts, completions, answer):
        # None when there is no reference answer: cannot score.
        return [None if a is None else float(re.findall(r"\d+", c)[-1] == a)
                for c, a in zip(completions, answer)]

    rows = [*ROWS, {"prompt": "What is 1 + 1?", "answer": None}]
    result = ask_teacher(rows, teacher_cfg(server, min_reward=1.0), tmp_path,
                     reward_fn=last_number_matches)
    records = read_jsonl(result.dataset_path)
    # Rows 0 and 1 are right; row 2 (3 + 6 = 10) is wrong; row 3 has no answer to check.
    assert [r["prompt"] for r in records] == ["What is 2 + 3?", "What is 4 + 4?"]
    assert [r["reward"] for r in records] == [1.0, 1.0]
    assert (result.stats.kept, result.stats.rejected, result.stats.unscored) == (2, 1, 1)


def test_async_reward_fn_and_samples_per_prompt(server, api_key, tmp_path):
    async def always_half(prompts, completions, **columns):
        return [0.5] * len(completions)

    result = ask_teacher(ROWS[:2], teacher_cfg(server, samples_per_prompt=2, min_reward=0.5), tmp_path,
                     reward_fn=always_half)
    records = read_jsonl(result.dataset_path)
    # 2 rows x 2 samples, each its own cached request.
    assert [(r["prompt"], r["sample"]) for r in records] == [
        ("What is 2 + 3?", 0), ("What is 2 + 3?", 1), ("What is 4 + 4?", 0), ("What is 4 + 4?", 1)]
    assert server.requests == 4 and result.stats.kept == 4


def test_bad_inputs_fail_before_any_request(server, api_key, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"prompt row 1 lacks column\(s\) \['answer'\]"):
        ask_teacher([ROWS[0], {"prompt": "What is 1 + 2?"}], teacher_cfg(server), tmp_path)
    with pytest.raises(ValueError, match=r"prompt row 0 has no column teacher.prompt_column='question'"):
        ask_teacher(ROWS, teacher_cfg(server, prompt_column="question"), tmp_path)
    with pytest.raises(ValueError, match=r"prompt row 1: the prompt must be non-empty text"):
        ask_teacher([ROWS[0], {"prompt": "", "answer": "0"}], teacher_cfg(server), tmp_path)
    with pytest.raises(ValueError, match=r"column\(s\) \['completion'\] clash"):
        ask_teacher([{"prompt": "What is 1 + 2?", "completion": "x"}], teacher_cfg(server), tmp_path)
    with pytest.raises(ConfigError, match=r"teacher.model is not set"):
        ask_teacher(ROWS, teacher_cfg(server, model=None), tmp_path)
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(ConfigError, match=rf"teacher.api_key_env='{KEY_ENV}': the environment variable is not set"):
        ask_teacher(ROWS, teacher_cfg(server), tmp_path)
    assert server.requests == 0


def test_dataset_from_existing_jsonl(tmp_path):
    src = tmp_path / "answers.jsonl"
    src.write_text(
        json.dumps({"question": "What is 2 + 3?", "teacher": "5", "answer": "5"}) + "\n"
        + json.dumps({"question": [{"role": "user", "content": "What is 1 + 1?"}],
                      "teacher": "3", "answer": "2",
                      "usage": {"prompt_tokens": 9, "completion_tokens": 1}}) + "\n"
    )
    cfg = TeacherConfig(source="jsonl", path=str(src), prompt_column="question",
                        completion_column="teacher", system_prompt=None)
    records = read_jsonl(from_jsonl(cfg, tmp_path / "run").dataset_path)
    assert [r["completion"] for r in records] == ["5", "3"]
    assert records[1]["messages"][-1] == {"role": "assistant", "content": "3"}
    assert records[1]["usage"] == {"prompt_tokens": 9, "completion_tokens": 1}
    assert records[0]["answer"] == "5"

    result = from_jsonl(cfg, tmp_path / "filtered",
                        reward_fn=lambda p, c, answer: [float(x == a) for x, a in zip(c, answer)])
    assert [r["completion"] for r in read_jsonl(result.dataset_path)] == ["5"]


def test_bad_jsonl_source_names_line_and_column(tmp_path):
    src = tmp_path / "answers.jsonl"
    cfg = TeacherConfig(source="jsonl", path=str(src), completion_column="teacher")
    src.write_text('{"prompt": "q1", "teacher": "a1"}\n{"prompt": "q2", "answer": "a2"}\n')
    with pytest.raises(ValueError, match=r"answers.jsonl line 2: missing column\(s\) \['teacher'\]"):
        from_jsonl(cfg, tmp_path)
    src.write_text('{"prompt": "q1", "teacher": "a1"}\n\n{"prompt": "q2", \n')
    with pytest.raises(ValueError, match=r"answers.jsonl line 3: not valid JSON"):
        from_jsonl(cfg, tmp_path)
    src.write_text('{"prompt": "q1", "teacher": 5}\n')
    with pytest.raises(ValueError, match=r"answers.jsonl row 0: column 'teacher' must be text"):
        from_jsonl(cfg, tmp_path)
    src.write_text('["prompt", "teacher"]\n')
    with pytest.raises(ValueError, match=r"answers.jsonl line 1: expected a JSON object, got list"):
        from_jsonl(cfg, tmp_path)
    with pytest.raises(FileNotFoundError, match=r"nope.jsonl: no such file"):
        from_jsonl(TeacherConfig(source="jsonl", path=str(tmp_path / "nope.jsonl")), tmp_path)


def test_retry_delay_and_retry_after():
    import random

    rng = random.Random(0)
    # attempt 3, base 1 s: d = 1 * 2**3 = 8, jittered into [4, 8]
    assert all(4.0 <= retry_delay(3, None, 1.0, 60.0, rng) <= 8.0 for _ in range(100))
    # capped: attempt 10 would be 1024 s; the cap is 30 s, jittered into [15, 30]
    assert all(15.0 <= retry_delay(10, None, 1.0, 30.0, rng) <= 30.0 for _ in range(100))
    # Retry-After 20 s beats a 1 s back-off (attempt 0: d = 1, [0.5, 1])
    assert retry_delay(0, 20.0, 1.0, 60.0, rng) == 20.0
    # ... but not the cap
    assert retry_delay(0, 100.0, 1.0, 60.0, rng) == 60.0

    assert parse_retry_after("7") == 7.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    # An HTTP date 30 s after `now` (Thu, 01 Jan 2026 00:00:30 GMT is 1767225630 s).
    assert parse_retry_after("Thu, 01 Jan 2026 00:00:30 GMT", now=1767225600.0) == 30.0


def test_cli_collects_resumes_and_keeps_the_key_out_of_the_run_folder(server, api_key, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    out = tmp_path / "run"
    cmd = [sys.executable, str(repo / "scripts" / "collect_teacher.py"), "teacher=api",
           f"teacher.base_url={server.base_url}", "teacher.model=teacher-x",
           f"teacher.api_key_env={KEY_ENV}", f"teacher.path={prompts}",
           "teacher.filter_reward=math_answer", f"output_dir={out}", "ledger.device_kind=cpu",
           "ledger.teacher_prompt_price_per_m=1.0", "ledger.teacher_completion_price_per_m=4.0"]
    env = {**os.environ, KEY_ENV: api_key}
    first = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    # math_answer keeps rows 0 and 1; row 2's "3 + 6 = 10" is wrong.
    assert "2 of 3 answers kept" in first.stdout
    # No system prompt here: 5 prompt words per row. 15 prompt tokens at $1/M + 15 completion
    # tokens at $4/M = (15 + 60) / 1e6 = $0.000075
    cost = json.loads((out / "ledger.json").read_text())["cost"]
    assert cost["teacher_usd"] == pytest.approx(75e-6)
    assert "cost ledger (collect run)" in first.stdout
    assert server.requests == 3

    second = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=120)
    assert second.returncode == 0, second.stderr
    assert "(3 from cache, 0 bought" in second.stdout
    assert server.requests == 3
    files = [p for p in out.rglob("*") if p.is_file()]
    assert (out / ".hydra" / "config.yaml") in files
    for path in files:
        assert api_key.encode() not in path.read_bytes(), path

    env.pop(KEY_ENV)
    missing = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=120)
    assert missing.returncode != 0
    assert f"teacher.api_key_env='{KEY_ENV}': the environment variable is not set" in missing.stderr
