"""Environments without a model: tool schemas, tool-call parsing, the calculator, loading and bad
environments, observation turns as ids (the real SmolLM2 tokenizer), trajectory assembly and the
mask through build_train_batch and shared-prompt packing. Token ids are built by hand."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rlhf.experience.batching import build_train_batch
from rlhf.learner.packing import prompt_lengths, shared, unshared
from rlhf.types import RolloutBatch
from rollouts.env.api import EnvError, check_reset, check_step, load_env
from rollouts.env.builtin.calculator import CalculatorEnv, calculate, evaluate
from rollouts.env.chat import TurnCodec
from rollouts.env.tools import env_tools, parse_tool_call, tool_schema
from rollouts.env.trajectory import Trajectory

ENVS = (Path(__file__).parent / "support" / "envs.py").as_posix()


# --- tools ---------------------------------------------------------------------------------------

def scale(x: float, times: int = 2) -> float:
    """Multiply a number.

    Args:
        x: the number
        times: how many times
    """
    return x * times


def test_tool_schema_comes_from_type_hints_and_docstring():
    schema = tool_schema(scale)
    assert schema == {"type": "function", "function": {
        "name": "scale", "description": "Multiply a number.",
        "parameters": {"type": "object", "required": ["x"], "properties": {
            "x": {"type": "number", "description": "the number"},
            "times": {"type": "integer", "description": "how many times"}}}}}


def test_tool_schema_refuses_a_tool_without_docstring_or_hints():
    def bare(x: int):
        return x

    def untyped(x):
        """Does things."""

    with pytest.raises(ValueError, match="'bare' has no docstring"):
        tool_schema(bare)
    with pytest.raises(ValueError, match="parameter 'x' has no type hint"):
        tool_schema(untyped)


def test_parse_tool_call_reads_the_first_call_and_names_malformed_ones():
    text = 'Let me compute. <tool_call>{"name": "calculate", "arguments": {"expression": "2*3"}}</tool_call>'
    assert parse_tool_call(text) == ("calculate", {"expression": "2*3"})
    assert parse_tool_call("The answer is 6.") is None
    assert "not valid JSON" in parse_tool_call("<tool_call>{name: calc}</tool_call>")
    assert "arguments must be a JSON object" in parse_tool_call('<tool_call>{"name": "c", "arguments": 3}</tool_call>')
    # A call cut off by max_new_tokens before its closing tag still parses when its JSON is whole.
    assert parse_tool_call('<tool_call>{"name": "c", "arguments": {}}') == ("c", {})


# --- calculator ----------------------------------------------------------------------------------

def test_calculator_evaluates_arithmetic_only():
    assert evaluate("2 + 3 * (4 - 1)") == 11  # 3 * 3 = 9, + 2
    assert evaluate("-2 ** 2") == -4  # Python's precedence: -(2 ** 2)
    assert evaluate("7 // 2 + 7 % 2") == 4  # 3 + 1
    assert calculate("1 / 4") == "0.25"
    assert calculate("6 / 3") == "2"  # an integral float prints as an integer
    for bad, why in [("__import__('os')", "not Call"), ("x + 1", "not Name"), ("(1).real", "not Attribute"),
                     ("2 ** 100", "exponent 100"), ("'a' * 3", "not Constant"), ("1 +", "not an arithmetic")]:
        with pytest.raises(ValueError, match=why):
            evaluate(bad)
    with pytest.raises(ZeroDivisionError):
        evaluate("1 / 0")


def test_calculator_env_answers_tool_calls_and_scores_the_final_answer():
    env = CalculatorEnv()
    env.reset({"prompt": "What is 12 * 7 + 5?", "answer": "89"})
    call = '<tool_call>{"name": "calculate", "arguments": {"expression": "12*7+5"}}</tool_call>'
    assert env.step(call) == ("89", None, False)
    assert env.step('<tool_call>{"name": "calculate", "arguments": {"expression": "1/0"}}</tool_call>') == (
        "Error: ZeroDivisionError: division by zero", None, False)
    assert env.step('<tool_call>{"name": "search", "arguments": {}}</tool_call>')[0].startswith("Error: no tool named")
    assert env.step("So the answer is 89.") == (None, 1.0, True)
    assert env.metrics() == {"tool_calls": 3.0, "tool_errors": 2.0}  # success rate 1/3
    wrong = CalculatorEnv()
    wrong.reset({"answer": "#### 89"})
    assert wrong.step("It is 88") == (None, 0.0, True)
    assert env_tools(CalculatorEnv)[0]["function"]["name"] == "calculate"


# --- loading and bad environments: one test per bad input ----------------------------------------

def test_load_env_by_builtin_name_and_file_path():
    assert load_env("calculator").cls is CalculatorEnv
    factory = load_env(f"{ENVS}:TwoTurn", {"note": "seen"})
    assert factory.build().note == "seen"


@pytest.mark.parametrize("spec, kwargs, message", [
    ("calculatr", {}, "env.name='calculatr'.*not a built-in \\(calculator\\)"),
    (f"{ENVS}:Missing", {}, "has no attribute 'Missing'"),
    (f"{ENVS}:not_a_class", {}, "resolves to int, not a class"),
    (f"{ENVS}:NoStep", {}, "NoStep has no step\\(\\) method"),
    (f"{ENVS}:TwoTurn", {"nte": "x"}, "env.kwargs.*unexpected keyword argument 'nte'"),
    ("no/such/file.py:Env", {}, "not found"),
])
def test_load_env_names_the_bad_input(spec, kwargs, message):
    with pytest.raises(ValueError, match=message):
        load_env(spec, kwargs)


@pytest.mark.parametrize("value, message", [
    ({"observation": "x"}, "returned dict"),
    (("obs", None), "returned tuple"),
    ((3, None, False), "observation int"),
    (("obs", "1.0", True), "reward str"),
    (("obs", float("nan"), True), "not a finite number"),
    (("obs", True, True), "reward bool"),
    (("obs", 1.0, "yes"), "done str"),
])
def test_step_with_wrong_types_is_a_named_error(value, message):
    with pytest.raises(EnvError, match=f"env 'my_env': step\\(\\).*{message}"):
        check_step("my_env", value)


def test_step_with_right_types_passes():
    assert check_step("e", (None, 1, True)) == (None, 1.0, True)  # an int reward is a float
    assert check_reset("e", None) is None
    with pytest.raises(EnvError, match="reset\\(\\) returned int"):
        check_reset("e", 42)


# --- observation turns as ids --------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer(smollm2_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_path)


def test_observation_turn_is_appended_after_the_sampled_ids(tokenizer):
    codec = TurnCodec(tokenizer, role="tool", max_tool_tokens=64)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert codec.close_ids == tokenizer("<|im_end|>\n", add_special_tokens=False)["input_ids"]  # [2, 198]
    # The model closed its turn itself (sampled <|im_end|>): only the newline is added.
    obs = codec.after_action([100, 200, im_end], "42")
    assert tokenizer.decode(obs.ids) == "\n<|im_start|>tool\n42<|im_end|>\n<|im_start|>assistant\n"
    # Cut off by max_new_tokens: the whole closing is added.
    cut = codec.after_action([100, 200], "42")
    assert cut.ids == [im_end] + obs.ids
    assert not obs.truncated


def test_long_observation_is_cut_to_max_tool_tokens(tokenizer):
    codec = TurnCodec(tokenizer, max_tool_tokens=5)
    obs = codec.after_action([2], "word " * 100)
    assert obs.truncated and len(tokenizer(obs.text, add_special_tokens=False)["input_ids"]) == 5


def test_first_observation_moves_the_generation_prompt_after_it(tokenizer):
    codec = TurnCodec(tokenizer)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
    ids, _ = codec.into_prompt(prompt, "Task")
    assert tokenizer.decode(ids).endswith("Hi<|im_end|>\n<|im_start|>tool\nTask<|im_end|>\n<|im_start|>assistant\n")


# --- trajectory assembly and the mask ------------------------------------------------------------

def two_turn(prompt_index: int = 0) -> Trajectory:
    """prompt [1, 2, 3]; model [10, 11] -> observation [50, 51, 52] -> model [12]."""
    t = Trajectory(prompt_index, [1, 2, 3])
    t.add_action([10, 11], [-0.5, -0.25], "ab", "stop")
    t.add_observation([50, 51, 52], "OBS")
    t.add_action([12], [-1.0], "c", "stop")
    return t


def test_trajectory_keeps_sampled_ids_and_masks_observations():
    c = two_turn().to_completion()
    assert c.completion_ids == [10, 11, 50, 51, 52, 12]
    assert c.token_mask == [1, 1, 0, 0, 0, 1]
    assert c.logprobs == [-0.5, -0.25, 0.0, 0.0, 0.0, -1.0]
    assert c.text == "abOBSc"
    single = Trajectory(0, [1, 2, 3])
    single.add_action([10, 11], [-0.5, -0.25], "ab", "stop")
    assert single.to_completion().token_mask is None  # the single-turn case: a plain completion
    with pytest.raises(ValueError, match="2 tokens came with 1 log-probs"):
        single.add_action([1, 2], [0.0], "x", "stop")


def test_train_batch_masks_observation_tokens_in_the_middle():
    rows = [two_turn(0).to_completion(), two_turn(0).to_completion()]
    plain = Trajectory(0, [1, 2, 3])
    plain.add_action([10], [-0.5], "a", "length")
    rows[1] = plain.to_completion()
    batch = build_train_batch(RolloutBatch(rows, n=2), torch.zeros(1, 2), torch.zeros(1, 2), pad_id=0)
    # Row 0: [1 2 3 | 10 11 50 51 52 12]; row 1: [1 2 3 | 10] then padding.
    assert batch.input_ids.tolist() == [[1, 2, 3, 10, 11, 50, 51, 52, 12], [1, 2, 3, 10, 0, 0, 0, 0, 0]]
    assert batch.response_mask.tolist() == [[0, 0, 0, 1, 1, 0, 0, 0, 1], [0, 0, 0, 1, 0, 0, 0, 0, 0]]
    assert batch.sampler_logprobs[0].tolist() == [0, 0, 0, -0.5, -0.25, 0, 0, 0, -1.0]
    # The prompt still ends before the first model token, so both rows share [1, 2, 3].
    assert prompt_lengths(batch).tolist() == [3, 3]
    assert batch.loss_start() == 2  # the logits at position 2 predict token 10
    view = shared(batch, torch.tensor([0, 1])).view
    # The suffix pass starts one before the completion: positions 2..8 of row 0.
    assert view.response_mask[0].tolist() == [0, 1, 1, 0, 0, 0, 1]
    assert unshared(batch, torch.tensor([0])).view.response_mask[0].tolist() == [0, 1, 1, 0, 0, 0, 1]


def test_train_batch_refuses_a_mask_of_the_wrong_length_or_starting_on_an_observation():
    c = two_turn().to_completion()
    c.token_mask = c.token_mask[:-1]
    with pytest.raises(ValueError, match="token_mask of 5 for 6 tokens"):
        build_train_batch(RolloutBatch([c], n=1), torch.zeros(1, 1), torch.zeros(1, 1), pad_id=0)
    c.token_mask = [0, 1, 0, 0, 0, 1]
    with pytest.raises(ValueError, match="first token must be the model's"):
        build_train_batch(RolloutBatch([c], n=1), torch.zeros(1, 1), torch.zeros(1, 1), pad_id=0)


# --- config validation: named ConfigErrors before anything starts -------------------------------

@pytest.mark.parametrize("overrides, message", [
    (["env.name=calculatr"], "env.name='calculatr'"),
    ([f"env.name={ENVS}:NoStep"], "NoStep has no step\\(\\) method"),
    (["env=calculator", "+env.kwargs.colum=x"], "env.kwargs .*unexpected keyword argument 'colum'"),
    (["env.max_turns=3"], "env.max_turns=3 needs an environment"),
    (["env=calculator", "env.max_turns=0"], "env.max_turns=0 must be >= 1"),
    (["env=calculator", "env.unfinished_reward=inf"], "env.unfinished_reward=inf must be a finite number or null"),
    (["env=calculator", "env.max_total_tokens=8"], "env.max_total_tokens=8 is less than one turn"),
    (["env=calculator", "env.max_total_tokens=1000"], "data.max_prompt_tokens \\+ env.max_total_tokens"),
    (["env=calculator", "reward.functions=[{fn: math_answer, name: env}]"], "a reward function is named 'env'"),
    (["trainer.eval_reward=env"], "trainer.eval_reward='env' is not one of the rewards"),
])
def test_env_config_errors_name_the_key(overrides, message):
    from rlhf.config import ConfigError
    from rlhf.validation import validate
    from tests.support.runs import compose

    with pytest.raises(ConfigError, match=message):
        validate(compose(*overrides))


def test_env_eval_reward_is_valid_with_an_environment():
    from rlhf.validation import eval_reward, validate
    from tests.support.runs import compose

    cfg = compose("+experiment=calculator_arithmetic")
    validate(cfg)
    assert eval_reward(cfg) == "env"


def test_tools_go_into_the_template_or_the_system_message(tokenizer):
    import copy

    from rollouts.env.tools import with_tools

    tools = env_tools(CalculatorEnv)
    hi = [{"role": "user", "content": "Hi"}]
    # SmolLM2's template has no tool format: the tools are described in the system message instead.
    text = with_tools(tokenizer, hi, tools)
    assert text.startswith("<|im_start|>system\nYou may call these tools:\n<tools>\n") and '"calculate"' in text
    # A template with its own tool format gets them its way.
    own = copy.copy(tokenizer)
    own.chat_template = ("{% if tools %}TOOLS {{ tools | length }}\n{% endif %}{% for m in messages %}<|im_start|>"
                         "{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}"
                         "<|im_start|>assistant\n{% endif %}")
    assert with_tools(own, hi, tools) == "TOOLS 1\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert with_tools(own, hi, None) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


# --- unfinished episodes and what reward functions read (a scripted engine, the real loop) -------

def scripted(tokenizer, name: str, turns: list[list[str]], n: int, **env_kw):
    """The episode loop on one prompt ("What is 12 * 7 + 5?", answer "89") with ``n`` samples
    whose model turns are ``turns`` (tests/support/envs.py ScriptedEngines)."""
    from rlhf.config import EnvConfig
    from rlhf.experience.episodes import EnvRuntime, run_episodes
    from rlhf.types import SamplingSettings
    from tests.support.envs import ScriptedEngines

    from rollouts.env.api import BUILTINS

    spec = name if name in BUILTINS else f"{ENVS}:{name}"
    runtime = EnvRuntime(EnvConfig(name=spec, **env_kw), tokenizer, 256)
    prompt = tokenizer("What is 12 * 7 + 5?", add_special_tokens=False)["input_ids"]
    item = {"prompt": "What is 12 * 7 + 5?", "prompt_text": "What is 12 * 7 + 5?", "answer": "89"}
    try:
        return run_episodes(ScriptedEngines(tokenizer, turns), [prompt], [item], SamplingSettings(n=n), runtime)
    finally:
        runtime.close()


def score(episodes, functions, env_weight: float = 1.0):
    from rlhf.config import RewardConfig, RewardFnConfig
    from rlhf.experience.prompts import PromptItem
    from rlhf.experience.scoring import score_episodes
    from rewards.runner import RewardRunner

    item = PromptItem([1], "What is 12 * 7 + 5?", "What is 12 * 7 + 5?", {"answer": "89"})
    with RewardRunner(RewardConfig(functions=[RewardFnConfig(**f) for f in functions])) as runner:
        return score_episodes(runner, [item], episodes, env_weight, with_env=True)


GUESS_TURNS = [["It is 89.", "89", "I think 3.", "No idea."], ["Maybe 4?", "Still no idea."]]


def test_guess_half_answering_gets_nonzero_advantages(tokenizer):
    from rlhf.algo.advantages import compute_advantages
    from rlhf.experience.batching import rewards_matrix

    # The README's Guess rewards only success. 4 samples, max_turns=2: samples 0 and 1 name the
    # answer in turn 1 (reward 1.0, done); 2 and 3 get "try again", miss again in turn 2, and run
    # out of turns unrewarded: env.unfinished_reward = 0.0 each, counted as max_turns.
    episodes = scripted(tokenizer, "Guess", GUESS_TURNS, n=4, max_turns=2)
    assert episodes.env_rewards == [1.0, 1.0, 0.0, 0.0]
    assert episodes.unfinished == [None, None, "max_turns", "max_turns"]
    m = episodes.metrics
    assert (m["env/unfinished/max_turns"], m["env/unfinished/budget"], m["env/unfinished/errors"]) == (2, 0, 0)
    assert m["env/reward_none"] == 0 and m["env/max_turns_stops"] == 2
    scored = score(episodes, [])
    assert scored.total == [1.0, 1.0, 0.0, 0.0] and scored.metrics["reward/total/none"] == 0
    # GRPO: mean 0.5, deviations +-0.5, sample std sqrt((4 x 0.25) / 3) = 0.57735;
    # advantage +-0.5 / (0.57735 + 1e-6) = +-0.866024.
    adv = compute_advantages(rewards_matrix(scored.total, 4), "grpo")
    assert adv.tolist()[0] == pytest.approx([0.866024, 0.866024, -0.866024, -0.866024], abs=1e-6)


def test_unfinished_reward_null_drops_unrewarded_episodes_as_before(tokenizer):
    from rlhf.algo.advantages import compute_advantages
    from rlhf.experience.batching import rewards_matrix

    episodes = scripted(tokenizer, "Guess", GUESS_TURNS, n=4, max_turns=2, unfinished_reward=None)
    assert episodes.env_rewards == [1.0, 1.0, None, None]
    assert episodes.metrics["env/reward_none"] == 2 and episodes.metrics["env/unfinished/max_turns"] == 2
    scored = score(episodes, [])
    # The valid rewards [1.0, 1.0] are all equal: no signal, every advantage exactly 0.
    assert compute_advantages(rewards_matrix(scored.total, 4), "grpo").tolist() == [[0.0] * 4]


def test_unfinished_causes_errors_and_budget(tokenizer):
    # Every step raises: the model never got an answer from the environment ("errors", 2 turns each).
    raised = scripted(tokenizer, "StepRaises", [["a", "b"], ["c", "d"]], n=2, max_turns=2)
    assert raised.unfinished == ["errors", "errors"] and raised.env_rewards == [0.0, 0.0]
    assert raised.metrics["env/unfinished/errors"] == 2 and raised.metrics["env/step_errors"] == 4
    # "Hello there" + <|im_end|> is 3 tokens; what follows it (newline, the observation cut to 3
    # tokens, the tool and assistant turn tokens) is 13, not under the 12 - 3 = 9 left of
    # max_total_tokens: no room for a second turn ("budget").
    cut = scripted(tokenizer, "LongObservation", [["Hello there"]], n=1, max_turns=3, max_tool_tokens=3,
                   max_total_tokens=12, unfinished_reward=-0.5)
    assert cut.unfinished == ["budget"] and cut.env_rewards == [-0.5]
    assert cut.metrics["env/unfinished/budget"] == 1 and cut.metrics["env/budget_stops"] == 1


def test_a_done_without_reward_stays_a_failed_reward(tokenizer):
    # The calculator reads its reference from the prompt column, which is no number: it declines to
    # score (None). That is not an unfinished episode (the environment ended it); it stays None.
    episodes = scripted(tokenizer, "calculator", [["It is 89."]], n=1, max_turns=2,
                        kwargs={"answer_column": "prompt"})
    assert episodes.unfinished == [None] and episodes.env_rewards == [None]
    assert episodes.metrics["env/reward_none"] == 1


def test_reward_functions_score_the_model_turn_and_see_the_transcript(tokenizer):
    call = '<tool_call>{"name": "calculate", "arguments": {"expression": "12*7+5"}}</tool_call>'
    # Two samples call the calculator (observation "89"), then sample 0 answers without a number
    # and sample 1 answers 89. Scored on the whole text, sample 0's last number would be the
    # tool's 89, a right answer it never gave.
    episodes = scripted(tokenizer, "calculator", [[call, call], ["I am done.", "So it is 89."]], n=2, max_turns=3)
    assert episodes.last_turns == ["I am done.", "So it is 89."]
    assert "89" in episodes.rollouts.completions[0].text  # the tool's result is in the transcript
    scored = score(episodes, [{"fn": "math_answer"},
                              {"fn": f"{ENVS}:transcript_has_answer", "weight": 0.0, "name": "seen"}],
                   env_weight=0.0)
    assert scored.per_fn["math_answer"] == [0.0, 1.0]
    assert scored.per_fn["env"] == [0.0, 1.0]  # the calculator scores the last turn as well
    assert scored.per_fn["seen"] == [1.0, 1.0]  # the transcript column holds the observation
