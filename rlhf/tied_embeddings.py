"""Tied embeddings: when a model's output head IS its input embedding, and the head's HF name.

Three places must agree on it: the learner's weight buckets (send the head explicitly), the vLLM
worker's reload (copy the embedding into the head) and the HF export (leave the head out, as
``save_pretrained`` does). Imports nothing, so the learner, the rollout workers and the export
can all use it.
"""

from __future__ import annotations

LM_HEAD = "lm_head.weight"


def ties_embeddings(config) -> bool:
    """Whether an HF config (``PretrainedConfig``; vLLM's ``hf_config`` is one) ties the output
    head to the input embedding.

    A composite model (vision-language, ...) may say so on its outer config only (transformers 5:
    Qwen2.5-VL's text config has no such field) or on its text config only (configs saved before
    v5, and models whose config does not forward it). Either one saying so counts.
    """
    # decoder=True: the output head belongs to the decoder's text config (get_text_config()
    # without it raises on models with both an encoder and a decoder text config).
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    return any(bool(getattr(c, "tie_word_embeddings", False)) for c in (config, text))
