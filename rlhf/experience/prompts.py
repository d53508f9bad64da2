"""Prompt data: load (datasets library), prepare once, then serve seeded batches across epochs.

Sources (``data.source``):

- ``arithmetic``: the built-in generator (:mod:`rlhf.experience.tasks.arithmetic`);
- ``gsm8k``: :mod:`rlhf.experience.tasks.gsm8k`, from ``data.path`` or the hub;
- ``files``: ``data.path`` / ``data.eval_path``: a jsonl, json, parquet or csv file (or a glob);
- ``hub``: ``data.path`` is a hub dataset id (``data.hub_config``, ``data.split`` / ``data.eval_split``).

Preparation (one ``dataset.map``): the prompt column (plain text, or a list of chat messages) gets
the optional system prompt and the tokenizer's chat template, and is tokenized. Prompts longer
than ``data.max_prompt_tokens`` are dropped with a logged count (or raise, ``on_too_long: error``).

Iteration: epoch ``e`` visits the prompts in the order of a permutation seeded with
``shuffle_seed + e``; a batch that runs past the end continues into the next epoch.
``state_dict()`` is that position, and ``load_state_dict()`` resumes at exactly the next prompt.
"""

from __future__ import annotations

import glob
import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np

from rlhf.config import ConfigError, DataConfig
from rlhf.experience.tasks import arithmetic, gsm8k
from rollouts.env.tools import tools_in_system, with_tools

log = logging.getLogger(__name__)

_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
# Prepared columns (the user's own columns keep their names beside these).
_TEXT, _IDS, _RAW = "_prompt_text", "_prompt_ids", "_raw_prompt"


@dataclass
class PromptItem:
    prompt_ids: list[int]  # tokens of prompt_text: what the engine is given
    prompt_text: str  # the prompt after system prompt and chat template
    raw_prompt: str  # the user's prompt as written (the last user message for chat prompts)
    columns: dict[str, Any] = field(default_factory=dict)  # `answer` and data.reward_columns


class DataError(ValueError):
    """Bad prompt data; the message names the source and the column/row/file."""


class PromptDataset:
    def __init__(self, prepared: datasets.Dataset, source: str, shuffle_seed: int, columns: dict[str, str]):
        """Use :meth:`from_config`. ``columns`` maps PromptItem column names to dataset columns."""
        self._data = prepared
        self.source = source
        self.shuffle_seed = shuffle_seed
        self._columns = columns
        self.epoch = 0
        self.position = 0  # index into this epoch's order of the next prompt to serve
        self._order = self._permutation(0)

    @classmethod
    def from_config(cls, cfg: DataConfig, tokenizer: Any, split: str = "train",
                    tools: list[dict] | None = None) -> "PromptDataset":
        """``split``: "train" or "eval" (the held-out prompts of the same source). ``tools``: the
        environment's tool schemas, written into every prompt (:func:`with_tools`)."""
        raw, source = load_raw(cfg, split)
        if len(raw) == 0:
            raise DataError(f"{source}: the dataset is empty")
        columns = _check_columns(cfg, raw, source)
        prepared = _prepare(cfg, raw, tokenizer, source, tools)
        return cls(prepared, source, cfg.shuffle_seed, columns)

    def __len__(self) -> int:
        return len(self._data)

    def next_batch(self, k: int) -> list[PromptItem]:
        """The next ``k`` prompts in this epoch's shuffled order, rolling into the next epoch."""
        if k < 1:
            raise ValueError(f"batch size {k} must be >= 1")
        indices: list[int] = []
        while len(indices) < k:
            if self.position == len(self._order):
                self.epoch += 1
                self.position = 0
                self._order = self._permutation(self.epoch)
            take = min(k - len(indices), len(self._order) - self.position)
            indices += self._order[self.position : self.position + take].tolist()
            self.position += take
        return self._items(indices)

    def eval_items(self, limit: int | None = None) -> list[PromptItem]:
        """The first ``limit`` prompts in stored order (no shuffling): a fixed evaluation set."""
        n = len(self) if limit is None else min(limit, len(self))
        return self._items(list(range(n)))

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "num_prompts": len(self),
                "shuffle_seed": self.shuffle_seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["num_prompts"] != len(self) or state["shuffle_seed"] != self.shuffle_seed:
            raise DataError(
                f"{self.source}: the checkpoint's data position is for {state['num_prompts']} prompts "
                f"shuffled with seed {state['shuffle_seed']}, but this dataset has {len(self)} prompts "
                f"and seed {self.shuffle_seed}; the data changed, so resuming would not continue it"
            )
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._permutation(self.epoch)

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng(self.shuffle_seed + epoch).permutation(len(self._data))

    def _items(self, indices: list[int]) -> list[PromptItem]:
        rows = self._data[indices]  # column -> list, in the order of `indices`
        return [
            PromptItem(
                prompt_ids=list(rows[_IDS][j]),
                prompt_text=rows[_TEXT][j],
                raw_prompt=rows[_RAW][j],
                columns={name: rows[col][j] for name, col in self._columns.items()},
            )
            for j in range(len(indices))
        ]


