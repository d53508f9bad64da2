"""SFT on teacher answers (sequence-level distillation): ``python -m rlhf.distill.sft sft.data_path=...``

    python -m rlhf.distill.sft model=smollm2 sft.data_path=runs/teacher/teacher.jsonl \
        sft.epochs=2 sft.batch_size=16 trainer.output_dir=runs/sft

Reads the teacher dataset (rlhf/distill/teacher_answers.py writes it: one JSON object per line whose
``messages`` are the prompt turns followed by the teacher's assistant answer), renders each with the
model's chat template, and trains the same DeepSpeed learner GRPO uses (``LearnerGroup``, ranks as
Ray actors) with ``objective="sft"``: cross-entropy of the answer tokens only (the prompt, the
template's assistant header and the padding are masked out), token-mean over each whole batch.

The run folder gets metrics.jsonl (loss per update) and TensorBoard, ledger.json (run_kind "sft":
tokens trained, device-hours), atomic checkpoints (checkpoints/step-N; ``trainer.resume=true``
picks up after the last one) and the HF export (export/) that a GRPO run can start from
(``model.name_or_path=<run>/export``).

Sequences are right-padded per batch; packing several examples into one row is not implemented.
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from rlhf.cli import hydra_main
from rlhf.cluster.startup import check_storage, prepare, start_ray
from rlhf.config import AlgoConfig, Config, ConfigError
from rlhf.config.store import register_configs
from rlhf.console import component_logs
from rlhf.distill.teacher_answers import read_jsonl
from rlhf.experience.batching import pad_sequences
from rlhf.learner.checkpoint import latest_complete
from rlhf.run.ledger import CostLedger
from rlhf.run.metrics import MetricsLogger
from rlhf.run.rng import seed_everything
from rlhf.types import TrainBatch

register_configs()

EXPORT_DIR = "export"


@dataclass(frozen=True)
class SFTExample:
    """One tokenised teacher answer: ``input_ids[:prompt_len]`` is context, the rest is learnt."""

    input_ids: list[int]
    prompt_len: int


def tokenize_example(tokenizer: Any, messages: Any, where: str) -> SFTExample:
    """Prompt turns + the assistant answer through the chat template; the answer's tokens are the
    ones the template adds after the prompt rendered with its generation header."""
    if (not isinstance(messages, list) or len(messages) < 2
            or not all(isinstance(m, dict) and isinstance(m.get("role"), str)
                       and isinstance(m.get("content"), str) for m in messages)):
        raise ValueError(f"{where}: 'messages' must be a list of at least two "
                         f"{{'role', 'content'}} messages, got {str(messages)[:80]!r}")
    if messages[-1]["role"] != "assistant":
        raise ValueError(f"{where}: the last message must be the teacher's answer (role "
                         f"'assistant'), got role {messages[-1]['role']!r}")
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=True, add_generation_prompt=True)["input_ids"]
    full = tokenizer.apply_chat_template(messages, tokenize=True)["input_ids"]
    if full[: len(prompt)] != prompt or len(full) == len(prompt):
        raise ValueError(f"{where}: the chat template does not render the prompt as a prefix of the "
                         "conversation, so the answer's tokens cannot be told apart")
    return SFTExample(input_ids=list(full), prompt_len=len(prompt))


def load_examples(path: str | Path, tokenizer: Any, max_seq_len: int, on_too_long: str) -> list[SFTExample]:
    """Every line of the teacher dataset, tokenised; over-long ones dropped (counted) or an error."""
    rows = read_jsonl(path, ["messages"])  # names the line of a row without it
    examples, too_long = [], []
    for lineno, row in enumerate(rows, start=1):
        ex = tokenize_example(tokenizer, row["messages"], f"{path} row {lineno - 1}")
        if len(ex.input_ids) > max_seq_len:
            if on_too_long == "error":
                raise ValueError(f"{path} row {lineno - 1}: {len(ex.input_ids)} tokens > "
                                 f"sft.max_seq_len={max_seq_len} (sft.on_too_long=filter drops it)")
            too_long.append(lineno - 1)
            continue
        examples.append(ex)
    if too_long:
        print(f"sft: dropped {len(too_long)} of {len(rows)} examples longer than "
              f"sft.max_seq_len={max_seq_len} (rows {too_long[:10]}...)", flush=True)
    if not examples:
        raise ValueError(f"{path}: no examples to train on ({len(rows)} rows, {len(too_long)} too long)")
    return examples


def collate(examples: list[SFTExample], pad_id: int) -> TrainBatch:
    """Right-padded batch; response_mask is 1 on answer tokens only."""
    input_ids, attention_mask, response_mask = pad_sequences(
        [e.input_ids for e in examples], [e.prompt_len for e in examples], pad_id
    )
    return TrainBatch(input_ids=input_ids, attention_mask=attention_mask, response_mask=response_mask,
                      advantages=torch.zeros(len(examples)))


def batch_indices(num_examples: int, batch_size: int, seed: int, step: int) -> list[int]:
    """Example indices of update ``step`` (1-based): epoch e is a permutation seeded by seed + e,
    cut into full batches (the remainder is dropped). A function of the step alone, so a resumed
    run trains on exactly the batches an uninterrupted one would."""
    per_epoch = num_examples // batch_size
    epoch, k = divmod(step - 1, per_epoch)
    order = torch.randperm(num_examples, generator=torch.Generator().manual_seed(seed + epoch))
    return order[k * batch_size : (k + 1) * batch_size].tolist()


def check_config(cfg: Config) -> None:
    """The SFT settings, checked before any model loads."""
    s = cfg.sft
    if not s.data_path:
        raise ConfigError("sft.data_path is not set (the teacher dataset, e.g. <run>/teacher.jsonl)")
    for key, value in [("sft.epochs", s.epochs), ("sft.batch_size", s.batch_size),
                       ("sft.max_seq_len", s.max_seq_len)]:
        if value < 1:
            raise ConfigError(f"{key}={value} must be >= 1")
    if s.save_every < 0:
        raise ConfigError(f"sft.save_every={s.save_every} must be >= 0")
    if s.on_too_long not in ("filter", "error"):
        raise ConfigError(f"sft.on_too_long={s.on_too_long!r} is not one of ['filter', 'error']")
    if s.batch_size % cfg.learner.num_ranks:
        raise ConfigError(f"sft.batch_size={s.batch_size} is not divisible by "
                          f"learner.num_ranks={cfg.learner.num_ranks}")
    if s.lr is not None and not s.lr > 0:
        raise ConfigError(f"sft.lr={s.lr} must be > 0 (or null for learner.lr)")


def run_sft(cfg: Config) -> Path:
    """Train on the teacher dataset; returns the run folder (its export/ is the tuned model)."""
    from transformers import AutoTokenizer

    from rlhf.learner import LearnerGroup

    check_config(cfg)
    seed_everything(cfg.trainer.seed)
    start = prepare(cfg)  # absolute paths: the ranks' nodes share no working directory with this one
    cfg, model_path, run_dir = start.cfg, start.model_path, start.run_dir
    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=cfg.model.trust_remote_code)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    examples = load_examples(cfg.sft.data_path, tokenizer, cfg.sft.max_seq_len, cfg.sft.on_too_long)
    if len(examples) < cfg.sft.batch_size:
        raise ValueError(f"{cfg.sft.data_path}: {len(examples)} examples, fewer than "
                         f"sft.batch_size={cfg.sft.batch_size}")
    total_steps = cfg.sft.epochs * (len(examples) // cfg.sft.batch_size)
    learner_cfg = replace(cfg.learner, lr=cfg.sft.lr if cfg.sft.lr is not None else cfg.learner.lr)
    ckpt_dir = run_dir / "checkpoints"
    run_dir.mkdir(parents=True, exist_ok=True)

    with ExitStack() as stack:
        ledger = CostLedger(run_dir, cfg.ledger, run_kind="sft")
        logs = component_logs(cfg.trainer)
        start_ray(cfg.trainer, logs)
        # AlgoConfig(): kl_coef 0, so no reference model is loaded; the GRPO settings go unused.
        learner = LearnerGroup(learner_cfg, AlgoConfig(), model_path, cfg.model.dtype,
                               cfg.model.trust_remote_code, total_updates=total_steps, logs=logs,
                               lora=cfg.model.lora, objective="sft")
        stack.callback(learner.shutdown)
        check_storage(run_dir, model_path, learner=learner)  # before a rank writes a checkpoint or the export
        start_step = 0
        if cfg.trainer.resume and (last := latest_complete(ckpt_dir)) is not None:
            start_step = learner.load(last)["step"]
            print(f"resumed from {last} at step {start_step}", flush=True)
        logger = MetricsLogger(run_dir, cfg.trainer.tensorboard, cfg.trainer.wandb_project,
                               OmegaConf.to_container(OmegaConf.structured(cfg)), resume=start_step > 0)
        stack.callback(logger.close)

        def save(step: int) -> None:
            state = {"step": step, "config": OmegaConf.to_container(OmegaConf.structured(cfg))}
            learner.save(ckpt_dir, step, state, keep_last=cfg.trainer.keep_last)

        per_epoch = len(examples) // cfg.sft.batch_size
        nonfinite = 0
        for step in range(start_step + 1, total_steps + 1):
            batch = collate([examples[i] for i in batch_indices(len(examples), cfg.sft.batch_size,
                                                                 cfg.sft.shuffle_seed, step)], pad_id)
            start = time.perf_counter()
            metrics = learner.train_step(batch)
            metrics["timing/train"] = time.perf_counter() - start
            metrics["epoch"] = (step - 1) // per_epoch + 1
            ledger.add_trained(int(batch.attention_mask.sum()))
            logger.log(step, metrics)
            print(f"sft step {step}/{total_steps} epoch {metrics['epoch']} loss={metrics['loss']:.4f} "
                  f"lr={metrics['lr']:.2e} tok/s={metrics['tokens/s']:.0f}", flush=True)
            nonfinite = nonfinite + 1 if metrics.get("skipped", 0) else 0
            if nonfinite >= cfg.trainer.max_nonfinite_steps:
                raise RuntimeError(f"{nonfinite} consecutive SFT updates had a non-finite loss or gradient "
                                   f"(trainer.max_nonfinite_steps={cfg.trainer.max_nonfinite_steps})")
            if cfg.sft.save_every and step % cfg.sft.save_every == 0 and step < total_steps:
                save(step)
        if start_step < total_steps:
            save(total_steps)
        if cfg.trainer.export_at_end:
            learner.export(run_dir / EXPORT_DIR, tokenizer_path=model_path)
        print(ledger.close())
    print(f"run folder: {run_dir}")
    return run_dir


main = hydra_main(run_sft)


if __name__ == "__main__":
    main()
