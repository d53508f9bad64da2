"""A teacher for distillation tests: the tiny random model with seeded noise on every weight."""

from __future__ import annotations

import shutil
from pathlib import Path


def perturbed_copy(model_dir: str | Path, out: Path, std: float, seed: int = 0) -> Path:
    """``model_dir`` copied to ``out`` with N(0, std^2) noise added to every tensor (safetensors),
    tokenizer and config unchanged, so student and teacher share a vocabulary."""
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(model_dir, out)
    gen = torch.Generator().manual_seed(seed)
    for path in sorted(Path(out).glob("*.safetensors")):
        tensors = load_file(path)
        noisy = {k: (v + std * torch.randn(v.shape, generator=gen, dtype=v.dtype)).contiguous() for k, v in tensors.items()}
        save_file(noisy, path, metadata={"format": "pt"})
    return Path(out)
