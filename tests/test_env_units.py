"""Environments without a model: tool schemas, tool-call parsing, the calculator, loading and bad
environments, observation turns as ids (the real SmolLM2 tokenizer), trajectory assembly and the
mask through build_train_batch and shared-prompt packing. Token ids are built by hand."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rlhf.batching import build_train_batch
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

    from rlhf.data import with_tools

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
