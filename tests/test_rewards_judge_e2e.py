"""The judge reward in a real training run, and against vLLM's real OpenAI-compatible server.

The GRPO run on the tiny model uses conf/reward/judge.yaml pointed at a scripted judge on 127.0.0.1
(tests/support/judge_server.py) that grades the way math_answer does, so their agreement is 1 by
construction. The others use the session's tiny-model vLLM server (tests/conftest.py tiny_api_server,
~30-60 s to start on 2 cores, started once for this file and test_compare.py); the GRPO run against
it is marked slow. Its replies are random text, so they check the counters and token accounting,
not the grades.
"""

from __future__ import annotations

import json
import math
import re
import secrets
from pathlib import Path

import httpx
import pytest
from hydra import compose, initialize_config_dir

from rlhf.config.store import register_configs, to_object
from rlhf.run.metrics import read_metrics
from rlhf.train import train
from rewards.builtin.judge import CACHE_FILE, SAMPLES_FILE, Judge
from tests.support.judge_server import USAGE, JudgeServer

ROOT = Path(__file__).resolve().parents[1]
KEY_ENV = "TEST_JUDGE_E2E_KEY"
register_configs()


def last_number_judge(text: str) -> str:
    """Grades as math_answer(mode=last_number) does: 1 when the answer's last number is the correct one."""
    correct = re.search(r"Correct answer: (\S+)", text).group(1)
    student = text.split("Student's answer:\n", 1)[1].rsplit("\n\nGive 1 if", 1)[0]
    numbers = re.findall(r"-?\d+(?:\.\d+)?", student)
    return "Score: 1" if numbers and float(numbers[-1]) == float(correct) else "Score: 0"


def test_grpo_run_with_a_judge_logs_judge_metrics_and_ledger_line(ray_session, tmp_path, monkeypatch):
    key = "sk-judge-" + secrets.token_hex(12)
    monkeypatch.setenv(KEY_ENV, key)
    server = JudgeServer(key, last_number_judge)
    try:
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            cfg = to_object(compose(config_name="config", overrides=[
                "+experiment=tiny_smoke", "reward=judge", f"trainer.output_dir={tmp_path / 'run'}",
                "trainer.steps=1", "trainer.eval_prompts=0", "trainer.export_at_end=false", "trainer.prompts_per_step=2", "rollout.n=2",
                f"reward.functions.0.kwargs.base_url={server.base_url}", "reward.functions.0.kwargs.model=judge-x",
                f"reward.functions.0.kwargs.api_key_env={KEY_ENV}", "ledger.judge_prompt_price_per_m=1.0",
                "ledger.judge_completion_price_per_m=4.0"]))
        run_dir = train(cfg)
    finally:
        server.close()
    (m,) = [m for m in read_metrics(run_dir / "metrics.jsonl") if "reward/mean" in m]
    # 2 prompts x 2 samples = 4 questions, none cached, all answered and parsed.
    assert (m["judge/requests"], m["judge/cache_hits"], m["judge/unparsable"], m["judge/errors"]) == (4, 0, 0, 0)
    assert m["judge/prompt_tokens"] == 4 * USAGE[0] and server.requests == 4
    assert m["agreement/judge_vs_math_answer"] == 1.0  # the scripted judge grades as math_answer does
    assert m["reward/judge/mean"] == m["reward/math_answer/mean"]
    ledger = json.loads((run_dir / "ledger.json").read_text())
    totals = ledger["totals"]
    assert (totals["judge_requests"], totals["judge_prompt_tokens"], totals["judge_completion_tokens"]) == (
        4, 4 * USAGE[0], 4 * USAGE[1])
    # 44 prompt tokens x $1/M + 12 completion tokens x $4/M
    assert ledger["cost"]["judge_usd"] == pytest.approx((44 * 1.0 + 12 * 4.0) / 1e6, rel=1e-12)
    samples = [json.loads(x) for x in (run_dir / SAMPLES_FILE).read_text().splitlines()]
    assert len(samples) == 2 and all(s["reference"] is None and s["replies"] for s in samples)
    assert (run_dir / CACHE_FILE).exists()
    for path in run_dir.rglob("*"):
        if path.is_file() and path.stat().st_size < 50_000_000:
            assert key.encode() not in path.read_bytes(), path


# --- vLLM's real server (one per session, tests/conftest.py; test_compare.py starts it anyway) ---


