"""The GRPO-family objective for one micro-batch: policy loss + KL penalty - entropy bonus.

    loss = agg(policy_loss) + kl_coef * agg(kl) - entropy_coef * agg(entropy)

With a teacher (on-policy distillation, ``TrainBatch.teacher_logprobs``), the policy loss takes a
per-token advantage: the sequence's task advantage plus ``distill_coef`` times the distillation
objective's (rlhf/algo/distill.py), A_t = A_seq + distill_coef * -(log π_s - log π_T). log π_s is
the learner's pre-update log-prob of the token at temperature 1, untruncated, as the teacher's is
(``old_raw_logprobs``, else this forward pass's ``raw_logprobs``): the sampling temperature and
top-k/top-p shape what is sampled, not what is compared, or a teacher equal to the student would
give a nonzero advantage.
With no task reward (every reward weight 0, or none) A_seq is 0: pure distillation.

``agg`` is the configured aggregation, normalised by whole-mini-batch counts (see
aggregation.py), so the learner sums the micro-batch losses and gradients. ``sample_weight``
weighs each sequence once, in the aggregation (a weight of 0.5 halves that sequence's share);
sequences with weight 0 are masked out of every term and every diagnostic.

When the batch carries the sampler's log-probs (``TrainBatch.sampler_logprobs``), the gap between
the learner's pre-update log-probs and the sampler's is measured (``mismatch/*``) and the policy
loss is weighted per token by ``algo.rollout_correction`` (rlhf/algo/correction.py). The learner's
pre-update log-probs are ``old_logprobs`` when given, else this very forward pass (one update per
batch: the policy has not moved yet), so the default path costs no extra forward pass.

Metrics (detached 0-dim tensors), and how the learner combines them over micro-batches and ranks
(``RankMetrics`` in rlhf/learner/rank_metrics.py):
- added up: policy_loss, kl, entropy (aggregated like the loss), clip_frac/*, ratio/mean,
  mismatch/* means, distill/* means, rollout_correction/* (token shares: micro-batch mean x its
  weighted kept tokens / total_tokens).
- largest / smallest: the names in MAX_METRICS / MIN_METRICS (ratio/max, mismatch max, ratio/min).
"""

from __future__ import annotations

from torch import Tensor

from rlhf.algo.aggregation import aggregate
from rlhf.algo.correction import correction_weights, mismatch_stats
from rlhf.algo.distill import DISTILL_OBJECTIVES, distill_stats
from rlhf.algo.kl import KL_ESTIMATORS
from rlhf.algo.losses import POLICY_LOSSES
from rlhf.config import AlgoConfig
from rlhf.types import TrainBatch

# Metrics that are extremes, not shares: they combine over micro-batches and ranks by max / min.
MAX_METRICS = ("ratio/max", "mismatch/abs_logprob_diff_max")
MIN_METRICS = ("ratio/min",)


