"""Loading reward functions by built-in name, dotted path and file path; the per-sample decorator."""

from __future__ import annotations

import textwrap

import pytest

from rewards.api import load_reward, per_sample


def test_builtin_by_name_binds_kwargs():
    r = load_reward("format", {"tags": ["answer"]}, weight=0.5)
    assert (r.name, r.weight) == ("format", 0.5)
    # Only <answer> is required now, so a completion without <think> gets full marks.
    assert r.batch_fn(["q"], ["<answer>4</answer>"]) == [1.0]
    assert r.sample_fn("q", "<answer>4</answer>") == 1.0


def test_file_path_outside_the_package(tmp_path):
    file = tmp_path / "my_rewards.py"
    file.write_text(textwrap.dedent("""
        def shout(prompts, completions, bonus=0.0, **columns):
            return [float(c.isupper()) + bonus for c in completions]
    """))
    r = load_reward(f"{file}:shout", {"bonus": 0.5})
    assert r.name == "shout"
    # "HI" is upper case: 1 + 0.5; "hi" is not: 0 + 0.5.
    assert r.batch_fn(["q", "q"], ["HI", "hi"], answer=["x", "y"]) == [1.5, 0.5]


def test_dotted_path(tmp_path, monkeypatch):
    pkg = tmp_path / "user_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "scores.py").write_text(textwrap.dedent("""
        from rewards.api import per_sample

        @per_sample
        def matches(prompt, completion, answer, **row):
            return float(completion == answer)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    r = load_reward("user_pkg.scores:matches")
    assert r.sample_fn is not None  # per-sample: the runner schedules each completion alone
    assert r.batch_fn(["q", "q"], ["4", "5"], answer=["4", "4"]) == [1.0, 0.0]


def test_function_without_kwargs_gets_only_the_columns_it_names(tmp_path):
    file = tmp_path / "narrow.py"
    file.write_text("def f(prompts, completions, answer):\n    return [float(a == c) for a, c in zip(answer, completions)]\n")
    r = load_reward(f"{file}:f")
    # `difficulty` is not a parameter of f; it is not passed.
    assert r.batch_fn(["q"], ["7"], answer=["7"], difficulty=[3]) == [1.0]


@pytest.mark.parametrize(
    "spec, error, words",
    [
        ("/no/such/dir/rewards.py:score", FileNotFoundError, ["/no/such/dir/rewards.py:score", "not found"]),
        ("rewards.builtin.format:no_such_fn", AttributeError, ["no_such_fn", "format_reward"]),
        ("no_such_module_xyz:score", ModuleNotFoundError, ["no_such_module_xyz"]),
        ("math_anwser", ValueError, ["math_anwser", "math_answer"]),
    ],
)
def test_bad_specs_name_the_spec(spec, error, words):
    with pytest.raises(error) as info:
        load_reward(spec)
    for w in words:
        assert w in str(info.value)


def test_file_without_the_attribute_lists_what_it_has(tmp_path):
    file = tmp_path / "r.py"
    file.write_text("def score(prompts, completions, **c):\n    return [0.0] * len(completions)\n")
    with pytest.raises(AttributeError, match=r"has no attribute 'scor'.*score"):
        load_reward(f"{file}:scor")


def test_unknown_kwarg_fails_at_load():
    with pytest.raises(TypeError, match=r"'format'.*partial_credits"):
        load_reward("format", {"partial_credits": True})
    with pytest.raises(ValueError, match="mode='last'"):
        load_reward("math_answer", {"mode": "last"})


def test_per_sample_decorator_batch_form():
    @per_sample
    def double_len(prompt, completion, scale, **row):
        return len(completion) * scale

    # Each row gets its own `scale`: 2*1 and 3*10.
    assert double_len(["a", "b"], ["xy", "xyz"], scale=[1, 10]) == [2, 30]
    assert double_len.score_one("a", "xy", scale=1) == 2
