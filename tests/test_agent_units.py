"""Agents without engines: loading and config checks (each bad input named before anything starts),
one episode's outcome from a callable or a command (play), the failed-episode rule in scoring, and
the built-in calculator agent's tool loop against a scripted client."""

from __future__ import annotations

import copy
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest

from rlhf.config import ConfigError
from rlhf.experience.agent_api import AgentError, AgentSpec, load_agent, play
from rlhf.validation import validate
from tests.support.runs import compose

SUPPORT = Path(__file__).parent / "support"
AGENTS = (SUPPORT / "agents.py").as_posix()
SCRIPT = (SUPPORT / "agent_script.py").as_posix()


def test_the_builtin_and_a_file_agent_load():
    from rollouts.env.builtin.calculator_agent import calculator_agent

    assert load_agent("calculator") is calculator_agent
    assert load_agent(f"{AGENTS}:two_calls", {"max_tokens": 4}).__name__ == "two_calls"


@pytest.mark.parametrize("overrides, message", [
    (["agent.name=calculatr"], "agent.name='calculatr'"),
    ([f"agent.name={AGENTS}:NOT_CALLABLE"], "resolves to int .*not a function"),
    ([f"agent.name={AGENTS}:one_argument"], "agent.name=.*one_argument.*too many positional arguments; one_argument\\(client\\) is called as"),
    (["agent=calculator", "+agent.kwargs.colum=x"], "agent.kwargs \\['answer_column', 'colum', 'max_turns'\\]"),
    (["agent=calculator", f"agent.command=[{sys.executable}]"], "agent.name='calculator' and agent.command=.* both set"),
    (["agent=calculator", "env=calculator"], "env.name='calculator' is set beside the agent"),
    (["agent.command=[no-such-program-here]"], "agent.command=\\['no-such-program-here'\\]: .*not an executable"),
    (["agent.command=[]"], "agent.command=\\[\\] must be a non-empty list"),
    ([f"agent.command=[{sys.executable}]", "+agent.kwargs.x=1"], "agent.kwargs \\['x'\\] are a callable's"),
    ([f"agent.command=[{sys.executable}]", "agent.executor=ray"], "agent.command runs on the driver's node"),
    (["agent=calculator", "agent.executor=processes"], "agent.executor='processes' is not one of"),
    (["agent=calculator", "agent.max_calls=0"], "agent.max_calls=0 must be >= 1"),
    (["agent=calculator", "agent.concurrency=0"], "agent.concurrency=0 must be >= 1"),
    (["agent=calculator", "agent.timeout_s=0"], "agent.timeout_s=0.0 must be > 0"),
    (["agent=calculator", "+agent.resources.agents=1"], "agent.resources=.* set agent.executor=ray"),
    (["agent=calculator", "agent.executor=ray", "+agent.resources.agents=0"], "each amount must be a number > 0"),
    (["agent=calculator", "agent.executor=ray", "+agent.resources.CPU=1"], "\\['CPU'\\] are Ray's own resources"),
    (["agent=calculator", "reward.functions=[{fn: math_answer, name: agent}]"], "a reward function is named 'agent'"),
    (["agent=calculator", "agent.reward_weight=nan"], "agent.reward_weight=nan must be a finite number"),
    (["agent=calculator", "+teacher=engines", "teacher.model=tiny-random-llama", "algo.distill_coef=0.5"],
     "algo.distill_coef=0.5 with an agent"),
    (["gateway.client_sampling=ignore"], "gateway.client_sampling='ignore' is not one of"),
    (["trainer.eval_reward=agent"], "trainer.eval_reward='agent' is not one of the rewards"),
])
def test_agent_config_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(compose(*overrides))


