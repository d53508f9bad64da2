"""Reward parameters against the columns they will be passed, and config-time spec checks.

A keyword parameter of a reward's call is filled by a column of that name, else a kwarg, else its
default. Given the column names (``RewardRunner(cfg, columns=...)``), a required parameter nothing
fills is refused at load time, and defaulted ones are named in one warning; ``check_specs``
resolves specs for config validation without building anything.
"""

from __future__ import annotations

import json
import logging
import textwrap

import pytest

from rlhf.config import DataConfig, RewardConfig, RewardFnConfig
from rlhf.experience.prompts import PromptDataset
from rlhf.experience.scoring import expand_for_rewards, reward_column_names
from rlhf.types import Completion, RolloutBatch
from rewards.api import check_specs
from rewards.runner import RewardRunner

# What training passes with data.answer_column=answer and no data.reward_columns.
COLUMNS = ["answer", "completion_length", "completion_ids"]


@pytest.fixture()
def reward_file(tmp_path):
    """User rewards by file path; building `Built` writes a marker file, so a test can tell."""
    marker = tmp_path / "built.txt"
    file = tmp_path / "user_rewards.py"
    file.write_text(textwrap.dedent(f"""
        def needs_level(prompts, completions, level):
            return [float(x) for x in level]

        def bonus(prompts, completions, difficulty=1.0, scale=1.0, **columns):
            return [difficulty * scale] * len(completions)

        class Built:
            def __init__(self, weight_path=None):
                open({str(marker)!r}, "w").write("built")

            def __call__(self, prompts, completions, level):
                return [float(x) for x in level]
    """))
    return file, marker


def fn(spec: str, **kwargs) -> RewardFnConfig:
    return RewardFnConfig(fn=spec, kwargs=kwargs)


def build(*fns: RewardFnConfig, columns=COLUMNS) -> RewardRunner:
    return RewardRunner(RewardConfig(functions=list(fns)), columns=columns)


# --- RewardRunner(columns=...) ------------------------------------------------------------------

def test_required_parameter_without_a_column_fails_at_load_naming_it(reward_file):
    file, _ = reward_file
    with pytest.raises(ValueError) as err:
        build(fn(f"{file}:needs_level"))
    message = str(err.value)
    assert "reward.functions[0] 'needs_level'" in message and "['level'] have no default" in message
    assert "the columns passed are ['answer', 'completion_ids', 'completion_length']" in message
    # With the column there, it loads and scores: levels 2 and 3 become rewards 2.0 and 3.0.
    with build(fn(f"{file}:needs_level"), columns=[*COLUMNS, "level"]) as r:
        assert r.score(["q", "q"], ["a", "b"], {"level": [2, 3]}).total == [2.0, 3.0]


def test_the_check_runs_before_any_reward_is_built(reward_file):
    # Built.__call__ needs `level`; the class must not be instantiated (a reward model would start
    # an actor and load weights) before that is refused.
    file, marker = reward_file
    with pytest.raises(ValueError, match=r"reward.functions\[1\] 'Built'.*\['level'\]"):
        build(fn("format"), fn(f"{file}:Built"))
    assert not marker.exists()
    # A class's kwargs go to its constructor: they cannot fill a parameter of its call.
    with pytest.raises(ValueError, match=r"\['level'\]"):
        build(fn(f"{file}:Built", level=3))


def test_defaulted_parameters_matching_nothing_get_one_warning(reward_file, caplog):
    file, _ = reward_file
    # A misspelt column: the data has `difficulty_level`, the function reads `difficulty`.
    with caplog.at_level(logging.WARNING, logger="rewards.runner"):
        build(fn(f"{file}:bonus", scale=2.0), columns=[*COLUMNS, "difficulty_level"]).close()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    # `scale` is a kwarg, so only `difficulty` takes its default.
    assert "'bonus'" in warnings[0] and "['difficulty'] are neither a column nor a kwarg" in warnings[0]
    assert "'difficulty_level'" in warnings[0]


