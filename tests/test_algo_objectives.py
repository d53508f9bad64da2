"""The learner's objectives by name (rlhf/algo/objectives.py): each takes logits and picks the
distribution its log-probs come from; an unknown name is refused before any rank starts."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf.algo import normalisers
from rlhf.algo.objectives import OBJECTIVES
from rlhf.config import AlgoConfig, ConfigError, LearnerConfig
from rlhf.learner.settings import check_settings
from rlhf.types import SamplingSettings, TrainBatch

# One row, vocab 2. logits[:, t-1] scores input_ids[:, t]: position 1 (token 1) from logits [0, 0],
# position 2 (token 0) from logits [ln 3, 0]; position 0 is the prompt.
LOGITS = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0], [0.0, 0.0]]])
BATCH = TrainBatch(
    input_ids=torch.tensor([[0, 1, 0]]),
    attention_mask=torch.ones(1, 3, dtype=torch.long),
    response_mask=torch.tensor([[0.0, 1.0, 1.0]]),
    advantages=torch.tensor([1.0]),
)
HALF = SamplingSettings(temperature=0.5)


def _loss(name: str, sampling: SamplingSettings):
    tokens, seqs = normalisers(BATCH.response_mask)
    return OBJECTIVES.get(name).loss(LOGITS.clone().requires_grad_(True), BATCH, AlgoConfig(), sampling,
                                     total_tokens=tokens, total_seqs=seqs)


def test_the_registered_objectives():
    assert OBJECTIVES.names() == ["grpo", "sft"]
    assert OBJECTIVES.get("grpo").reads_pre_update and not OBJECTIVES.get("sft").reads_pre_update


@pytest.mark.parametrize("sampling", [SamplingSettings(), HALF])
def test_sft_is_the_completion_token_nll_at_temperature_one(sampling):
    # p(token 1 | [0, 0]) = 1/2, p(token 0 | [ln 3, 0]) = 3/4 whatever the sampling temperature:
    # (ln 2 + ln 4/3) / 2 = ln(8/3) / 2.
    loss, metrics = _loss("sft", sampling)
    assert loss.item() == pytest.approx(math.log(8 / 3) / 2, abs=1e-6) and metrics == {}


def test_grpo_takes_the_sampling_distribution():
    # On-policy (no old_logprobs): ratio 1, loss -A = -1 at any temperature. The entropy is the
    # sampling distribution's: at T=0.5 the logits double, [0, 0] -> ln 2 and [2 ln 3, 0] ->
    # softmax [9/10, 1/10] -> H = -(0.9 ln 0.9 + 0.1 ln 0.1); one row's token mean (ln 2 + H) / 2.
    loss, metrics = _loss("grpo", HALF)
    h = -(0.9 * math.log(0.9) + 0.1 * math.log(0.1))
    assert loss.item() == pytest.approx(-1.0, abs=1e-6)
    assert metrics["entropy"].item() == pytest.approx((math.log(2) + h) / 2, abs=1e-6)


def test_an_unknown_objective_is_refused_by_name_before_the_learner_starts():
    with pytest.raises(ConfigError, match=r"learner objective='dpo' is not a registered learner objective; "
                                          r"known: \['grpo', 'sft'\]"):
        check_settings(LearnerConfig(), AlgoConfig(), "float32", total_updates=10, objective="dpo")
