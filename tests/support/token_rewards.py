"""A reward with a learnable signal even for a random tiny model.

A random Llama's next-token distribution is close to uniform, so rewarding any one token gives no
signal. Instead, reward the share of completion tokens whose (initial) embedding row points along
one axis: half of the vocabulary qualifies, so the reward starts near 0.5, and the policy can raise
it by moving its hidden state along that axis, which lifts all those tokens' logits at once (the
output head is tied to the embedding). Plugged in by file path, the way users plug in a reward.
"""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file


class EmbeddingAxisShare:
    def __init__(self, model_path: str, axis: int = 0):
        embedding = load_file(str(Path(model_path) / "model.safetensors"))["model.embed_tokens.weight"]
        self.rewarded = set((embedding[:, axis] > 0).nonzero().flatten().tolist())

    def __call__(self, prompts, completions, completion_ids):
        return [sum(t in self.rewarded for t in ids) / len(ids) if ids else 0.0 for ids in completion_ids]
