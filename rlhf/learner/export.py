"""Hugging Face export: a folder that ``AutoModelForCausalLM.from_pretrained`` and vLLM load.

Contents: safetensors weights (``model.safetensors``, or shards plus an index), ``config.json``
(the base model's architecture with the export dtype), ``generation_config.json`` and the
tokenizer files. Tied output heads are left out, and weights that transformers fuses in memory (MoE
experts) are written per expert, as ``save_pretrained`` does (``checkpoint_format``). A LoRA run's export
holds the merged weights plus ``adapter/``, the PEFT adapter folder (rlhf/learner/lora.py).

Two sources: a live ``LearnerGroup`` (``LearnerGroup.export``) or any saved checkpoint
(``export_checkpoint``, used by ``scripts/export.py``), whose DeepSpeed shards are merged with
DeepSpeed's own ``zero_to_fp32`` (or, without ZeRO, read whole) after the checkpoint's manifest and
pickles have been checked.
The folder is built beside the target and renamed into place when complete.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from rlhf.config import LoraConfig
from rlhf.learner.lora import ADAPTER_DIR, is_lora_state, peft_config, save_adapter_folder, split_checkpoint_state
from rlhf.learner.weights import checkpoint_format, write_hf_weights
from rlhf.tied_embeddings import LM_HEAD, ties_embeddings

_BUCKET_BYTES = 2 << 30  # shard size of exports made from checkpoints


def publish_hf_folder(
    out_dir: Path,
    write_weights: Callable[[Path], None],
    base_model_path: str,
    tokenizer_path: str,
    dtype: str,
    trust_remote_code: bool = False,
) -> Path:
    """Build the export in a temporary sibling folder, then rename it to ``out_dir``."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        write_weights(tmp)
        config = AutoConfig.from_pretrained(base_model_path, trust_remote_code=trust_remote_code)
        config.dtype = dtype
        config.save_pretrained(tmp)
        try:
            gen = GenerationConfig.from_pretrained(base_model_path)
        except OSError:  # the base folder has none
            gen = GenerationConfig.from_model_config(config)
        gen.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(tokenizer_path, trust_remote_code=trust_remote_code).save_pretrained(tmp)
        if not any(tmp.glob("*.safetensors")):
            raise RuntimeError(
                f"export to {out_dir}: no weights were written into {tmp} as this driver sees it (learner "
                "rank 0 writes them: on a cluster trainer.output_dir must be on storage every node sees)"
            )
        old = None
        if out_dir.exists():
            old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return out_dir


def _buckets(state: dict[str, torch.Tensor], dtype: torch.dtype, bucket_bytes: int) -> Iterator[dict[str, torch.Tensor]]:
    bucket: dict[str, torch.Tensor] = {}
    size = 0
    for name, t in state.items():
        t = t.to(dtype).contiguous()
        if bucket and size + t.numel() * t.element_size() > bucket_bytes:
            yield bucket
            bucket, size = {}, 0
        bucket[name] = t
        size += t.numel() * t.element_size()
    if bucket:
        yield bucket


def export_checkpoint(
    ckpt_dir: str | Path,
    out_dir: str | Path,
    base_model_path: str | None = None,
    dtype: str | None = None,
    tokenizer_path: str | None = None,
) -> Path:
    """Export a saved checkpoint (``<run>/checkpoints/step-N``) as an HF folder.

    ``base_model_path`` (config, generation config, tokenizer) and ``dtype`` default to the run's
    own ``model.name_or_path`` / ``model.dtype`` recorded in the checkpoint's client state.
    """
    from transformers import AutoConfig

    from rlhf.learner.checkpoint import open_checkpoint
    from rlhf.learner.rank import torch_dtype
    from rlhf.models import resolve_model_path

    ckpt_dir = Path(ckpt_dir)
    # The manifest and the pickles are checked once, before zero_to_fp32 unpickles anything.
    run_model = open_checkpoint(ckpt_dir).get("config", {}).get("model", {})
    if base_model_path is None:
        if "name_or_path" not in run_model:
            raise ValueError(
                f"{ckpt_dir}/client_state.json records no config.model.name_or_path; pass the base model "
                "(--base-model) for the config and tokenizer"
            )
        base_model_path = resolve_model_path(run_model["name_or_path"], run_model.get("cache_dir"))
    dtype = dtype or run_model.get("dtype", "float32")
    trust = bool(run_model.get("trust_remote_code", False))
    state = checkpoint_weights(ckpt_dir)
    adapter: dict[str, torch.Tensor] | None = None
    if is_lora_state(state):  # a LoRA run: module names are peft's
        state, adapter = split_checkpoint_state(state, _run_lora(run_model, ckpt_dir))
    config = AutoConfig.from_pretrained(base_model_path, trust_remote_code=trust)
    if ties_embeddings(config):
        state.pop(LM_HEAD, None)
    state = checkpoint_format(_meta_model(config, trust), state)  # DeepSpeed saved in-memory names
    buckets = _buckets(state, torch_dtype(dtype), _BUCKET_BYTES)

    def write(tmp: Path) -> None:
        write_hf_weights(buckets, tmp)
        if adapter is not None:
            lora_cfg = peft_config(_run_lora(run_model, ckpt_dir), base_model_path)
            cast = {k: v.to(torch_dtype(dtype)) for k, v in adapter.items()}
            save_adapter_folder(cast, lora_cfg, tmp / ADAPTER_DIR)

    return publish_hf_folder(
        Path(out_dir), write, base_model_path, tokenizer_path or base_model_path, dtype, trust_remote_code=trust,
    )


def _meta_model(config, trust_remote_code: bool) -> torch.nn.Module:
    """The model class of ``config`` without weights: what the checkpoint-format conversion asks of it."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def checkpoint_weights(ckpt_dir: Path) -> dict[str, torch.Tensor]:
    """Full fp32 weights by module name from a checkpoint that ``open_checkpoint`` has verified:
    DeepSpeed's zero_to_fp32 over the ranks' ZeRO partitions, or, for a run without ZeRO (one fp32
    rank, ``ds_config.zero_stage``), the module state DeepSpeed saved whole."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from rlhf.learner.checkpoint import has_zero_partitions, safe_load
    from rlhf.learner.rank import DS_TAG

    if has_zero_partitions(ckpt_dir / DS_TAG):
        return get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=DS_TAG)
    states = ckpt_dir / DS_TAG / "mp_rank_00_model_states.pt"
    if not states.is_file():
        raise FileNotFoundError(f"{ckpt_dir} holds neither ZeRO partitions nor {states.name} under {DS_TAG}/")
    return {name: t.float() for name, t in safe_load(states)["module"].items()}


def _run_lora(run_model: dict, ckpt_dir: Path) -> LoraConfig:
    """The run's model.lora, which a checkpoint holding adapters must record (scaling = alpha / rank)."""
    recorded = run_model.get("lora") or {}
    if int(recorded.get("rank", 0)) <= 0:
        raise ValueError(
            f"{ckpt_dir} holds LoRA adapters but its client_state.json records no config.model.lora with "
            "rank > 0: the merge needs the run's model.lora.rank and model.lora.alpha"
        )
    return LoraConfig(**recorded)


def describe_export(out_dir: Path) -> str:
    """One line: files and total weight bytes of an export folder."""
    files = sorted(p.name for p in Path(out_dir).iterdir())
    weights = sum(p.stat().st_size for p in Path(out_dir).glob("*.safetensors"))
    return json.dumps({"folder": str(out_dir), "files": files, "weight_bytes": weights})
