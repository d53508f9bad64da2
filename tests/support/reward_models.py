"""A tiny random sequence-classification model, for tests of the ``reward_model`` reward."""

from __future__ import annotations

from pathlib import Path


def make_tiny_classifier(out: Path, tokenizer_path: str) -> str:
    """A random 2-layer LlamaForSequenceClassification (one label) with the given tokenizer, saved in ``out``."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    tok = AutoTokenizer.from_pretrained(tokenizer_path)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=32, num_labels=1,
                         pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    LlamaForSequenceClassification(config).save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return str(out)
