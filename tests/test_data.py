"""Prompt data: loading through the datasets library, preparation, errors, seeded epochs, resume."""

from __future__ import annotations

import json
import logging
from decimal import Decimal
from pathlib import Path

import datasets
import pytest

from rlhf.config import ArithmeticTaskConfig, ConfigError, DataConfig
from rlhf.experience.prompts import DataError, PromptDataset
from rlhf.experience.tasks import arithmetic
from rlhf.experience.tasks.gsm8k import final_answer

GSM8K_DIR = Path(__file__).parents[1].parent / "shared/data/gsm8k"


@pytest.fixture(scope="module")
def tok(tiny_model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_path)


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


ROWS = [{"question": f"What is {i} + 1?", "answer": str(i + 1), "level": i % 3} for i in range(5)]


def files_cfg(path: str, **kw) -> DataConfig:
    return DataConfig(source="files", path=path, prompt_column=kw.pop("prompt_column", "question"), **kw)


# --- arithmetic -------------------------------------------------------------------------------

def test_arithmetic_eval_is_distinct_and_disjoint_from_train():
    cfg = ArithmeticTaskConfig()
    train, held_out = arithmetic.build(cfg, "train"), arithmetic.build(cfg, "eval")
    assert len(train) == cfg.num_train and len(held_out) == cfg.num_eval
    assert len(set(held_out["prompt"])) == cfg.num_eval
    assert not set(held_out["prompt"]) & set(train["prompt"])
    # Single-digit additions: 100 problems, 32 held out, so train uses the other 68 (all of them,
    # with 2000 draws: the chance that one is never drawn is 68 * (67/68)^2000 ~ 1e-11).
    assert len(set(train["prompt"])) == 100 - cfg.num_eval
    for prompt, answer in zip(train["prompt"][:50], train["answer"][:50]):
        a, b = prompt.removeprefix("What is ").removesuffix("?").split(" + ")
        assert int(answer) == int(a) + int(b)


def test_arithmetic_is_seeded():
    cfg = ArithmeticTaskConfig(num_train=20)
    assert arithmetic.build(cfg, "train")["prompt"] == arithmetic.build(cfg, "train")["prompt"]
    other = arithmetic.build(ArithmeticTaskConfig(num_train=20, seed=7), "train")["prompt"]
    assert other != arithmetic.build(cfg, "train")["prompt"]


def test_arithmetic_operators_and_precedence():
    assert arithmetic.evaluate("2 * 3 + 4") == 10
    assert arithmetic.evaluate("2 + 3 * 4") == 14
    assert arithmetic.evaluate("9 - 2 * 3 - 1") == 2  # 9 - 6 - 1
    assert arithmetic.evaluate("-3 * -2") == 6
    cfg = ArithmeticTaskConfig(ops=["+", "-", "*"], num_terms=3, min_operand=0, max_operand=20,
                               num_train=200, template="Compute {expr}.")
    rows = arithmetic.build(cfg, "train")
    for prompt, answer in zip(rows["prompt"], rows["answer"]):
        assert int(answer) == arithmetic.evaluate(prompt.removeprefix("Compute ").removesuffix("."))
    assert {op for p in rows["prompt"] for op in "+-*" if f" {op} " in p} == {"+", "-", "*"}


@pytest.mark.parametrize(
    "kw, words",
    [
        ({"num_eval": 64}, ["num_eval=64", "100 distinct"]),
        ({"ops": ["/"]}, ["ops=['/']"]),
        ({"min_operand": 5, "max_operand": 1}, ["min_operand=5"]),
        ({"template": "What is it?"}, ["template"]),
    ],
)
def test_arithmetic_bad_settings_name_the_key(kw, words):
    with pytest.raises(ConfigError) as info:
        arithmetic.build(ArithmeticTaskConfig(**kw), "train")
    for w in words:
        assert w in str(info.value)


def test_arithmetic_prompt_dataset(tok):
    ds = PromptDataset.from_config(DataConfig(), tok)
    item = ds.next_batch(1)[0]
    assert item.raw_prompt.startswith("What is ")
    assert item.prompt_text.endswith("<|im_start|>assistant\n")  # templated, generation prompt added
    assert item.raw_prompt in item.prompt_text
    # The ids are the templated text's tokens, with no extra BOS on top of the template's own.
    assert item.prompt_ids == tok(item.prompt_text, add_special_tokens=False)["input_ids"]
    assert set(item.columns) == {"answer"}


