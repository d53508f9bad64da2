"""Per-token log-probs and entropies from causal-LM logits, in bounded extra memory.

Alignment follows rlhf/types.py: ``logits[:, t]`` predicts ``input_ids[:, t+1]``, so
``out[:, t] = log p(input_ids[:, t] | input_ids[:, :t])`` and ``out[:, 0] = 0``; entropies use the
same positions (``ent[:, t]`` is the entropy of the distribution that chose token t).

Memory: a full ``log_softmax`` makes an fp32 copy of the [B, L, V] logits and autograd keeps it
for backward (gigabytes at V=152k). Here the forward walks chunks of ``chunk_size`` positions with
logsumexp + gather, saves only the logits (no copy) and [B, L] statistics, and the backward
recomputes each chunk's softmax. Extra memory is one [chunk_size, V] fp32 block at a time (a few
with top-k/top-p: the mask, and top-p's sort), plus the logits' gradient in backward, which any
method needs.

Temperature and truncation: the tokens were sampled from softmax(logits / T), truncated by top-k
and top-p if those were set, so the importance ratio needs the learner's log-probs of that same
distribution: pass the rollout's temperature, top_k and top_p, and the learner scores the
truncated distribution exactly as vLLM's sampler builds it (``apply_top_k_top_p``: temperature
first, then top-k, then top-p on what top-k kept). Note that vLLM returns *raw* (untempered,
untruncated) log-probs by default (``logprobs_mode="raw_logprobs"``); its log-probs match these
only with ``logprobs_mode="processed_logprobs"``.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from rlhf.algo.shapes import expect_dim, expect_shape

DEFAULT_CHUNK = 512  # positions per block: 512 x 152k vocab x 4 B = 311 MB at most


def _compute_dtype(logits: Tensor) -> torch.dtype:
    """fp32 for half-precision logits (softmax sums need it); fp64 stays fp64 (gradcheck)."""
    return torch.promote_types(logits.dtype, torch.float32)


def _spans(B: int, L: int, chunk: int) -> Iterator[tuple[int, int, int]]:
    """(row, s, e): logits[row, s:e] predict input_ids[row, s+1:e+1]."""
    for b in range(B):
        for s in range(0, L - 1, chunk):
            yield b, s, min(s + chunk, L - 1)


def _truncation_threshold(x: Tensor, top_k: int, top_p: float) -> Tensor:
    """[c]: the smallest value vLLM's top-k/top-p keeps in each row of x [c, V] (tempered).

    The kept set is {j : x_j >= thr}. top_k is 0 (off) or in [1, V); top_p in (0, 1].
    Top-k keeps ties at the k-th value. Top-p follows apply_top_k_top_p_pytorch: sort ascending,
    softmax over what top-k kept, drop entries whose cumulative mass is <= 1 - p, keep the largest.
    A tie straddling the top-p cut is kept whole here, where vLLM's sort order decides.
    """
    if top_p == 1.0:
        return x.topk(top_k, dim=-1).values[:, -1]
    xs = x.sort(dim=-1).values  # [c, V] ascending
    if top_k:
        kth = xs[:, -top_k, None]
        xs.masked_fill_(xs < kth, float("-inf"))
    cum = xs.softmax(dim=-1).cumsum_(dim=-1)
    dropped = cum <= 1 - top_p  # a prefix, since cum never decreases
    dropped[:, -1] = False
    return xs.gather(-1, dropped.sum(-1, keepdim=True)).squeeze(-1)


def _kept(x: Tensor, thr: Tensor, y: Tensor | None = None) -> Tensor:
    """[c, V] bool: x >= thr (per row), or the token in y [c, 1] (scored even if below thr)."""
    keep = x >= thr[:, None]
    return keep if y is None else keep.scatter_(-1, y, True)


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, logits: Tensor, input_ids: Tensor, temperature: float, top_k: int, top_p: float,
        chunk: int,
    ) -> Tensor:
        ctx.dtype = _compute_dtype(logits)
        ctx.truncate = bool(top_k) or top_p < 1.0
        B, L, _ = logits.shape
        out = logits.new_zeros(B, L, dtype=ctx.dtype)
        lse = logits.new_zeros(B, L, dtype=ctx.dtype)  # lse[b, t]: normaliser for token t
        thr = logits.new_zeros(B, L, dtype=ctx.dtype) if ctx.truncate else None
        for b, s, e in _spans(B, L, chunk):
            x = logits[b, s:e].to(ctx.dtype) / temperature  # [c, V]: untruncated, the one temporary
            y = input_ids[b, s + 1 : e + 1, None]  # [c, 1]
            picked = x.gather(-1, y).squeeze(-1)
            if ctx.truncate:
                thr[b, s + 1 : e + 1] = _truncation_threshold(x, top_k, top_p)
                x.masked_fill_(~_kept(x, thr[b, s + 1 : e + 1], y), float("-inf"))
            lse[b, s + 1 : e + 1] = torch.logsumexp(x, dim=-1)
            out[b, s + 1 : e + 1] = picked - lse[b, s + 1 : e + 1]
        ctx.save_for_backward(logits, input_ids, lse, thr)
        ctx.temperature, ctx.chunk = temperature, chunk
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        logits, input_ids, lse, thr = ctx.saved_tensors
        T = ctx.temperature
        grad = torch.zeros_like(logits)
        for b, s, e in _spans(*logits.shape[:2], ctx.chunk):
            # d logp(y) / d x = onehot(y) - p, and x = logits / T; p is the softmax over the kept
            # set, 0 outside it (the set does not move under an infinitesimal change of x).
            g = grad_out[b, s + 1 : e + 1, None].to(ctx.dtype)  # [c, 1]
            y = input_ids[b, s + 1 : e + 1, None]
            x = logits[b, s:e].to(ctx.dtype) / T
            if ctx.truncate:
                x.masked_fill_(~_kept(x, thr[b, s + 1 : e + 1], y), float("-inf"))
            p = x.sub_(lse[b, s + 1 : e + 1, None]).exp_()
            gl = p.mul_(-g).scatter_add_(-1, y, g)
            grad[b, s:e] = gl.div_(T)
        return grad, None, None, None, None, None


class _TokenEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, temperature: float, top_k: int, top_p: float, chunk: int):
        ctx.dtype = _compute_dtype(logits)
        ctx.truncate = bool(top_k) or top_p < 1.0
        B, L, _ = logits.shape
        ent = logits.new_zeros(B, L, dtype=ctx.dtype)
        lse = logits.new_zeros(B, L, dtype=ctx.dtype)
        thr = logits.new_zeros(B, L, dtype=ctx.dtype) if ctx.truncate else None
        for b, s, e in _spans(B, L, chunk):
            x = logits[b, s:e].to(ctx.dtype) / temperature
            if not ctx.truncate:
                z = torch.logsumexp(x, dim=-1)
                # H = lse - sum p * x
                ent[b, s + 1 : e + 1] = z - (x - z[:, None]).exp().mul_(x).sum(-1)
            else:
                thr[b, s + 1 : e + 1] = _truncation_threshold(x, top_k, top_p)
                keep = _kept(x, thr[b, s + 1 : e + 1])
                z = torch.logsumexp(x.masked_fill(~keep, float("-inf")), dim=-1)
                # p is 0 outside the kept set; multiply by the finite x there (-inf * 0 is NaN).
                p = (x - z[:, None]).exp_().masked_fill_(~keep, 0.0)
                ent[b, s + 1 : e + 1] = z - p.mul_(x).sum(-1)
            lse[b, s + 1 : e + 1] = z
        ctx.save_for_backward(logits, lse, ent, thr)
        ctx.temperature, ctx.chunk = temperature, chunk
        return ent

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        logits, lse, ent, thr = ctx.saved_tensors
        T = ctx.temperature
        grad = torch.zeros_like(logits)
        for b, s, e in _spans(*logits.shape[:2], ctx.chunk):
            # dH/dx_j = -p_j * (log p_j + H) = -p_j * (x_j - lse + H), and x = logits / T;
            # truncated, p_j = 0 outside the kept set, so those entries get no gradient.
            g = grad_out[b, s + 1 : e + 1, None].to(ctx.dtype)
            x = logits[b, s:e].to(ctx.dtype) / T
            shift = (lse[b, s + 1 : e + 1] - ent[b, s + 1 : e + 1])[:, None]
            p = (x - lse[b, s + 1 : e + 1, None]).exp()
            if ctx.truncate:
                p.masked_fill_(~_kept(x, thr[b, s + 1 : e + 1]), 0.0)
            grad[b, s:e] = x.sub_(shift).mul_(p).mul_(-g / T)
        return grad, None, None, None, None


def _check(logits: Tensor, temperature: float, top_k: int, top_p: float, chunk_size: int) -> int:
    """Validates the arguments; returns top_k as 0 (off) or a k in [1, V) that truncates."""
    expect_dim("logits", logits, 3, "[B, L, V]")
    if not temperature > 0:
        raise ValueError(f"temperature={temperature} must be > 0")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < -1:
        raise ValueError(f"top_k={top_k!r} must be an int: -1 or 0 (off) or >= 1")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p!r} must be in (0, 1] (1 is off)")
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be >= 1")
    return top_k if 0 < top_k < logits.shape[-1] else 0  # k >= V keeps everything


def token_logprobs(
    logits: Tensor,
    input_ids: Tensor,
    *,
    temperature: float = 1.0,
    top_k: int = -1,
    top_p: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK,
) -> Tensor:
    """[B, L]: out[:, t] = log softmax(logits[:, t-1] / T)[input_ids[:, t]], out[:, 0] = 0.

    With top_k (-1 or 0: off) or top_p (1: off), the softmax is over the tokens vLLM's top-k/top-p
    keeps after temperature, plus the scored token input_ids[:, t] itself: a sampled token that
    numerics put just below the learner's cut gets a finite log-prob, x_y - logsumexp(kept + y),
    not -inf. fp32 (fp64 for fp64 logits); differentiable with respect to the logits.
    """
    k = _check(logits, temperature, top_k, top_p, chunk_size)
    expect_shape("input_ids", input_ids, logits.shape[:2])
    return _TokenLogprobs.apply(
        logits, input_ids.long(), float(temperature), k, float(top_p), chunk_size
    )


def token_entropy(
    logits: Tensor,
    *,
    temperature: float = 1.0,
    top_k: int = -1,
    top_p: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK,
) -> Tensor:
    """[B, L]: out[:, t] = entropy of softmax(logits[:, t-1] / T), out[:, 0] = 0.

    With top_k (-1 or 0: off) or top_p (1: off), the entropy of the softmax over the tokens
    vLLM's top-k/top-p keeps after temperature (0 for top_k=1). fp32 (fp64 for fp64 logits);
    differentiable with respect to the logits.
    """
    k = _check(logits, temperature, top_k, top_p, chunk_size)
    return _TokenEntropy.apply(logits, float(temperature), k, float(top_p), chunk_size)