def test_the_agent_experiment_validates_and_reads_accuracy_from_the_agent():
    from rlhf.validation import eval_reward, has_task_reward

    cfg = compose("+experiment=calculator_agent")
    validate(cfg)
    assert eval_reward(cfg) == "agent" and has_task_reward(cfg)
    # Everything but the episodes' source is calculator_arithmetic's, so the two compare.
    env = compose("+experiment=calculator_arithmetic")
    assert (cfg.data, cfg.rollout, cfg.reward) == (env.data, env.rollout, env.reward)
    assert cfg.trainer == replace(env.trainer, eval_reward="agent", output_dir=cfg.trainer.output_dir)  # a timestamp


# --- one episode: play ------------------------------------------------------------------------

ROW = {"prompt": "What is 2 + 3?", "prompt_text": "What is 2 + 3?", "answer": "5"}
URL = "http://127.0.0.1:9/v1"  # nothing listens: these agents never call it


def command(*args: str, timeout_s: float = 30.0) -> AgentSpec:
    return AgentSpec(command=(sys.executable, SCRIPT, *args), timeout_s=timeout_s)


def test_a_command_gets_the_row_and_the_gateway_and_prints_its_reward():
    # agent_script.py echo: prints the key's length and the answer read from stdin, then the reward 0.25.
    assert play(command("echo"), URL, "sk-episode", ROW) == 0.25


def test_a_command_without_a_number_on_its_last_line_gave_no_reward():
    assert play(command("silent"), URL, "k", ROW) is None


def test_a_command_that_exits_1_is_an_agent_error_with_its_stderr():
    with pytest.raises(AgentError, match="exited 1: .*the application broke"):
        play(command("fail"), URL, "k", ROW)


def test_a_command_past_its_timeout_is_killed():
    with pytest.raises(TimeoutError, match="ran past agent.timeout_s=0.5s"):
        play(command("hang", timeout_s=0.5), URL, "k", ROW)


def test_a_callable_returning_a_non_number_is_an_agent_error():
    with pytest.raises(AgentError, match="returned str '1.0'"):
        play(AgentSpec(name=f"{AGENTS}:returns_text"), URL, "k", ROW)
    assert play(AgentSpec(name=f"{AGENTS}:never_calls"), URL, "k", ROW) == 1.0


# --- the built-in calculator agent's loop ------------------------------------------------------

class ScriptedClient:
    """Answers chat.completions.create with the next scripted message; records what it was sent."""

    def __init__(self, replies: list[SimpleNamespace]) -> None:
        self.replies, self.sent = list(replies), []
        self.chat = SimpleNamespace(completions=SimpleNamespace(create=self._create))

    def _create(self, **request):
        self.sent.append(copy.deepcopy(request))  # the agent goes on appending to its messages
        return SimpleNamespace(choices=[SimpleNamespace(message=self.replies.pop(0))])


def tool_reply(expression: str, call_id: str = "call_1") -> SimpleNamespace:
    function = SimpleNamespace(name="calculate", arguments=f'{{"expression": "{expression}"}}')
    call = SimpleNamespace(id=call_id, function=function,
                           model_dump=lambda: {"id": call_id, "type": "function",
                                               "function": {"name": "calculate", "arguments": function.arguments}})
    return SimpleNamespace(content=None, tool_calls=[call])


def test_calculator_agent_runs_the_tool_and_scores_the_final_reply_as_the_environment():
    from rollouts.env.builtin.calculator_agent import calculator_agent

    client = ScriptedClient([tool_reply("12 * 7 + 5"), SimpleNamespace(content="It is 89.", tool_calls=None)])
    row = {"prompt": "What is 12 * 7 + 5?", "answer": "89"}
    assert calculator_agent(client, row) == 1.0
    second = client.sent[1]["messages"]
    assert second[-1] == {"role": "tool", "tool_call_id": "call_1", "content": "89"}  # the tool's result
    assert second[-2]["tool_calls"][0]["function"]["name"] == "calculate"
    assert client.sent[0]["tools"][0]["function"]["name"] == "calculate"
    # A wrong answer is 0; a tool error reaches the model as text; three calls without an answer are 0.
    wrong = ScriptedClient([SimpleNamespace(content="It is 90.", tool_calls=None)])
    assert calculator_agent(wrong, row) == 0.0
    looping = ScriptedClient([tool_reply("1/0"), tool_reply("2+2"), tool_reply("3+3")])
    assert calculator_agent(looping, row, max_turns=3) == 0.0
    assert looping.sent[1]["messages"][-1]["content"] == "Error: ZeroDivisionError: division by zero"