# --- files ------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet", "json"])
def test_local_files_by_extension(tmp_path, tok, fmt):
    path = tmp_path / f"prompts.{fmt}"
    table = datasets.Dataset.from_list(ROWS)
    {"jsonl": lambda: write_jsonl(path, ROWS), "json": lambda: path.write_text(json.dumps(ROWS)),
     "csv": lambda: table.to_csv(str(path), index=False), "parquet": lambda: table.to_parquet(str(path))}[fmt]()
    ds = PromptDataset.from_config(files_cfg(str(path), reward_columns=["level"]), tok)
    assert len(ds) == 5
    items = ds.eval_items()
    assert [i.raw_prompt for i in items] == [r["question"] for r in ROWS]
    # csv reads "1" back as the integer 1: columns keep the type the file gives them.
    assert [str(i.columns["answer"]) for i in items] == [r["answer"] for r in ROWS]
    assert [i.columns["level"] for i in items] == [0, 1, 2, 0, 1]


def test_chat_messages_and_system_prompt(tmp_path, tok):
    rows = [{"messages": [{"role": "user", "content": "Hi there"}], "answer": "x"}]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    cfg = files_cfg(path, prompt_column="messages", system_prompt="Be brief.")
    (item,) = PromptDataset.from_config(cfg, tok).eval_items()
    expected = tok.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}],
        tokenize=False, add_generation_prompt=True,
    )
    assert item.prompt_text == expected
    assert item.raw_prompt == "Hi there"


def test_without_chat_template(tmp_path, tok):
    path = write_jsonl(tmp_path / "p.jsonl", ROWS[:1])
    cfg = files_cfg(path, apply_chat_template=False, system_prompt="Answer with a number.")
    (item,) = PromptDataset.from_config(cfg, tok).eval_items()
    assert item.prompt_text == "Answer with a number.\n\nWhat is 0 + 1?"


def test_missing_column_names_it_and_lists_the_columns(tmp_path, tok):
    path = write_jsonl(tmp_path / "p.jsonl", ROWS)
    with pytest.raises(DataError, match=r"data.prompt_column='prompt' is not a column; the columns are "
                                        r"\['question', 'answer', 'level'\]"):
        PromptDataset.from_config(files_cfg(path, prompt_column="prompt"), tok)
    with pytest.raises(DataError, match=r"data.answer_column='answr'"):
        PromptDataset.from_config(files_cfg(path, answer_column="answr"), tok)
    with pytest.raises(DataError, match=r"data.reward_columns\[1\]='levl'.*'level'"):
        PromptDataset.from_config(files_cfg(path, reward_columns=["level", "levl"]), tok)


def test_file_errors_name_the_file(tmp_path, tok):
    missing = str(tmp_path / "nope.jsonl")
    with pytest.raises(FileNotFoundError, match=f"data.path='{missing}': no such file"):
        PromptDataset.from_config(files_cfg(missing), tok)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match=str(empty)):
        PromptDataset.from_config(files_cfg(str(empty)), tok)
    odd = tmp_path / "prompts.txt"
    odd.write_text("x")
    with pytest.raises(DataError, match=r"prompts.txt.*cannot read \['.txt'\]"):
        PromptDataset.from_config(files_cfg(str(odd)), tok)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"question": "a", "answer": "1"}\n{"question": \n')
    with pytest.raises(DataError, match="broken.jsonl.*cannot load"):
        PromptDataset.from_config(files_cfg(str(broken)), tok)
    with pytest.raises(ConfigError, match="data.eval_path is not set"):
        PromptDataset.from_config(files_cfg(str(broken)), tok, split="eval")


def test_bad_prompt_value_names_the_row(tmp_path, tok):
    path = write_jsonl(tmp_path / "p.jsonl", [{"question": "fine", "answer": "1"},
                                               {"question": [{"role": "user"}], "answer": "2"}])
    with pytest.raises(DataError, match=r"row 1: data.prompt_column='question' holds list"):
        PromptDataset.from_config(files_cfg(path), tok)


def test_too_long_prompts_filtered_with_count_or_error(tmp_path, tok, caplog):
    rows = [{"question": "short", "answer": "1"}, {"question": "word " * 300, "answer": "2"},
            {"question": "also short", "answer": "3"}]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="rlhf.experience.prompts"):
        ds = PromptDataset.from_config(files_cfg(path, max_prompt_tokens=64), tok)
    assert [i.raw_prompt for i in ds.eval_items()] == ["short", "also short"]
    assert "dropped 1 of 3 prompts longer than data.max_prompt_tokens=64" in caplog.text
    with pytest.raises(DataError, match=r"row 1: prompt has \d+ tokens > data.max_prompt_tokens=64"):
        PromptDataset.from_config(files_cfg(path, max_prompt_tokens=64, on_too_long="error"), tok)


