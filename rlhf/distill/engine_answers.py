"""Teacher answers from an open model on our own vLLM engines (``teacher.source=engines``): the SFT
dataset of the chain's collect stage, written exactly as the API collection writes it
(rlhf/distill/teacher_answers.py), from the same prompts JSONL (``teacher.path``).

Every prompt is chat-templated with the teacher's tokenizer and sampled ``samples_per_prompt`` times
in one batched generate (temperature, top_p, max_tokens as for an API). Nothing is paid per token:
the ledger counts the tokens the engines generated and their engine-hours. An interrupted
collection starts again (the stage marker of rlhf.distill.chain is written only once it is done).
"""

from __future__ import annotations

from pathlib import Path

from rlhf.config import ConfigError, TeacherConfig, TrainerConfig
from rlhf.distill.teacher_answers import (CollectResult, CollectStats, RewardFn, _extra_columns, _finish, _record,
                                  read_jsonl, to_messages)
from rlhf.run.ledger import CostLedger
from rlhf.types import SamplingSettings


def collect_with_engines(cfg: TeacherConfig, trainer: TrainerConfig, run_dir: str | Path,
                         model_cache: str | None = None, reward_fn: RewardFn | None = None,
                         ledger: CostLedger | None = None) -> CollectResult:
    """Answers of the teacher model ``cfg.model`` to every prompt row of ``cfg.path``."""
    import asyncio

    from transformers import AutoTokenizer

    from rlhf.cluster.startup import check_storage, model_folder, start_ray
    from rlhf.distill.teacher_answers import ascore
    from rollouts.group import EngineGroup

    if not cfg.model:
        raise ConfigError("teacher.model is not set: the open teacher's built-in name, HF folder or hub id")
    if not cfg.path:
        raise ConfigError("teacher.path is not set (the JSONL of prompts to ask the teacher)")
    rows = read_jsonl(cfg.path, [cfg.prompt_column])
    columns = _extra_columns(rows, (cfg.prompt_column,), "teacher prompts")
    messages = [to_messages(row[cfg.prompt_column], cfg.system_prompt, i) for i, row in enumerate(rows)]
    path = model_folder(cfg.model, model_cache)  # a local folder absolute: the engines' nodes have no cwd of ours
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    prompt_ids = [tokenizer(tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=False),
                            add_special_tokens=False)["input_ids"] for m in messages]
    sampling = SamplingSettings(n=cfg.samples_per_prompt, temperature=cfg.temperature, top_p=cfg.top_p,
                                max_new_tokens=cfg.max_tokens)
    start_ray(trainer, logs=None)  # the engines write no log files of their own here: Ray forwards their output
    group = EngineGroup(cfg.engines, path, cfg.dtype, cfg.trust_remote_code, role="teacher")
    try:
        check_storage(Path(run_dir), path, engines=group)  # before any token is generated
        if ledger is not None:
            ledger.set_teacher_engines(group.num_engines)
        batch = group.generate(prompt_ids, sampling)
    finally:
        group.shutdown()
    stats = CollectStats(rows=len(rows), answers=len(rows) * cfg.samples_per_prompt)
    records = []
    for c in batch.completions:
        i = c.prompt_index
        records.append(_record(rows[i][cfg.prompt_column], messages[i], c.text, {k: rows[i][k] for k in columns},
                               len(records) % cfg.samples_per_prompt, c.finish_reason, len(c.prompt_ids),
                               len(c.completion_ids)))
    stats.prompt_tokens = sum(len(c.prompt_ids) for c in batch.completions)
    stats.completion_tokens = batch.num_output_tokens
    if ledger is not None:
        ledger.add_generated(batch.num_output_tokens, batch.generate_s)
    rewards = asyncio.run(ascore(records, columns, reward_fn)) if reward_fn else None
    return _finish(records, rewards, cfg, Path(run_dir), stats)
