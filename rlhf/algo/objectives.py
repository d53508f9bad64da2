"""The learner's objectives by name: what one micro-batch's logits cost, ``OBJECTIVES.get(name)``.

    grpo   the GRPO-family objective (grpo.py) on log-probs of the engines' sampling
           distribution, with the entropy bonus and, with a teacher, distillation's raw log-probs
    sft    completion-token cross-entropy at temperature 1 (sft.py); advantages are ignored

The learner rank (rlhf/learner/rank.py) runs whichever its group was built with
(``LearnerGroup(objective=...)``) and knows none of them by name: a new objective is one
registered ``Objective`` here. Each decides which distribution its log-probs are taken from, so
the logits, not log-probs, come in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from rlhf.algo.grpo import grpo_objective
from rlhf.algo.logprobs import token_entropy, token_logprobs
from rlhf.algo.registry import Registry
from rlhf.algo.sft import sft_loss
from rlhf.config import AlgoConfig
from rlhf.types import SamplingSettings, TrainBatch


# loss(logits [B, L, V], micro-batch, algo, sampling, *, total_tokens, total_seqs) -> (loss, metrics);
# sampling: the engines' settings (rollout.*), whose temperature, top-k and top-p the log-probs are taken under
Loss = Callable[..., tuple[Tensor, dict[str, Tensor]]]


@dataclass(frozen=True)
class Objective:
    """One learner objective. ``loss`` takes the micro-batch's logits aligned with its completion
    positions, and the whole mini-batch's normalisers (``rlhf.algo.normalisers``), so micro-batch
    losses add up; metrics as in grpo.py.

    ``reads_pre_update``: the loss compares with the pre-update policy (``old_logprobs``, else this
    forward's). A model with dropout makes this forward noisy, so the learner then scores the
    pre-update log-probs first, in a pass without dropout."""

    loss: Loss
    reads_pre_update: bool


OBJECTIVES: Registry = Registry("learner objective")


def _grpo(logits: Tensor, batch: TrainBatch, algo: AlgoConfig, sampling: SamplingSettings, *,
          total_tokens: float, total_seqs: float) -> tuple[Tensor, dict[str, Tensor]]:
    how = dict(temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p)
    logprobs = token_logprobs(logits, batch.input_ids, **how)
    with torch.set_grad_enabled(algo.entropy_coef != 0):  # the bonus's gradient only where it counts
        entropy = token_entropy(logits, **how)
    # Distillation compares raw log-probs (the teacher's are): one more pass over these logits.
    raw = (token_logprobs(logits.detach(), batch.input_ids, temperature=1.0)
           if batch.teacher_logprobs is not None and batch.old_raw_logprobs is None else None)
    return grpo_objective(logprobs, batch, algo, total_tokens=total_tokens, total_seqs=total_seqs,
                          entropy=entropy, raw_logprobs=raw)


def _sft(logits: Tensor, batch: TrainBatch, algo: AlgoConfig, sampling: SamplingSettings, *,
         total_tokens: float, total_seqs: float) -> tuple[Tensor, dict[str, Tensor]]:
    # The teacher's tokens, learnt as written: no sampling temperature applies.
    logprobs = token_logprobs(logits, batch.input_ids, temperature=1.0)
    return sft_loss(logprobs, batch.response_mask, total_tokens=total_tokens), {}


OBJECTIVES.register("grpo")(Objective(_grpo, reads_pre_update=True))
OBJECTIVES.register("sft")(Objective(_sft, reads_pre_update=False))