# --- iteration --------------------------------------------------------------------------------

def test_epochs_are_seeded_permutations(tmp_path, tok):
    path = write_jsonl(tmp_path / "p.jsonl", ROWS)
    ds = PromptDataset.from_config(files_cfg(path, shuffle_seed=3), tok)
    seen = [i.raw_prompt for _ in range(5) for i in ds.next_batch(2)]  # 10 prompts = 2 epochs of 5
    assert sorted(seen[:5]) == sorted(seen[5:]) == sorted(r["question"] for r in ROWS)
    assert seen[:5] != seen[5:]  # epoch 1 uses seed 3 + 1: another order
    assert ds.state_dict() == {"epoch": 1, "position": 5, "num_prompts": 5, "shuffle_seed": 3}
    again = PromptDataset.from_config(files_cfg(path, shuffle_seed=3), tok)
    assert [i.raw_prompt for i in again.next_batch(10)] == seen  # a batch may span epochs


def test_resume_continues_at_the_exact_prompt(tmp_path, tok):
    path = write_jsonl(tmp_path / "p.jsonl", ROWS)
    first = PromptDataset.from_config(files_cfg(path), tok)
    first.next_batch(3)
    first.next_batch(3)  # into epoch 1, position 1
    state = first.state_dict()
    expected = [i.raw_prompt for i in first.next_batch(7)]
    resumed = PromptDataset.from_config(files_cfg(path), tok)
    resumed.load_state_dict(state)
    assert [i.raw_prompt for i in resumed.next_batch(7)] == expected
    shorter = PromptDataset.from_config(files_cfg(write_jsonl(tmp_path / "q.jsonl", ROWS[:4])), tok)
    with pytest.raises(DataError, match="5 prompts .* this dataset has 4 prompts"):
        shorter.load_state_dict(state)


# --- gsm8k ------------------------------------------------------------------------------------

def test_gsm8k_answer_parsing():
    assert final_answer("Natalia sold 48 + 24 = 72 clips.\n#### 72") == "72"
    assert final_answer("... so it costs $1,000.\n#### 1,000") == "1000"
    assert final_answer("#### -5") == "-5"
    assert final_answer("#### 2.50") == "2.5"
    with pytest.raises(ValueError, match="no '#### <number>'"):
        final_answer("the answer is 4")


@pytest.mark.skipif(not GSM8K_DIR.is_dir(), reason=f"{GSM8K_DIR} not present")
def test_gsm8k_from_shared_folder(tok):
    cfg = DataConfig(source="gsm8k", path=str(GSM8K_DIR), reward_columns=["solution"], max_prompt_tokens=512)
    train = PromptDataset.from_config(cfg, tok)
    test = PromptDataset.from_config(cfg, tok, split="eval")
    assert (len(train), len(test)) == (7473, 1319)  # every row fits in 512 tokens
    first = train.eval_items(1)[0]
    assert first.raw_prompt.startswith("Natalia sold clips to 48 of her friends")
    assert first.columns["answer"] == "72" and first.columns["solution"].endswith("#### 72")
    for item in train.eval_items(None) + test.eval_items(None):
        answer = item.columns["answer"]
        assert "," not in answer and Decimal(answer) == Decimal(item.columns["solution"].rsplit("####", 1)[1]
                                                                 .strip().replace(",", ""))
