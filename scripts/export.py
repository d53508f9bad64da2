"""Export a saved training checkpoint as a Hugging Face folder (safetensors, config, tokenizer).

    .venv/bin/python scripts/export.py runs/my-run --out runs/my-run/export-step-8
    .venv/bin/python scripts/export.py runs/my-run/checkpoints/step-4 --out /tmp/step4 --dtype bfloat16

CHECKPOINT is a ``step-N`` folder, a ``checkpoints`` folder, or a run folder (then the latest
complete checkpoint is used). The base model (config, generation config, tokenizer) and the dtype
default to the run's own ``model.name_or_path`` and ``model.dtype``. The checkpoint's manifest is
verified before DeepSpeed reads its (pickled) files; the result loads with
``AutoModelForCausalLM.from_pretrained`` and with vLLM. A LoRA run's checkpoint is exported merged,
plus ``<out>/adapter``, the PEFT adapter folder (model.lora is read from the checkpoint).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rlhf.learner.checkpoint import MARKER, latest_complete


def find_checkpoint(path: Path) -> Path:
    """A complete step folder from a step, checkpoints or run folder; errors name the path."""
    if not path.exists():
        raise FileNotFoundError(f"checkpoint path {path} does not exist")
    if (path / MARKER).is_file():
        return path
    for root in (path / "checkpoints", path):
        found = latest_complete(root)
        if found is not None:
            return found
    raise FileNotFoundError(f"no complete checkpoint (a step-N folder with a {MARKER} marker) in {path}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path, help="step-N folder, checkpoints folder or run folder")
    parser.add_argument("--out", type=Path, required=True, help="the HF folder to create (replaced if present)")
    parser.add_argument("--base-model", default=None, help="model for config + tokenizer (default: the run's)")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="weight dtype (default: the run's model.dtype)")
    args = parser.parse_args(argv)

    from rlhf.learner.export import describe_export, export_checkpoint

    ckpt = find_checkpoint(args.checkpoint)
    out = export_checkpoint(ckpt, args.out, base_model_path=args.base_model, dtype=args.dtype)
    print(f"exported {ckpt} -> {describe_export(out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
