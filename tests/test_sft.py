"""SFT on teacher answers (rlhf/distill/sft.py) with the real DeepSpeed learner on the tiny model.

One module-scoped run: 16 teacher answers "A + B = S" in the teacher dataset's format, batches of 8
(2 updates an epoch), 2 epochs, micro-batches of 4 (accumulation exercised), lr 1e-2. Then a
second session with sft.epochs=3 and trainer.resume=true continues from the saved step 4.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from rlhf.config import ConfigError
from rlhf.config.store import register_configs, to_object
from rlhf.distill.sft import batch_indices, collate, load_examples, run_sft
from rlhf.run.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
register_configs()


def teacher_rows(n: int = 16) -> list[dict]:
    rows = []
    for i in range(n):
        a, b = i % 7, (3 * i) % 5
        prompt = f"What is {a} + {b}?"
        answer = f"{a} + {b} = {a + b}"
        rows.append({"prompt": prompt, "completion": answer, "answer": str(a + b),
                     "messages": [{"role": "user", "content": prompt},
                                  {"role": "assistant", "content": answer}]})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def sft_config(out: Path, data: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return to_object(compose(config_name="config", overrides=[
            "model=tiny", "+sft=default", f"sft.data_path={data}", f"trainer.output_dir={out}",
            "sft.batch_size=8", "sft.epochs=2", "sft.lr=1e-2", "learner.micro_batch_size=4",
            "learner.num_threads=2", "trainer.tensorboard=false", "ledger.device_kind=cpu", *overrides]))


@pytest.fixture(scope="module")
def sft_run(ray_session, tiny_model_path, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sft")
    data = write_jsonl(tmp / "teacher.jsonl", teacher_rows())
    cfg = sft_config(tmp / "run", data)
    run_dir = run_sft(cfg)
    first = read_metrics(run_dir / "metrics.jsonl")
    ledger = json.loads((run_dir / "ledger.json").read_text())
    resumed = run_sft(sft_config(tmp / "run", data, "sft.epochs=3", "trainer.resume=true"))
    return cfg, run_dir, first, ledger, read_metrics(resumed / "metrics.jsonl")


def test_sft_lowers_the_loss_on_teacher_data(sft_run):
    _, _, first, _, _ = sft_run
    losses = [m["loss"] for m in first]
    assert [m["step"] for m in first] == [1, 2, 3, 4]
    # A random model starts near ln(49152) = 10.8 nats a token; every update lowers it, and after
    # 4 (measured: 10.85 -> 7.90) it is more than 2 nats lower.
    assert losses[0] > 10.0
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < losses[0] - 2.0, losses


def test_first_loss_is_the_completion_token_mean_of_a_plain_forward(sft_run, tiny_model_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg, _, first, _, _ = sft_run
    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    examples = load_examples(cfg.sft.data_path, tok, 1024, "error")
    batch = collate([examples[i] for i in batch_indices(16, 8, 0, 1)], tok.pad_token_id)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    # logits[:, t] predicts token t + 1; the loss counts answer tokens only (response_mask).
    nll = -torch.log_softmax(logits[:, :-1].double(), -1).gather(-1, batch.input_ids[:, 1:, None])[..., 0]
    mask = batch.response_mask[:, 1:].double()
    expected = (nll * mask).sum() / mask.sum()
    assert first[0]["loss"] == pytest.approx(expected.item(), abs=1e-5)
    # The prompt is masked: SmolLM2's template puts a default system turn and the user turn first.
    assert batch.response_mask.sum() < 0.3 * batch.attention_mask.sum()


def test_ledger_checkpoint_and_export(sft_run, tiny_model_path):
    from transformers import AutoModelForCausalLM

    _, run_dir, _, ledger, _ = sft_run
    assert ledger["totals"]["run_kind"] == "sft"
    # Tokens trained: every real token of the 4 batches (2 epochs over all 16 examples).
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    examples = load_examples(run_dir.parent / "teacher.jsonl", tok, 1024, "error")
    assert ledger["totals"]["tokens_trained"] == 2 * sum(len(e.input_ids) for e in examples)
    assert (run_dir / "checkpoints" / "step-4" / "COMPLETE").is_file()
    model = AutoModelForCausalLM.from_pretrained(run_dir / "export")
    assert sum(p.numel() for p in model.parameters()) > 0


def test_resume_continues_after_the_last_checkpoint(sft_run):
    _, run_dir, first, _, resumed = sft_run
    # The second session (3 epochs) trained only steps 5 and 6, appending to the metrics file.
    assert [m["step"] for m in resumed] == [1, 2, 3, 4, 5, 6]
    assert resumed[:4] == first
    assert resumed[-1]["epoch"] == 3
    assert (run_dir / "checkpoints" / "step-6" / "COMPLETE").is_file()


def test_bad_teacher_dataset_names_line_and_column(tmp_path, tiny_model_path):
    rows = teacher_rows(3)
    del rows[1]["messages"]
    data = write_jsonl(tmp_path / "teacher.jsonl", rows)
    with pytest.raises(ValueError, match=r"teacher.jsonl line 2: missing column\(s\) \['messages'\]"):
        run_sft(sft_config(tmp_path / "run", data))
    rows = teacher_rows(3)
    rows[2]["messages"] = rows[2]["messages"][:1]
    data = write_jsonl(tmp_path / "teacher.jsonl", rows)
    with pytest.raises(ValueError, match=r"teacher.jsonl row 2: 'messages' must be a list of at least two"):
        run_sft(sft_config(tmp_path / "run", data))
    rows[2]["messages"] = list(reversed(teacher_rows(3)[2]["messages"]))
    data = write_jsonl(tmp_path / "teacher.jsonl", rows)
    with pytest.raises(ValueError, match=r"row 2: the last message must be the teacher's answer"):
        run_sft(sft_config(tmp_path / "run", data))
    with pytest.raises(ValueError, match=r"3 examples, fewer than sft.batch_size=8"):
        run_sft(sft_config(tmp_path / "run", write_jsonl(tmp_path / "ok.jsonl", teacher_rows(3))))
    with pytest.raises(ConfigError, match=r"sft.data_path is not set"):
        run_sft(sft_config(tmp_path / "run", tmp_path / "x.jsonl", "sft.data_path=null"))
    with pytest.raises(ConfigError, match=r"sft.batch_size=5 is not divisible by learner.num_ranks=2"):
        run_sft(sft_config(tmp_path / "run", data, "sft.batch_size=5", "learner.num_ranks=2"))
    assert not (tmp_path / "run" / "ledger.json").exists()  # nothing started
