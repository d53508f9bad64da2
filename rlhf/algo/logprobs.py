"""Per-token log-probs and entropies from causal-LM logits, in bounded extra memory.

Alignment follows rlhf/types.py: ``logits[:, t]`` predicts ``input_ids[:, t+1]``, so
``out[:, t] = log p(input_ids[:, t] | input_ids[:, :t])`` and ``out[:, 0] = 0``; entropies use the
same positions (``ent[:, t]`` is the entropy of the distribution that chose token t).

Memory: a full ``log_softmax`` makes an fp32 copy of the [B, L, V] logits and autograd keeps it
for backward (gigabytes at V=152k). Here the forward walks chunks of ``chunk_size`` positions with
logsumexp + gather, saves only the logits (no copy) and [B, L] statistics, and the backward
recomputes each chunk's softmax. Extra memory is one [chunk_size, V] fp32 block at a time, plus
the logits' gradient in backward, which any method needs.

Temperature: the tokens were sampled from softmax(logits / T), so the importance ratio needs the
learner's log-probs of that same tempered distribution: pass the rollout temperature. Note that
vLLM returns *raw* (untempered) log-probs by default (``logprobs_mode="raw_logprobs"``); its
log-probs match these only with ``logprobs_mode="processed_logprobs"`` (after temperature, and
after top-k/top-p truncation if those are set).
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


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, input_ids: Tensor, temperature: float, chunk: int) -> Tensor:
        ctx.dtype = _compute_dtype(logits)
        B, L, _ = logits.shape
        out = logits.new_zeros(B, L, dtype=ctx.dtype)
        lse = logits.new_zeros(B, L, dtype=ctx.dtype)  # lse[b, t]: normaliser for token t
        for b, s, e in _spans(B, L, chunk):
            x = logits[b, s:e].to(ctx.dtype) / temperature  # [c, V], the only large temporary
            lse[b, s + 1 : e + 1] = torch.logsumexp(x, dim=-1)
            picked = x.gather(-1, input_ids[b, s + 1 : e + 1, None]).squeeze(-1)
            out[b, s + 1 : e + 1] = picked - lse[b, s + 1 : e + 1]
        ctx.save_for_backward(logits, input_ids, lse)
        ctx.temperature, ctx.chunk = temperature, chunk
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        logits, input_ids, lse = ctx.saved_tensors
        T = ctx.temperature
        grad = torch.zeros_like(logits)
        for b, s, e in _spans(*logits.shape[:2], ctx.chunk):
            # d logp(y) / d x = onehot(y) - softmax(x), and x = logits / T.
            g = grad_out[b, s + 1 : e + 1, None].to(ctx.dtype)  # [c, 1]
            p = (logits[b, s:e].to(ctx.dtype) / T - lse[b, s + 1 : e + 1, None]).exp_()
            gl = p.mul_(-g).scatter_add_(-1, input_ids[b, s + 1 : e + 1, None], g)
            grad[b, s:e] = gl.div_(T)
        return grad, None, None, None


class _TokenEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, temperature: float, chunk: int) -> Tensor:
        ctx.dtype = _compute_dtype(logits)
        B, L, _ = logits.shape
        ent = logits.new_zeros(B, L, dtype=ctx.dtype)
        lse = logits.new_zeros(B, L, dtype=ctx.dtype)
        for b, s, e in _spans(B, L, chunk):
            x = logits[b, s:e].to(ctx.dtype) / temperature
            z = torch.logsumexp(x, dim=-1)
            # H = lse - sum p * x
            ent[b, s + 1 : e + 1] = z - (x - z[:, None]).exp().mul_(x).sum(-1)
            lse[b, s + 1 : e + 1] = z
        ctx.save_for_backward(logits, lse, ent)
        ctx.temperature, ctx.chunk = temperature, chunk
        return ent

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        logits, lse, ent = ctx.saved_tensors
        T = ctx.temperature
        grad = torch.zeros_like(logits)
        for b, s, e in _spans(*logits.shape[:2], ctx.chunk):
            # dH/dx_j = -p_j * (log p_j + H) = -p_j * (x_j - lse + H), and x = logits / T.
            g = grad_out[b, s + 1 : e + 1, None].to(ctx.dtype)
            x = logits[b, s:e].to(ctx.dtype) / T
            shift = (lse[b, s + 1 : e + 1] - ent[b, s + 1 : e + 1])[:, None]
            p = (x - lse[b, s + 1 : e + 1, None]).exp()
            grad[b, s:e] = x.sub_(shift).mul_(p).mul_(-g / T)
        return grad, None, None


def _check(logits: Tensor, temperature: float, chunk_size: int) -> None:
    expect_dim("logits", logits, 3, "[B, L, V]")
    if not temperature > 0:
        raise ValueError(f"temperature={temperature} must be > 0")
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be >= 1")


def token_logprobs(
    logits: Tensor, input_ids: Tensor, *, temperature: float = 1.0, chunk_size: int = DEFAULT_CHUNK
) -> Tensor:
    """[B, L]: out[:, t] = log softmax(logits[:, t-1] / T)[input_ids[:, t]], out[:, 0] = 0.

    fp32 (fp64 for fp64 logits); differentiable with respect to the logits.
    """
    _check(logits, temperature, chunk_size)
    expect_shape("input_ids", input_ids, logits.shape[:2])
    return _TokenLogprobs.apply(logits, input_ids.long(), float(temperature), chunk_size)


def token_entropy(
    logits: Tensor, *, temperature: float = 1.0, chunk_size: int = DEFAULT_CHUNK
) -> Tensor:
    """[B, L]: out[:, t] = entropy of softmax(logits[:, t-1] / T), out[:, 0] = 0.

    fp32 (fp64 for fp64 logits); differentiable with respect to the logits.
    """
    _check(logits, temperature, chunk_size)
    return _TokenEntropy.apply(logits, float(temperature), chunk_size)
