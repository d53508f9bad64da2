"""Receiving half of the weight sync: methods that run inside each vLLM worker process.

vLLM mixes this class into its worker when the engine is built with
``worker_extension_cls="rollouts.worker_ext.WeightSyncExtension"``, so ``self`` is the worker.
The engine calls it with ``LLM.collective_rpc("load_weights_from_files", args=(paths,))``.
collective_rpc arguments are msgpack-encoded (tensors would arrive as lists), so the learner
writes safetensors files (into /dev/shm) and sends their paths.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from rlhf.tied_embeddings import LM_HEAD, ties_embeddings

_EMBED_SUFFIX = "embed_tokens.weight"


def _read(paths: list[str], copy_embed_to_lm_head: bool) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) pairs from every file; safetensors only, so nothing is unpickled."""
    from safetensors import safe_open

    for path in paths:
        with safe_open(path, framework="pt", device="cpu") as f:
            for name in f.keys():
                tensor = f.get_tensor(name)
                yield name, tensor
                # Tied embeddings: vLLM reloads the output head only when lm_head.weight is given;
                # without it every weight but the head changes (probe gap ~1.0 after an embed edit).
                if copy_embed_to_lm_head and name.endswith(_EMBED_SUFFIX):
                    yield LM_HEAD, tensor


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
        copy_head = ties_embeddings(self.model_config.hf_config) and LM_HEAD not in names
        copy_head = copy_head and any(n.endswith(_EMBED_SUFFIX) for n in names)
        # The worker's reload_weights wraps the model runner's in the vLLM config context, and
        # reload (unlike model.load_weights) re-runs the CPU backend's weight repacking.
        self.reload_weights(weights_iterator=_read(paths, copy_head), is_checkpoint_format=True)
        return len(names) + int(copy_head)
