"""On-policy distillation: a teacher's per-token signal on the student's own samples.

The student samples y ~ π_s; an open teacher scores the very same tokens (rollouts/opd_teacher.py); each
completion token then carries the per-token advantage

    A_t = -(log π_s(y_t | y_<t) - log π_T(y_t | y_<t))

the negative of the k1 estimate of the reverse KL(π_s || π_T) at that token. Both log-probs are raw:
softmax(logits) at temperature 1, untruncated (vLLM's prompt log-probs are; the learner takes the
student's beside its sampling-distribution ones). The sampling temperature and top-k/top-p decide
which tokens are drawn, not what is compared: a student scored at T=0.7 against a teacher at T=1
gives an exact copy of itself the advantage -(log p_0.7(y) - log p(y)), -KL(p_0.7 || p) on average,
and top_p adds log(kept mass) < 0 to every token, so the student would be trained flatter than the
teacher. Pushed through the policy-gradient loss it lowers the student's probability where it is
more confident than the teacher and raises it where it is less: mode-seeking, on the student's own
distribution (Agarwal et al. 2024, GKD; verl ``distillation.*``, TRL ``DistillationTrainer``,
prime-rl ``opd``, slime ``--use-opd``). Like the anchors, each token's advantage is its own term
only (no sum over later tokens).

Every objective is ``fn(student [B,L], teacher [B,L], mask [B,L], *, clamp) -> advantages [B,L]``
(raw log-probs in), 0 off the mask, detached. The log-ratio is clamped to [-clamp, clamp]
(algo.distill_clamp): a token the teacher finds near-impossible must not outweigh the rest of the
batch.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rlhf.algo.registry import Registry
from rlhf.algo.shapes import expect_dim, expect_shape

DISTILL_OBJECTIVES: Registry = Registry("distillation objective")


def _log_ratio(student: Tensor, teacher: Tensor, mask: Tensor) -> Tensor:
    """log π_s - log π_T on the mask, 0 elsewhere (prompt and padding hold arbitrary values)."""
    expect_dim("student_logprobs", student, 2, "[B, L]")
    expect_shape("teacher_logprobs", teacher, student.shape)
    expect_shape("mask", mask, student.shape)
    return torch.where(mask > 0, student.detach() - teacher, 0.0)


@DISTILL_OBJECTIVES.register("reverse_kl")
def reverse_kl(student: Tensor, teacher: Tensor, mask: Tensor, *, clamp: float) -> Tensor:
    """-(log π_s - log π_T) per token: the k1 reverse-KL advantage the anchors use."""
    if not clamp > 0:
        raise ValueError(f"clamp={clamp} must be > 0 (algo.distill_clamp)")
    return -_log_ratio(student, teacher, mask).clamp(-clamp, clamp) * mask


def distill_stats(student: Tensor, teacher: Tensor, mask: Tensor) -> dict[str, Tensor]:
    """Detached means over the masked tokens (0 with none): the reverse KL(π_s || π_T) per token as
    k1 (log π_s - log π_T, unbiased on the student's samples, can be negative) and k3
    (ρ - 1 - log ρ with ρ = π_T / π_s, unbiased and >= 0), and the teacher's mean log-prob."""
    log_ratio = _log_ratio(student, teacher, mask)
    count = mask.sum().clamp(min=1)
    # expm1(-x) + x >= 0; clamped, as float error makes it -1e-9 where the two agree.
    k3 = (torch.expm1(-log_ratio) + log_ratio).clamp(min=0)
    return {
        "distill/reverse_kl": (log_ratio * mask).sum() / count,
        "distill/reverse_kl_k3": (k3 * mask).sum() / count,
        "distill/teacher_logprob": (torch.where(mask > 0, teacher, 0.0) * mask).sum() / count,
    }