# --- scoring: a failed episode carries no reward ---------------------------------------------------

def test_a_failed_episode_scores_none_whatever_the_reward_functions_say():
    from rlhf.config import RewardConfig, RewardFnConfig
    from rlhf.experience.episodes import Episodes
    from rlhf.experience.prompts import PromptItem
    from rlhf.experience.scoring import score_episodes
    from rlhf.types import Completion, RolloutBatch
    from rewards.runner import RewardRunner

    item = PromptItem([1, 2], "What is 2 + 3?", "What is 2 + 3?", {"answer": "5"})
    rows = [Completion(0, [1, 2], [3], [0.0], "stop", "5") for _ in range(3)]
    # Row 0 answered 5 with agent reward 1; row 1 also says 5 but its agent raised; row 2 made no call.
    episodes = Episodes(RolloutBatch(rows, n=3), env_rewards=[1.0, None, None], last_turns=["5", "5", ""],
                        unfinished=[None] * 3, reward_name="agent", failed=[None, "errors", "no_calls"],
                        transcripts=["user: What is 2 + 3?\n\nassistant: 5"] * 3)
    with RewardRunner(RewardConfig(functions=[RewardFnConfig(fn="math_answer", weight=0.0)])) as runner:
        scored = score_episodes(runner, [item], episodes, 1.0, with_env=True)
    # Total = 0 x math_answer + 1 x agent: 1.0 for row 0; rows 1 and 2 None, though math_answer read a 5 in row 1.
    assert scored.total == [1.0, None, None]
    assert scored.per_fn == {"math_answer": [1.0, None, None], "agent": [1.0, None, None]}
    assert scored.metrics["reward/total/none"] == 2.0 and scored.metrics["reward/agent/mean"] == 1.0


