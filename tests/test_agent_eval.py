"""``python -m rlhf.eval`` with an agent: the same application, prompts and rewards against our engines
(through the gateway) and against the "closed" API it uses today (trainer.eval_against=closed: the
tiny model behind vLLM's real OpenAI server with a key, tests/conftest.py tiny_api_server, through
the relay, rollouts/gateway/relay.py). The tiny model is random: the checks are the plumbing, the
tokens billed and their cost."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlhf.config import ConfigError
from rlhf.eval import run_eval
from tests.support.runs import compose

AGENTS = (Path(__file__).parent / "support" / "agents.py").as_posix()
KEY_ENV = "TEST_AGENT_EVAL_CLOSED_KEY"


def eval_config(out: Path, *extra: str):
    # 2 prompts x 2 samples; each episode makes two calls of at most 8 tokens around a tool result.
    return compose("+experiment=tiny_smoke", f"trainer.output_dir={out}", f"agent.name={AGENTS}:two_calls",
                   "trainer.eval_prompts=2", "trainer.eval_samples=2", "trainer.eval_reward=agent",
                   "reward.functions=[{fn: math_answer, weight: 0.0}]", f"compare.api_key_env={KEY_ENV}",
                   "ledger.closed_api_prompt_price_per_m=2.5", "ledger.closed_api_completion_price_per_m=10.0",
                   *extra)


@pytest.fixture(scope="module")
def both(ray_session, tiny_api_server, tiny_model_path, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("agent-eval")
    mp = pytest.MonkeyPatch()
    mp.setenv(KEY_ENV, tiny_api_server.key)
    closed_args = ("trainer.eval_against=closed", f"compare.base_url={tiny_api_server.base_url}",
                   f"compare.model={tiny_api_server.model}")
    try:
        run_eval(eval_config(tmp / "engines", f"model.name_or_path={tiny_model_path}"))
        run_eval(eval_config(tmp / "closed", f"model.name_or_path={tiny_model_path}", *closed_args))
        yield {side: json.loads((tmp / side / "eval.json").read_text()) for side in ("engines", "closed")} | {
            "tmp": tmp, "key": tiny_api_server.key, "closed_args": closed_args}
    finally:
        mp.undo()


def test_the_same_agent_runs_against_the_engines_and_the_closed_api(both):
    engines, closed = both["engines"], both["closed"]
    assert engines["against"] == "engines" and closed["against"] == "closed"
    assert closed["model"].startswith("tiny at http://127.0.0.1:")
    for side in (engines, closed):
        m = side["reward_metrics"]
        # 4 episodes, each its two calls, none failed: the agent's reward scored every sample.
        assert m["agent/calls_mean"] == 2.0 and m["agent/errors"] == 0 and m["agent/no_calls"] == 0
        assert side["failures"] == 0 and side["num_prompts"] == 2 and side["k"] == 2
        assert 0.0 <= side["accuracy"] <= 1.0
    # The relay keeps no token ids (the closed API has them), only what it billed.
    assert closed["reward_metrics"]["agent/segments_mean"] == 0.0
    assert engines["reward_metrics"]["agent/segments_mean"] == 1.0


def test_the_closed_apis_tokens_and_their_list_price_cost(both):
    cost = both["closed"]["closed_api_cost"]
    # 8 calls of at most 8 new tokens; each prompt is the conversation so far (>= 1 token).
    assert 8 <= cost["prompt_tokens"] and 0 < cost["completion_tokens"] <= 8 * 8
    assert cost["usd"] == pytest.approx((cost["prompt_tokens"] * 2.5 + cost["completion_tokens"] * 10.0) / 1e6)
    assert both["closed"]["reward_metrics"]["agent/prompt_tokens"] == cost["prompt_tokens"]
    assert "closed_api_cost" not in both["engines"]


def test_the_closed_apis_key_is_in_no_file(both):
    for path in both["tmp"].rglob("*"):
        if path.is_file():
            assert both["key"] not in path.read_text(errors="replace"), path


@pytest.mark.parametrize("extra, match", [
    (("trainer.eval_against=closed", "agent.name=null", "trainer.eval_reward=math_answer"), "agent.name"),
    (("trainer.eval_against=closed", "compare.base_url=null"), "compare.base_url"),
    (("trainer.eval_against=api",), "trainer.eval_against='api'"),
    (("trainer.eval_against=closed", "compare.base_url=http://127.0.0.1:9/v1"), "unreachable"),
])
def test_bad_settings_are_refused_by_name_before_anything_starts(both, tmp_path, extra, match):
    keys = {e.split("=")[0] for e in extra}
    base = [a for a in both["closed_args"] if a.split("=")[0] not in keys]
    cfg = eval_config(tmp_path / "run", *base, *extra)
    with pytest.raises(ConfigError, match=match):
        run_eval(cfg)
    assert not (tmp_path / "run").exists()
