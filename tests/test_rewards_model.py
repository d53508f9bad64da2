"""reward_model: a sequence-classification model in a Ray actor scores like a direct forward pass."""

from __future__ import annotations

import pytest

from support.reward_models import make_tiny_classifier


@pytest.fixture(scope="module")
def tiny_classifier(tmp_path_factory, tiny_model_path):
    """A random 2-layer LlamaForSequenceClassification (one label) with the SmolLM2 tokenizer."""
    return make_tiny_classifier(tmp_path_factory.mktemp("tiny-rm"), tiny_model_path)


def direct_scores(path: str, texts: list[str]) -> list[float]:
    """One unpadded forward per text: the reference the batched actor must match."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    with torch.inference_mode():
        return [model(**tok(t, return_tensors="pt")).logits[0, 0].item() for t in texts]


def test_batched_actor_scores_match_direct_forward(ray_session, tiny_classifier):
    from rlhf.config import RewardConfig, RewardFnConfig
    from rewards.runner import RewardRunner

    prompts = ["What is 3 + 5?", "What is 2 + 2?", "Name a colour."]
    completions = ["8", "It is four, because two and two make four.", "Blue"]
    cfg = RewardConfig(functions=[RewardFnConfig(fn="reward_model", kwargs={"model": tiny_classifier,
                                                                             "batch_size": 2})],
                       timeout_s=120)
    with RewardRunner(cfg) as runner:
        got = runner.score(prompts, completions, {"answer": ["8", "4", "blue"]})
    # Batches of 2 with different lengths: the first batch is right-padded, so this also checks
    # that the score is read at each text's last real token, not at the padding.
    expected = direct_scores(tiny_classifier, [p + c for p, c in zip(prompts, completions)])
    assert got.total == pytest.approx(expected, abs=1e-5)
    assert len(set(round(x, 6) for x in expected)) == 3  # three different texts, three different scores


def test_bad_label_index_fails_at_load(ray_session, tiny_classifier):
    from rewards.api import load_reward

    with pytest.raises(ValueError, match="label_index=1 but .* has 1 labels"):
        load_reward("reward_model", {"model": tiny_classifier, "label_index": 1})