def test_transcript_text_shows_roles_and_tool_calls():
    from rlhf.experience.agents import transcript_text

    calls = [{"id": "c", "type": "function", "function": {"name": "calculate", "arguments": "{}"}}]
    text = transcript_text([{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": calls},
                            {"role": "tool", "tool_call_id": "c", "content": "4"}])
    assert text == f"user: hi\n\nassistant: \n{__import__('json').dumps(calls)}\n\ntool: 4"


# --- a batch from the episodes' records ----------------------------------------------------------

def record(calls: int, ids: list[int] | None = None, mask: list[int] | None = None, posted: float | None = None,
           final: str = "4"):
    from rollouts.gateway.episode import EpisodeRecord, SegmentTrace

    segments = [] if ids is None else [SegmentTrace([1, 2], ids, mask or [1] * len(ids), [-0.5] * len(ids), "stop",
                                                    list(range(calls)))]
    return EpisodeRecord("k", calls, segments, final, [{"role": "assistant", "content": final}], posted,
                         posted is not None, {})


def test_records_become_rows_with_the_agents_reward_and_failures_counted():
    from rlhf.experience.agents import assemble_episodes
    from rlhf.experience.prompts import PromptItem

    item = PromptItem([7, 8, 9], "What is 2 + 2?", "What is 2 + 2?", {"answer": "4"})
    records = [record(2, [5, 6, 5], [1, 0, 1]), record(1, [5], posted=0.5), record(1, [5], posted=0.5),
               record(1, [5]), record(0), record(0), record(2, None, posted=1.0)]
    outcomes = [1.0, None, 0.25, RuntimeError("broke"), TimeoutError("late"), None, None]
    got = assemble_episodes([item], 7, records, outcomes, filler_id=2, gateway_metrics={"gateway/requests": 8.0})
    # Returned beats posted (row 2); posted when nothing was returned (row 1); none at all (row 3, it
    # raised). A relayed episode (row 6: calls, no token ids) keeps its posted reward and is no failure.
    assert got.env_rewards == [1.0, 0.5, 0.25, None, None, None, 1.0]
    # A timeout before a missing call (row 4 made none either); row 5 never called and raised nothing.
    assert got.failed == [None, None, None, "errors", "timeouts", "no_calls", None]
    m = got.metrics
    assert (m["agent/errors"], m["agent/timeouts"], m["agent/no_calls"], m["agent/reward_none"]) == (1, 1, 1, 3)
    # Calls 2+1+1+1+0+0+2 = 7 over 7 episodes; one segment each in rows 0-3, none after: 4/7; one
    # appended token (row 0's mask 0) over 7 episodes.
    assert m["agent/calls_mean"] == 1.0 and m["agent/segments_mean"] == 4 / 7
    assert m["agent/observation_tokens_mean"] == 1 / 7 and m["gateway/requests"] == 8.0
    rows = got.rollouts.completions
    assert rows[0].token_mask == [1, 0, 1] and rows[0].prompt_ids == [1, 2]
    # No token ids (rows 4-6): the item's prompt and one filler token, which trains nothing (weight 0
    # when failed; evaluation only for a relayed one).
    for c in rows[4:]:
        assert (c.prompt_ids, c.completion_ids, c.logprobs, c.finish_reason) == ([7, 8, 9], [2], [0.0], "abort")
    assert got.reward_name == "agent" and got.last_turns == ["4"] * 7 and got.transcripts == ["assistant: 4"] * 7


class AnswerEngines:
    """Stands in for the engine group behind a real gateway (the episodes' plumbing is under test, not
    sampling): every request is answered "It is 4." after ``seconds``, like a slow engine call."""

    def __init__(self, tokenizer, seconds: float) -> None:
        self.ids = tokenizer("It is 4.<|im_end|>", add_special_tokens=False)["input_ids"]
        self.seconds = seconds

    def generate(self, prompt_ids, sampling, seed=None):
        import time

        from rlhf.types import Completion, RolloutBatch

        time.sleep(self.seconds)
        return RolloutBatch([Completion(i, list(p), list(self.ids), [-1.0] * len(self.ids), "stop", "It is 4.")
                             for i, p in enumerate(prompt_ids)], n=1)


def test_a_burst_of_episodes_all_reach_the_gateway(tiny_model_path):
    """32 calculator-agent episodes open and connect at once, as a step's do; with the HTTP server's default listen backlog of 5, 2 to 8 of them failed to connect."""
    from transformers import AutoTokenizer

    from rlhf.config import AgentConfig, GatewayConfig
    from rlhf.experience.agents import AgentRuntime, run_agent_episodes
    from rlhf.experience.prompts import PromptItem
    from rlhf.types import SamplingSettings
    from rollouts.gateway import Gateway

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    gateway = Gateway(AnswerEngines(tokenizer, 0.5), tokenizer, SamplingSettings(n=1), GatewayConfig(), 256)
    runtime = AgentRuntime(AgentConfig(name="calculator"), gateway, SamplingSettings(n=1))
    items = [PromptItem([1, 2], "What is 2 + 2?", "What is 2 + 2?", {"answer": "4"}) for _ in range(4)]
    try:
        for _ in range(2):
            got = run_agent_episodes(runtime, items, n=8)
            # Each episode: one call answered "It is 4.", no tool call: the calculator's check gives 1.0.
            assert got.metrics["agent/errors"] == 0 and got.metrics["gateway/requests"] == 32
            assert got.env_rewards == [1.0] * 32
    finally:
        runtime.close()
