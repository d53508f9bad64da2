"""``python -m rlhf.compare`` on an agent: each side's answer to a prompt is one episode of the
application (tests/support/agents.py two_calls: two model calls around a calculator result). The
"closed" side is the tiny model behind vLLM's real OpenAI server with a key (tests/conftest.py
tiny_api_server) through the relay; the open side the tiny model on our engines through the gateway.
2 prompts, 1 timed episode, 8 tokens a call. The quality reward is the agent's own (``agent``: the
share of ASCII letters in the final reply), so every figure is recomputed here from the texts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlhf.compare import JSON_FILE, MD_FILE, check_compare, run_compare
from rlhf.config import ConfigError
from tests.support.agents import letter_share
from tests.support.runs import compose

AGENTS = (Path(__file__).parent / "support" / "agents.py").as_posix()
KEY_ENV = "TEST_COMPARE_AGENT_CLOSED_KEY"
Z95 = 1.959963984540054


def agent_config(out: Path, served, model: str, *extra: str):
    return compose("+experiment=tiny_smoke", f"model.name_or_path={model}", f"trainer.output_dir={out}",
                   f"agent.name={AGENTS}:two_calls", "reward.functions=[{fn: math_answer, weight: 0.0}]",
                   f"compare.base_url={served.base_url}", f"compare.model={served.model}",
                   f"compare.api_key_env={KEY_ENV}", f"compare.models=[{model}]", "compare.labels=[open]",
                   "compare.prompts=2", "compare.max_tokens=8", "compare.latency_requests=1", "compare.reward=agent",
                   "ledger.device_kind=cpu", "ledger.closed_api_name=tiny-closed",
                   "ledger.closed_api_price_date=2026-12-01", *extra)


@pytest.fixture(scope="module")
def agent_verdict(ray_session, tiny_api_server, tiny_model_path, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("compare-agent")
    mp = pytest.MonkeyPatch()
    mp.setenv(KEY_ENV, tiny_api_server.key)
    try:
        run_compare(agent_config(tmp / "run", tiny_api_server, tiny_model_path))
        yield {"saved": json.loads((tmp / "run" / JSON_FILE).read_text()), "out": tmp / "run", "tmp": tmp,
               "key": tiny_api_server.key}
    finally:
        mp.undo()


def test_each_answer_is_an_agent_episode_scored_and_compared_per_prompt(agent_verdict):
    saved = agent_verdict["saved"]
    assert saved["agent"] == f"{AGENTS}:two_calls" and saved["prompts"] == 2 and saved["reward"] == "agent"
    assert "one episode of agent" in (agent_verdict["out"] / MD_FILE).read_text()
    closed, (opened,) = saved["closed"], saved["open"]
    # The closed episodes are scored by the quality reward alone (here the agent's own, free).
    assert list(closed["rewards"]) == ["agent"] and set(opened["rewards"]) == {"math_answer", "agent"}
    for side in (closed, opened):
        # two_calls returns letter_share of its final reply, which is the episode's answer.
        scores = [letter_share(text) for text in side["answers"]]
        assert side["scores"] == pytest.approx(scores, abs=1e-12)
        mean = sum(scores) / 2
        assert side["quality"]["mean"] == pytest.approx(mean, abs=1e-12)
        # stderr over 2 prompts: sqrt(((s0 - m)^2 + (s1 - m)^2) / 1) / sqrt(2) = |s0 - s1| / 2.
        assert side["quality"]["stderr"] == pytest.approx(abs(scores[0] - scores[1]) / 2, abs=1e-12)
        # Two calls of at most 8 new tokens, each at least 1.
        assert all(2 <= t <= 16 for t in side["answer_tokens"]) and side["latency"]["n"] == 1
    # Per prompt: 1 when the open episode's reward is above the closed one's, 0.5 equal, 0 below.
    wins = [1.0 if o > c else 0.5 if o == c else 0.0 for o, c in zip(opened["scores"], closed["scores"])]
    assert opened["wins"] == wins
    rate = sum(wins) / 2
    assert opened["win_rate"]["rate"] == pytest.approx(rate, abs=1e-12)
    assert opened["win_rate"]["half_width"] == pytest.approx(Z95 * abs(wins[0] - wins[1]) / 2, abs=1e-12)
    # Cost: $0.10/h on one CPU at the episodes' completion tokens per second of wall time.
    assert opened["usd_per_m"] == pytest.approx(0.10 / (opened["tokens_per_s"] * 3600) * 1e6, rel=1e-12)
    assert closed["usd_per_m"] == 10.0 and closed["tokens_per_s"] is None


def test_each_sides_episodes_made_their_two_calls_and_the_closed_ones_are_paid(agent_verdict):
    saved = agent_verdict["saved"]
    for label in ("tiny", "open"):
        m = saved["episodes"][label]
        assert m["agent/calls_mean"] == 2.0 and m["agent/timed_failed"] == 0
        assert m["agent/errors"] == m["agent/timeouts"] == m["agent/no_calls"] == 0
    # Nothing cached: 2 episodes + 1 timed one, 2 calls each.
    assert (saved["closed_requests_paid"], saved["closed_cache_hits"]) == (6, 0)
    # The closed API billed what the episodes' answers used; the relay's counts are the server's.
    assert saved["episodes"]["tiny"]["agent/completion_tokens"] == sum(saved["closed"]["answer_tokens"])


def test_the_closed_apis_key_is_in_no_file(agent_verdict):
    for path in agent_verdict["tmp"].rglob("*"):
        if path.is_file():
            assert agent_verdict["key"].encode() not in path.read_bytes(), path


@pytest.mark.parametrize("extra, match", [
    (("agent.name=/no/such/agent.py:fn",), r"agent\.name='/no/such/agent\.py:fn'"),
    (("agent.timeout_s=0",), r"agent\.timeout_s=0"),
    (("env=calculator",), r"env\.name='calculator': the verdict asks single-turn questions, or runs an agent"),
])
def test_bad_agent_settings_are_named_before_anything_starts(tiny_api_server, tiny_model_path, tmp_path,
                                                             monkeypatch, extra, match):
    monkeypatch.setenv(KEY_ENV, tiny_api_server.key)
    with pytest.raises(ConfigError, match=match):
        check_compare(agent_config(tmp_path / "run", tiny_api_server, tiny_model_path, *extra))
    assert not (tmp_path / "run").exists()


def test_the_agents_own_reward_is_a_quality_reward_the_checks_accept(tiny_api_server, tiny_model_path, tmp_path,
                                                                     monkeypatch):
    monkeypatch.setenv(KEY_ENV, tiny_api_server.key)
    setup = check_compare(agent_config(tmp_path / "run", tiny_api_server, tiny_model_path))
    assert (setup.reward, setup.labels, setup.win_reward) == ("agent", ["open"], None)