def test_builtin_tunables_are_warned_about_but_load(caplog):
    with caplog.at_level(logging.WARNING, logger="rewards.runner"):
        build(fn("code_exec", time_s=2.0), columns=[*COLUMNS, "tests"]).close()
        build(fn("math_answer")).close()  # `answer` is a column: nothing to say
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "'code_exec'" in warnings[0] and "['memory_mb']" in warnings[0], warnings


def test_without_columns_nothing_is_checked(reward_file):
    file, _ = reward_file
    build(fn(f"{file}:needs_level"), columns=None).close()  # old callers: loads as before


def test_the_columns_named_are_the_columns_scored(tmp_path, tiny_model_path):
    # reward_column_names(cfg.data) is what train/eval tell the runner; expand_for_rewards is what
    # score then gets. They must be the same names.
    from transformers import AutoTokenizer

    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"question": "What is 1 + 1?", "answer": "2", "level": 1}) + "\n")
    cfg = DataConfig(source="files", path=str(path), prompt_column="question", reward_columns=["level"])
    items = PromptDataset.from_config(cfg, AutoTokenizer.from_pretrained(tiny_model_path)).eval_items()
    rollouts = RolloutBatch(completions=[Completion(0, items[0].prompt_ids, [5, 6], [0.0, 0.0], "stop", "2")], n=1)
    _, _, columns = expand_for_rewards(items, rollouts)
    assert sorted(columns) == sorted(reward_column_names(cfg)) == [
        "answer", "completion_ids", "completion_length", "level", "transcript"]


# --- check_specs --------------------------------------------------------------------------------

def test_check_specs_accepts_every_kind_of_spec_without_building(reward_file):
    file, marker = reward_file
    check_specs([fn("math_answer", mode="gsm8k"), fn("rewards.builtin.format:format_reward"),
                 fn(f"{file}:Built", weight_path="w.bin"), fn(f"{file}:bonus", scale=2.0)])
    assert not marker.exists()  # resolved, never instantiated


@pytest.mark.parametrize("spec, words", [
    ("math_anwser", ["is not a built-in", "math_answer"]),
    ("/no/such/dir/rewards.py:score", ["FileNotFoundError", "/no/such/dir/rewards.py"]),
    ("no_such_module_xyz:score", ["ModuleNotFoundError", "no_such_module_xyz"]),
    ("rewards.builtin.format:no_such_fn", ["AttributeError", "format_reward"]),
    ("rewards.builtin.math_answer:MODES", ["resolves to tuple"]),
])
def test_check_specs_names_the_entry_and_the_spec(spec, words):
    with pytest.raises(ValueError) as err:
        check_specs([fn("format"), fn(spec)])
    message = str(err.value)
    assert message.startswith(f"reward.functions[1].fn={spec!r}"), message
    for w in words:
        assert w in message


def test_check_specs_reports_a_user_file_that_does_not_import(tmp_path):
    file = tmp_path / "broken.py"
    file.write_text("def score(prompts, completions:\n")
    with pytest.raises(ValueError, match=r"reward.functions\[0\].fn=.*broken.py:score.*SyntaxError"):
        check_specs([fn(f"{file}:score")])


def test_check_specs_checks_kwargs_against_the_function_or_constructor(reward_file):
    file, marker = reward_file
    with pytest.raises(ValueError, match=r"reward.functions\[0\].kwargs.*partial_credits"):
        check_specs([fn("format", partial_credits=True)])
    with pytest.raises(ValueError, match=r"reward.functions\[0\].kwargs.*max_length"):
        check_specs([fn("length", mode="linear")])  # LengthPenalty needs max_length
    with pytest.raises(ValueError, match=r"reward.functions\[0\].kwargs.*weight_paht"):
        check_specs([fn(f"{file}:Built", weight_paht="w.bin")])
    assert not marker.exists()


def test_check_specs_with_columns_refuses_a_required_parameter(reward_file):
    file, _ = reward_file
    with pytest.raises(ValueError, match=r"reward.functions\[0\] 'needs_level'.*\['level'\]"):
        check_specs([fn(f"{file}:needs_level")], columns=COLUMNS)
    check_specs([fn(f"{file}:needs_level")], columns=[*COLUMNS, "level"])
    check_specs([fn(f"{file}:needs_level", level=1)], columns=COLUMNS)  # a function's kwarg fills it