def load_raw(cfg: DataConfig, split: str) -> tuple[datasets.Dataset, str]:
    """The unprepared dataset for ``split`` ("train"/"eval") and a description of where it came from."""
    if split not in ("train", "eval"):
        raise ValueError(f"split={split!r} is not 'train' or 'eval'")
    if cfg.source == "arithmetic":
        return arithmetic.build(cfg.arithmetic, split), f"arithmetic task ({split})"
    if cfg.source == "gsm8k":
        where = cfg.path or gsm8k.HUB_ID
        return gsm8k.load(cfg.path, "train" if split == "train" else "test"), f"gsm8k {where} ({split})"
    if cfg.source == "files":
        key, path = ("data.path", cfg.path) if split == "train" else ("data.eval_path", cfg.eval_path)
        if not path:
            raise ConfigError(f"{key} is not set: data.source=files reads prompts from it")
        return _load_files(key, path), f"{key}={path!r}"
    if cfg.source == "hub":
        if not cfg.path:
            raise ConfigError("data.path is not set: data.source=hub needs a hub dataset id there")
        hub_split = cfg.split if split == "train" else cfg.eval_split
        if not hub_split:
            raise ConfigError("data.eval_split is not set: no eval split for data.source=hub")
        raw = datasets.load_dataset(cfg.path, cfg.hub_config, split=hub_split)
        return raw, f"hub dataset {cfg.path!r} split {hub_split!r}"
    raise ConfigError(f"data.source={cfg.source!r} is not one of ['arithmetic', 'gsm8k', 'files', 'hub']")


def _load_files(key: str, path: str) -> datasets.Dataset:
    files = sorted(glob.glob(str(Path(path).expanduser())))
    if not files:
        raise FileNotFoundError(f"{key}={path!r}: no such file")
    suffixes = {Path(f).suffix.lower() for f in files}
    unknown = suffixes - set(_BUILDERS)
    if unknown:
        raise DataError(f"{key}={path!r}: cannot read {sorted(unknown)} files; use one of {sorted(_BUILDERS)}")
    builders = {_BUILDERS[s] for s in suffixes}
    if len(builders) > 1:
        raise DataError(f"{key}={path!r} matches files of different formats: {sorted(suffixes)}")
    try:
        return datasets.load_dataset(builders.pop(), data_files=files, split="train")
    except Exception as e:  # the datasets library's parse errors do not say which setting pointed here
        raise DataError(f"{key}={path!r}: cannot load it: {type(e).__name__}: {e}") from e


def item_columns(cfg: DataConfig) -> dict[str, str]:
    """The prompt row's columns a PromptItem carries for the rewards, PromptItem column name ->
    dataset column: data.reward_columns as they are, the answer as ``answer`` (every column a
    reward sees: rlhf/experience/scoring.py's reward_column_names)."""
    columns = {c: c for c in cfg.reward_columns}
    if cfg.answer_column is not None:
        columns["answer"] = cfg.answer_column
    return columns