def grpo_objective(
    logprobs: Tensor,
    batch: TrainBatch,
    cfg: AlgoConfig,
    *,
    total_tokens: float,
    total_seqs: float,
    entropy: Tensor | None = None,
    raw_logprobs: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Scalar loss of this micro-batch and its metrics.

    logprobs [B, L]: the policy's token log-probs (token_logprobs), with grad.
    batch: the micro-batch (response_mask, advantages, old/ref/teacher log-probs, sample_weight).
    total_tokens, total_seqs: normalisers(...) of the whole mini-batch.
    entropy [B, L]: token_entropy(...), needed when cfg.entropy_coef > 0.
    raw_logprobs [B, L]: this forward's log-probs at temperature 1, untruncated (detached), the
        student's side of distillation when the batch has teacher but no old_raw_logprobs.
    """
    if cfg.kl_coef > 0 and batch.ref_logprobs is None:
        raise ValueError(f"algo.kl_coef={cfg.kl_coef} > 0 but the batch has no ref_logprobs")
    if batch.teacher_logprobs is not None and not cfg.distill_coef > 0:
        raise ValueError(f"the batch has teacher_logprobs but algo.distill_coef={cfg.distill_coef} is not > 0")
    if cfg.entropy_coef != 0 and entropy is None:
        raise ValueError(f"algo.entropy_coef={cfg.entropy_coef} != 0 but no entropy was given")
    # Dr.GRPO's constant; the learner's settings check refuses a null before any rank starts.
    if cfg.loss_agg == "seq_mean_token_sum_norm" and cfg.norm_length is None:
        raise ValueError(
            "algo.norm_length is null: set it (conf/algo/dr_grpo.yaml sets it to ${rollout.max_new_tokens})"
        )
    # 0/1: the tokens that count. The sequence weight is applied once, by the aggregation.
    mask = batch.response_mask.to(logprobs.dtype)
    weight = batch.sample_weight
    if weight is not None:
        weight = weight.to(mask.dtype)
        mask = mask * (weight > 0).to(mask.dtype)[:, None]
    # Off-policy correction only exists when the batch carries behaviour log-probs.
    old = logprobs.detach() if batch.old_logprobs is None else batch.old_logprobs
    agg = dict(
        total_tokens=total_tokens,
        total_seqs=total_seqs,
        norm_length=cfg.norm_length,
        seq_weight=weight,
    )

    advantages, diag = batch.advantages, {}  # [B]
    if batch.teacher_logprobs is not None:
        student = _raw_student(batch, raw_logprobs)
        per_token_adv = DISTILL_OBJECTIVES.get(cfg.distill)(student, batch.teacher_logprobs, mask, clamp=cfg.distill_clamp)
        advantages = advantages[:, None] * mask + cfg.distill_coef * per_token_adv  # [B, L]
        diag.update(distill_stats(student, batch.teacher_logprobs, mask))
    per_token, loss_diag = POLICY_LOSSES.get(cfg.policy_loss)(
        logprobs, old, advantages, mask,
        clip_low=cfg.clip_low, clip_high=cfg.clip_high, dual_clip=cfg.dual_clip,
    )
    diag.update(loss_diag)
    if batch.sampler_logprobs is not None:
        diag.update(mismatch_stats(old, batch.sampler_logprobs, mask))
        if cfg.rollout_correction != "none":
            rho_weight, corrected = correction_weights(
                cfg.rollout_correction, old, batch.sampler_logprobs, mask,
                cap=cfg.correction_cap, low=cfg.correction_low, high=cfg.correction_high,
            )
            diag.update(corrected)
            per_token = per_token * rho_weight
    policy_loss = aggregate(cfg.loss_agg, per_token, mask, **agg)
    loss = policy_loss
    # Turns micro-batch token means into summable shares (total_tokens counts weighted tokens).
    kept = mask.sum() if weight is None else (mask.sum(dim=1) * weight).sum()
    share = kept / total_tokens
    metrics = {k: v if k in MAX_METRICS + MIN_METRICS else v * share for k, v in diag.items()}
    metrics["policy_loss"] = policy_loss.detach()

    if batch.ref_logprobs is not None:
        per_token_kl = KL_ESTIMATORS.get(cfg.kl_estimator)(
            logprobs, batch.ref_logprobs, clamp=cfg.kl_clamp
        )
        kl = aggregate(cfg.loss_agg, per_token_kl, mask, **agg)
        metrics["kl"] = kl.detach()
        if cfg.kl_coef > 0:
            loss = loss + cfg.kl_coef * kl
    if entropy is not None:
        ent = aggregate(cfg.loss_agg, entropy, mask, **agg)
        metrics["entropy"] = ent.detach()
        if cfg.entropy_coef != 0:
            loss = loss - cfg.entropy_coef * ent
    return loss, metrics


def _raw_student(batch: TrainBatch, raw_logprobs: Tensor | None) -> Tensor:
    """[B, L] the student's raw log-probs that distillation compares with the teacher's: the
    pre-update pass's when the batch has them, else this forward's (detached)."""
    if batch.old_raw_logprobs is not None:
        return batch.old_raw_logprobs
    if raw_logprobs is None:
        raise ValueError(
            "the batch has teacher_logprobs but neither old_raw_logprobs nor raw_logprobs: distillation "
            "compares the teacher's raw log-probs (temperature 1, untruncated) with the student's raw ones"
        )
    return raw_logprobs.detach()
