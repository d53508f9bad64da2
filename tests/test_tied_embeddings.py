"""ties_embeddings on real transformers configs: plain, composite with the flag outside, inside."""

from __future__ import annotations

import pytest
from transformers import LlamaConfig, LlavaConfig, Qwen2_5_VLConfig

from rlhf.tied_embeddings import ties_embeddings


@pytest.mark.parametrize("tied", [True, False])
def test_a_plain_config_says_so_itself(tied):
    assert ties_embeddings(LlamaConfig(tie_word_embeddings=tied)) is tied


def test_a_composite_config_with_the_flag_outside_only():
    # transformers 5 keeps Qwen2.5-VL's flag on the outer config; its text config has no such
    # field, so reading the text config alone (as the three copies this replaced did) said False.
    config = Qwen2_5_VLConfig(tie_word_embeddings=True)
    assert not hasattr(config.get_text_config(decoder=True), "tie_word_embeddings")
    assert ties_embeddings(config) is True
    assert ties_embeddings(Qwen2_5_VLConfig(tie_word_embeddings=False)) is False


def test_a_composite_config_with_the_flag_in_its_text_config_only():
    # As a config saved before transformers 5 arrives: tied text config, outer flag False.
    config = LlavaConfig(text_config=LlamaConfig(tie_word_embeddings=True).to_dict())
    config.tie_word_embeddings = False
    assert ties_embeddings(config) is True
    assert ties_embeddings(LlavaConfig(text_config=LlamaConfig(tie_word_embeddings=False).to_dict())) is False


def test_the_tiny_test_model_ties(tiny_model_path):
    from transformers import AutoConfig

    assert ties_embeddings(AutoConfig.from_pretrained(tiny_model_path)) is True