def _check_columns(cfg: DataConfig, raw: datasets.Dataset, source: str) -> dict[str, str]:
    wanted = [("data.prompt_column", cfg.prompt_column)]
    if cfg.answer_column is not None:
        wanted.append(("data.answer_column", cfg.answer_column))
    wanted += [(f"data.reward_columns[{i}]", c) for i, c in enumerate(cfg.reward_columns)]
    for key, column in wanted:
        if column not in raw.column_names:
            raise DataError(f"{source}: {key}={column!r} is not a column; the columns are {raw.column_names}")
    return item_columns(cfg)


def _prepare(cfg: DataConfig, raw: datasets.Dataset, tokenizer: Any, source: str,
             tools: list[dict] | None = None) -> datasets.Dataset:
    def prepare(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        texts, raws = [], []
        for prompt, index in zip(batch[cfg.prompt_column], indices):
            text, raw_prompt = _render(cfg, tokenizer, prompt, f"{source} row {index}", tools)
            texts.append(text)
            raws.append(raw_prompt)
        # The chat template already wrote the special tokens it wants.
        ids = tokenizer(texts, add_special_tokens=not cfg.apply_chat_template)["input_ids"]
        return {_TEXT: texts, _RAW: raws, _IDS: ids}

    # An explicit fingerprint: hashing the tokenizer inside `prepare` is slow and unreliable.
    fingerprint = hashlib.sha1(repr((raw._fingerprint, getattr(tokenizer, "name_or_path", ""),
                                     cfg.prompt_column, cfg.system_prompt, cfg.apply_chat_template, tools)).encode())
    prepared = raw.map(prepare, batched=True, with_indices=True, keep_in_memory=True,
                       new_fingerprint=fingerprint.hexdigest(), desc="preparing prompts")
    lengths = np.array([len(ids) for ids in prepared[_IDS]])
    too_long = np.flatnonzero(lengths > cfg.max_prompt_tokens)
    if len(too_long) and cfg.on_too_long == "error":
        i = int(too_long[0])
        raise DataError(
            f"{source} row {i}: prompt has {lengths[i]} tokens > data.max_prompt_tokens="
            f"{cfg.max_prompt_tokens} ({len(too_long)} prompts are too long; on_too_long=filter drops them)"
        )
    if len(too_long):
        log.warning("%s: dropped %d of %d prompts longer than data.max_prompt_tokens=%d", source,
                    len(too_long), len(prepared), cfg.max_prompt_tokens)
        prepared = prepared.select(np.flatnonzero(lengths <= cfg.max_prompt_tokens), keep_in_memory=True)
        if len(prepared) == 0:
            raise DataError(f"{source}: every prompt is longer than data.max_prompt_tokens={cfg.max_prompt_tokens}")
    return prepared


def _render(cfg: DataConfig, tokenizer: Any, prompt: Any, where: str,
            tools: list[dict] | None = None) -> tuple[str, str]:
    """(prompt text for the model, the raw user prompt) for one row's prompt value."""
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, list) and prompt and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in prompt
    ):
        messages = [{"role": m["role"], "content": m["content"]} for m in prompt]
    else:
        raise DataError(
            f"{where}: data.prompt_column={cfg.prompt_column!r} holds {type(prompt).__name__} "
            f"{str(prompt)[:80]!r}; expected text or a list of {{'role', 'content'}} messages"
        )
    users = [m["content"] for m in messages if m["role"] == "user"]
    if not users:
        raise DataError(f"{where}: the chat prompt has no user message")
    if cfg.system_prompt is not None:
        if messages[0]["role"] == "system":
            raise DataError(f"{where}: the chat prompt has its own system message and data.system_prompt is set")
        messages = [{"role": "system", "content": cfg.system_prompt}, *messages]
    if cfg.apply_chat_template:
        text = with_tools(tokenizer, messages, tools)
    elif len(messages) == 1 or (len(messages) == 2 and cfg.system_prompt is not None):
        text = "\n\n".join(m["content"] for m in (tools_in_system(messages, tools) if tools else messages))
    else:
        raise DataError(f"{where}: a multi-turn chat prompt needs data.apply_chat_template=true")
    return text, users[-1]
