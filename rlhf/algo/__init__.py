"""GRPO algorithm core as pure tensor functions, each family in a name -> function registry.

registry.py     Registry: name -> function, the unknown name's error listing the known ones
advantages.py   rewards [G, n] -> advantages (grpo, dr_grpo, rloo, reinforce_pp), has_signal
losses.py       clipped per-token policy losses (ppo_clip, gspo)
kl.py           per-token KL estimators (k1, k2, k3)
correction.py   sampler/learner mismatch metrics and rollout corrections (none, tis, icepop, token_reject,
                seq_mask)
distill.py      on-policy distillation's per-token advantage from a teacher's log-probs (reverse_kl)
aggregation.py  per-token loss -> scalar, micro-batch safe (token_mean, seq_mean_token_mean, ...)
logprobs.py     token log-probs / entropies from logits in bounded memory
grpo.py         the GRPO objective for one micro-batch: policy loss + KL - entropy, with a teacher's term
sft.py          the SFT loss for one micro-batch: completion-token cross-entropy
objectives.py   the learner's objectives by name (grpo, sft): one micro-batch's logits -> loss, metrics
shapes.py       shape checks whose errors name the argument
"""

from rlhf.algo.advantages import ADVANTAGES, compute_advantages, group_has_signal, has_signal, valid_mask
from rlhf.algo.aggregation import AGGREGATIONS, aggregate, normalisers
from rlhf.algo.correction import ROLLOUT_CORRECTIONS, correction_weights, mismatch_stats
from rlhf.algo.grpo import grpo_objective
from rlhf.algo.kl import KL_ESTIMATORS
from rlhf.algo.logprobs import token_entropy, token_logprobs
from rlhf.algo.losses import POLICY_LOSSES
from rlhf.algo.registry import Registry, UnknownNameError

__all__ = [
    "ADVANTAGES",
    "AGGREGATIONS",
    "KL_ESTIMATORS",
    "POLICY_LOSSES",
    "ROLLOUT_CORRECTIONS",
    "Registry",
    "UnknownNameError",
    "aggregate",
    "compute_advantages",
    "correction_weights",
    "group_has_signal",
    "grpo_objective",
    "has_signal",
    "mismatch_stats",
    "normalisers",
    "token_entropy",
    "token_logprobs",
    "valid_mask",
]
