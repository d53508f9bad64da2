"""Full parameters out of a (possibly ZeRO-3 sharded) model, in buckets, as safetensors files.

Used by the weight sync (buckets into /dev/shm for the engines) and by the HF export. With LoRA
the tensors are the base model's, adapters merged in (rlhf/learner/lora.py), under the same names.
Tensors leave in checkpoint format (``checkpoint_format``): transformers 5 fuses some weights in
memory (a MoE layer's experts into one ``experts.gate_up_proj``), which vLLM and saved checkpoints
hold per expert.
Under ZeRO-3 every rank must walk the same buckets, because gathering a shard is a collective;
only rank 0 keeps (copies to CPU and writes) what was gathered. Under ZeRO-0/1/2 parameters are whole on every
rank and rank 0 alone reads them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from rlhf.learner.lora import is_lora, merged_entries
from rlhf.tied_embeddings import LM_HEAD, ties_embeddings
from rlhf.types import WeightEntry


def is_zero3(param: torch.nn.Parameter) -> bool:
    return hasattr(param, "ds_id")


def _numel(param: torch.nn.Parameter) -> int:
    return param.ds_numel if is_zero3(param) else param.numel()


def weight_entries(model: torch.nn.Module) -> list[WeightEntry]:
    """The model's tensors under their HF names, in registration order (tied weights once): its
    parameters themselves, or with LoRA the base model's with adapters merged (rlhf/learner/lora.py)."""
    if is_lora(model):
        return merged_entries(model)
    return [WeightEntry(name, (p,)) for name, p in model.named_parameters()]


def checkpoint_format(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` (in-memory names) as a checkpoint of ``model``'s family names and shapes them.

    transformers 5 converts some checkpoint weights at load (Qwen3-MoE, Mixtral, ...: the experts'
    per-expert ``experts.N.gate_proj/up_proj/down_proj`` fused into ``experts.gate_up_proj`` and
    ``experts.down_proj``); ``save_pretrained`` reverts that, and so must anything that hands our
    weights to vLLM or writes them out. vLLM given the fused names loads them without an error, into
    the wrong place: the probe gap was 0.03 after the first sync of a tiny Qwen3-MoE, 1e-6 with this.
    The conversion is transformers' own (``revert_weight_conversion``), so a family it registers is
    handled without a list here. Each converted tensor is a copy: safetensors refuses views of one
    storage. Meta tensors give the names and shapes without data (the broadcast layout).
    """
    from transformers.core_model_loading import revert_weight_conversion

    hf_model = model.get_base_model() if is_lora(model) else model
    out = revert_weight_conversion(hf_model, tensors)
    if out is tensors:  # nothing registered for this family
        return tensors
    return {name: t if tensors.get(name) is t else t.contiguous().clone() for name, t in out.items()}


def _plan(model: torch.nn.Module, bucket_bytes: int) -> list[list[WeightEntry]]:
    """``weight_entries`` cut into buckets of about ``bucket_bytes`` bytes each."""
    buckets: list[list[WeightEntry]] = [[]]
    size = 0
    for entry in weight_entries(model):
        p = entry.params[0]
        nbytes = _numel(p) * p.element_size()
        if buckets[-1] and size + nbytes > bucket_bytes:
            buckets.append([])
            size = 0
        buckets[-1].append(entry)
        size += nbytes
    return buckets


def full_parameter_buckets(
    model: torch.nn.Module,
    rank: int,
    bucket_bytes: int,
    include_tied_head: bool,
    dtype: torch.dtype | None = None,
    copy: bool = False,
    device: torch.device | str = "cpu",
) -> Iterator[dict[str, torch.Tensor]]:
    """Yield {HF name: full tensor on ``device``} buckets on rank 0 (empty dicts on other ranks).

    Without ``copy``, tensors already on the CPU in the wanted dtype are the parameters themselves
    (copying 0.5 GB costs more than writing it), and under ZeRO-3 a bucket is only valid until the
    next one is requested: consume each bucket before asking for the next.

    ``include_tied_head``: with tied embeddings, ``lm_head.weight`` is the embedding itself and
    ``named_parameters`` lists it once, under the embedding's name. vLLM's reload leaves its output
    head stale unless ``lm_head.weight`` is sent explicitly (tests/test_rollout.py pins it), so the
    sync adds it, as a bucket of its own (safetensors refuses two names for one storage within a
    file); the export leaves it out, as ``save_pretrained`` does.
    """
    import deepspeed

    tied = include_tied_head and ties_embeddings(model.config) and hasattr(model, "get_input_embeddings")
    embed = model.get_input_embeddings().weight if tied else None
    zero3 = any(is_zero3(p) for p in model.parameters())
    if not zero3 and rank != 0:
        return
    for bucket in _plan(model, bucket_bytes):
        params = [p for entry in bucket for p in entry.params]
        # modifier_rank=None: read-only gather, nothing is scattered back afterwards.
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=zero3):
            if rank != 0:
                yield {}
                continue
            out = {e.name: _host(e.params[0].data if e.compute is None else e.compute(), dtype, copy, device)
                   for e in bucket}
            yield checkpoint_format(model, out)
            for e in bucket:
                if embed is not None and e.compute is None and e.params[0] is embed:
                    yield {LM_HEAD: out[e.name]}


def gathered_parameters(model: torch.nn.Module, rank: int, keep: Callable[[str], bool]) -> dict[str, torch.Tensor]:
    """{name as ``named_parameters`` gives it: CPU copy} of the parameters ``keep`` accepts, on rank 0
    (empty elsewhere), in one gather: for small sets (LoRA adapters, tests). Collective under ZeRO-3."""
    import deepspeed

    named = [(n, p) for n, p in model.named_parameters() if keep(n)]
    zero3 = any(is_zero3(p) for _, p in named)
    with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None, enabled=zero3):
        if rank != 0:
            return {}
        return {n: p.data.detach().to("cpu", copy=True) for n, p in named}


def _host(t: torch.Tensor, dtype: torch.dtype | None, copy: bool, device: torch.device | str) -> torch.Tensor:
    return t.detach().to(device, dtype=dtype or t.dtype, copy=copy)


def write_buckets(
    buckets: Iterator[dict[str, torch.Tensor]], out_dir: Path, prefix: str = "bucket"
) -> tuple[list[str], int]:
    """Write each non-empty bucket as ``<prefix>-NNNNN.safetensors``; return (paths, bytes)."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    paths, total = [], 0
    for bucket in buckets:
        if not bucket:
            continue
        path = out_dir / f"{prefix}-{len(paths):05d}.safetensors"
        save_file(bucket, str(path), metadata={"format": "pt"})
        paths.append(str(path))
        total += sum(t.numel() * t.element_size() for t in bucket.values())
    return paths, total


def write_hf_weights(buckets: Iterator[dict[str, torch.Tensor]], out_dir: Path) -> int:
    """Write buckets as HF weight shards: ``model.safetensors`` when one shard, else
    ``model-0000i-of-0000n.safetensors`` plus ``model.safetensors.index.json``. Returns bytes."""
    tmp_paths, total = write_buckets(buckets, out_dir, prefix=".shard")
    n = len(tmp_paths)
    if n == 1:
        os.replace(tmp_paths[0], out_dir / "model.safetensors")
        return total
    from safetensors import safe_open

    weight_map: dict[str, str] = {}
    for i, tmp in enumerate(tmp_paths):
        final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        with safe_open(tmp, framework="pt") as f:
            weight_map.update({k: final for k in f.keys()})
        os.replace(tmp, out_dir / final)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return total