def served_tokens(base_url: str) -> tuple[float, float]:
    """vLLM's own prompt and generation token counters (Prometheus, GET /metrics)."""
    text = httpx.get(base_url.removesuffix("/v1") + "/metrics", timeout=10).text
    def total(name: str) -> float:
        return sum(float(v) for v in re.findall(rf"^vllm:{name}_total\{{[^}}]*\}} (\S+)$", text, re.MULTILINE))
    return total("prompt_tokens"), total("generation_tokens")


@pytest.mark.parametrize("structured", [False, True])
def test_pointwise_against_vllm_counts_what_the_server_served(tiny_api_server, tmp_path, monkeypatch, structured):
    monkeypatch.setenv(KEY_ENV, tiny_api_server.key)
    j = Judge(model=tiny_api_server.model, rubric="support_helpfulness", base_url=tiny_api_server.base_url,
              api_key_env=KEY_ENV, max_tokens=8, max_retries=1, timeout_s=60.0, structured=structured,
              run_dir=tmp_path, columns=["answer"])
    before = served_tokens(tiny_api_server.base_url)
    got = j(["My order is late.", "How do I reset my password?", "Cancel my plan."],
            ["Sorry, it ships today.", "Use the reset link.", "Done."], answer=["", "", ""])
    after = served_tokens(tiny_api_server.base_url)
    u = j.usage()
    assert u["requests"] == 3 and u["errors"] == 0
    # Random text: a value is a float in [0, 1] or a None counted as unparsable.
    assert all(v is None or (isinstance(v, float) and 0.0 <= v <= 1.0) for v in got)
    assert u["unparsable"] == sum(v is None for v in got)
    # The tokens the judge counted are the ones the server says it processed.
    assert (u["prompt_tokens"], u["completion_tokens"]) == (after[0] - before[0], after[1] - before[1])
    assert 0 < u["completion_tokens"] <= 3 * 8
    if structured:  # guided decoding keeps even a random model inside the JSON schema
        replies = [json.loads(line)["replies"][0]["reply"] for line in (tmp_path / SAMPLES_FILE).read_text().splitlines()]
        assert all(r.startswith("{") for r in replies), replies
    j.close()
    rerun = Judge(model=tiny_api_server.model, rubric="support_helpfulness", base_url=tiny_api_server.base_url,
                  api_key_env=KEY_ENV, max_tokens=8, structured=structured, run_dir=tmp_path, columns=["answer"])
    assert rerun(["My order is late."], ["Sorry, it ships today."], answer=[""]) == got[:1]
    assert rerun.usage()["requests"] == 0 and served_tokens(tiny_api_server.base_url) == after
    for path in tmp_path.rglob("*"):
        assert tiny_api_server.key not in path.read_text(errors="replace"), path


@pytest.mark.slow
def test_grpo_run_with_the_served_tiny_model_as_judge(ray_session, tiny_api_server, tmp_path, monkeypatch):
    """The same run with vLLM's server as the judge. Its grades are random text, mostly unparsable
    Nones, so the judge is logged at weight 0 and math_answer is trained on."""
    monkeypatch.setenv(KEY_ENV, tiny_api_server.key)
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = to_object(compose(config_name="config", overrides=[
            "+experiment=tiny_smoke", "reward=judge", f"trainer.output_dir={tmp_path / 'run'}",
            "trainer.steps=1", "trainer.eval_prompts=0", "trainer.export_at_end=false", "trainer.prompts_per_step=2", "rollout.n=2",
            f"reward.functions.0.kwargs.base_url={tiny_api_server.base_url}",
            f"reward.functions.0.kwargs.model={tiny_api_server.model}", "reward.functions.0.kwargs.max_tokens=8",
            f"reward.functions.0.kwargs.api_key_env={KEY_ENV}", "reward.functions.0.weight=0",
            "reward.functions.1.weight=1"]))
    before = served_tokens(tiny_api_server.base_url)
    run_dir = train(cfg)
    after = served_tokens(tiny_api_server.base_url)
    (m,) = [m for m in read_metrics(run_dir / "metrics.jsonl") if "reward/mean" in m]
    assert (m["judge/requests"], m["judge/errors"]) == (4, 0)
    totals = json.loads((run_dir / "ledger.json").read_text())["totals"]
    assert (totals["judge_requests"], totals["judge_prompt_tokens"], totals["judge_completion_tokens"]) == (
        4, after[0] - before[0], after[1] - before[1])
    assert totals["judge_prompt_tokens"] == m["judge/prompt_tokens"] > 0
    for path in run_dir.rglob("*"):
        if path.is_file() and path.stat().st_size < 50_000_000:
            assert tiny_api_server.key.encode() not in path.read_bytes(), path
