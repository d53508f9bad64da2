"""token_logprobs / token_entropy: alignment, match with log_softmax, gradients, memory bound."""

import math

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from rlhf.algo import token_entropy, token_logprobs

B, L, V = 3, 7, 11


def _data(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(B, L, V, generator=g)).to(dtype)
    ids = torch.randint(0, V, (B, L), generator=g)
    return logits, ids


def _reference_logprobs(logits, ids, T=1.0):
    # logits[:, t] predicts ids[:, t+1]; position 0 has no prediction and holds 0.
    lp = torch.log_softmax(logits[:, :-1].double() / T, dim=-1)
    picked = lp.gather(-1, ids[:, 1:, None]).squeeze(-1)
    return torch.cat([torch.zeros(len(ids), 1, dtype=picked.dtype), picked], dim=1)


def _reference_entropy(logits, T=1.0):
    lp = torch.log_softmax(logits[:, :-1].double() / T, dim=-1)
    ent = -(lp.exp() * lp).sum(-1)
    return torch.cat([torch.zeros(len(logits), 1, dtype=ent.dtype), ent], dim=1)


@pytest.mark.parametrize("chunk", [1, 2, 4, 512])  # 2 and 4 do not divide the 6 predicted positions
@pytest.mark.parametrize("T", [1.0, 0.7])
def test_logprobs_and_entropy_match_log_softmax(chunk, T):
    logits, ids = _data()
    lp = token_logprobs(logits, ids, temperature=T, chunk_size=chunk)
    ent = token_entropy(logits, temperature=T, chunk_size=chunk)
    assert lp.dtype == torch.float32 and lp.shape == (B, L)
    assert torch.equal(lp[:, 0], torch.zeros(B)) and torch.equal(ent[:, 0], torch.zeros(B))
    assert torch.allclose(lp.double(), _reference_logprobs(logits, ids, T), atol=1e-5)
    assert torch.allclose(ent.double(), _reference_entropy(logits, T), atol=1e-5)


def test_alignment_on_a_two_token_example():
    # V = 2, logits[0, 0] = [0, log 3] -> p = [1/4, 3/4]; input_ids[0, 1] = 1 -> -0.287682.
    # Entropy at position 1: -(1/4 log 1/4 + 3/4 log 3/4) = 0.562335.
    logits = torch.tensor([[[0.0, torch.log(torch.tensor(3.0))], [5.0, -5.0]]])
    ids = torch.tensor([[0, 1]])
    assert torch.allclose(token_logprobs(logits, ids), torch.tensor([[0.0, -0.287682]]), atol=1e-6)
    assert torch.allclose(token_entropy(logits), torch.tensor([[0.0, 0.562335]]), atol=1e-6)


def test_half_precision_logits_give_fp32_results():
    logits, ids = _data(torch.bfloat16)
    lp = token_logprobs(logits, ids, chunk_size=2)
    assert lp.dtype == torch.float32
    assert torch.allclose(lp.double(), _reference_logprobs(logits.float(), ids), atol=1e-5)


def test_gradients_match_autograd_of_log_softmax():
    logits, ids = _data()
    g = torch.Generator().manual_seed(1)
    up_lp, up_ent = torch.randn(B, L, generator=g), torch.randn(B, L, generator=g)
    T = 0.7

    x = logits.clone().requires_grad_(True)
    ((token_logprobs(x, ids, temperature=T, chunk_size=2) * up_lp).sum()
     + (token_entropy(x, temperature=T, chunk_size=4) * up_ent).sum()).backward()

    y = logits.double().requires_grad_(True)
    ref = (_reference_logprobs(y, ids, T) * up_lp).sum() + (_reference_entropy(y, T) * up_ent).sum()
    ref.backward()
    assert torch.allclose(x.grad.double(), y.grad, atol=1e-5)
    assert torch.equal(x.grad[:, -1], torch.zeros(B, V))  # the last position predicts nothing


def test_gradcheck_in_double():
    logits, ids = _data(torch.float64)
    logits = logits[:, :4, :5].clone().requires_grad_(True)
    ids = ids[:, :4] % 5
    kw = dict(temperature=0.9, chunk_size=2)
    assert torch.autograd.gradcheck(lambda z: token_logprobs(z, ids, **kw), logits)
    assert torch.autograd.gradcheck(lambda z: token_entropy(z, **kw), logits)


@pytest.mark.parametrize("truncate", [{}, dict(top_k=4, top_p=0.9)])
def test_backward_keeps_no_copy_of_the_logits(truncate):
    # Everything autograd saves is either the logits themselves or [B, L]-sized statistics
    # (truncation adds one: the per-position threshold).
    logits, ids = _data()
    logits.requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        token_logprobs(logits, ids, chunk_size=2, **truncate)
        token_entropy(logits, chunk_size=2, **truncate)
    big = [t for t in saved if t.numel() > B * L]
    storage = logits.untyped_storage().data_ptr()
    assert saved and all(t.untyped_storage().data_ptr() == storage for t in big)


def test_forward_allocates_at_most_one_chunk_of_vocab():
    # Profiler-recorded allocations: the largest is one [chunk, V] fp32 block (8 x 4096 x 4 B),
    # whereas the log_softmax reference allocates the whole [B, L-1, V] at once.
    logits = torch.randn(4, 64, 4096, requires_grad=True)
    ids = torch.randint(0, 4096, (4, 64))
    chunk = 8

    def largest_allocation(fn):
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        return max(e.cpu_memory_usage for e in prof.events())

    chunked = largest_allocation(lambda: token_logprobs(logits, ids, chunk_size=chunk))
    assert chunked <= chunk * 4096 * 4
    full = largest_allocation(lambda: _reference_logprobs(logits, ids))
    assert full > 4 * 63 * 4096 * 4  # the measurement does see full-size copies


def test_bad_inputs_name_the_argument():
    logits, ids = _data()
    with pytest.raises(ValueError, match=r"^logits must be \[B, L, V\]"):
        token_logprobs(logits[0], ids)
    with pytest.raises(ValueError, match="^input_ids has shape"):
        token_logprobs(logits, ids[:, :3])
    with pytest.raises(ValueError, match="temperature=0.0 must be > 0"):
        token_entropy(logits, temperature=0.0)
    with pytest.raises(ValueError, match="chunk_size=0 must be >= 1"):
        token_logprobs(logits, ids, chunk_size=0)


# --- top-k / top-p: the learner scores the truncated distribution vLLM samples from ------------


def _one_position(row, token):
    # logits [1, 2, V] whose position 0 holds `row` and predicts input_ids[0, 1] = token.
    row = torch.as_tensor(row, dtype=torch.float64)
    logits = torch.stack([row, torch.zeros_like(row)])[None]
    return logits, torch.tensor([[0, token]])


def _at(values):
    # The single prediction of a _one_position example, as a float.
    return values[0, 1].item()


def _vllm_literal_mask(x, k, p):
    # x [N, V], already divided by T. vLLM's apply_top_k_top_p_pytorch step by step: sort
    # ascending; top-k drops values below the k-th largest; top-p takes the softmax of what is left,
    # drops entries whose cumulative mass is <= 1 - p, never the largest; scatter back.
    xs, idx = x.sort(dim=-1)
    if k > 0:
        kth = xs.gather(1, torch.full((len(x), 1), x.shape[-1] - k))
        xs = xs.masked_fill(xs < kth, float("-inf"))
    if p < 1:
        cum = xs.softmax(dim=-1).cumsum(dim=-1)
        drop = cum <= 1 - p
        drop[:, -1] = False
        xs = xs.masked_fill(drop, float("-inf"))
    return x.scatter(-1, idx, xs)


def _masked_entropy(masked):
    # Entropy of softmax(masked) where -inf entries have p = 0 (and contribute 0, not 0 * -inf).
    lq = torch.log_softmax(masked.double(), dim=-1)
    return -(lq.exp() * lq.masked_fill(masked.isinf(), 0.0)).sum(-1)


def _reference_truncated(logits, ids, T, k, p):
    # (logprobs, entropy) [B, L] from the literal mask; the scored token is always kept.
    x = logits[:, :-1].reshape(-1, logits.shape[-1]) / T
    masked = _vllm_literal_mask(x, k, p)
    y = ids[:, 1:].reshape(-1, 1)
    lp = torch.log_softmax(masked.scatter(-1, y, x.gather(-1, y)).double(), dim=-1)
    picked = lp.gather(-1, y).view(len(ids), -1)
    ent = _masked_entropy(masked).view(len(ids), -1)
    zero = torch.zeros(len(ids), 1, dtype=torch.float64)
    return torch.cat([zero, picked], dim=1), torch.cat([zero, ent], dim=1)


def test_top_k_on_a_five_token_example():
    # logits [2, 1, 0, -1, 3], top_k=2 keeps {3, 2}: log p(token 0) = 2 - log(e^3 + e^2)
    # = -1 - log(1 + e^-1) = -1.313262. Entropy: p = [sigmoid(-1), sigmoid(1)] = [0.268941,
    # 0.731059], H = 0.268941 * 1.313262 + 0.731059 * 0.313262 = 0.582203.
    logits, ids = _one_position([2.0, 1.0, 0.0, -1.0, 3.0], token=0)
    assert _at(token_logprobs(logits, ids, top_k=2)) == pytest.approx(-1.313262, abs=1e-6)
    assert _at(token_entropy(logits, top_k=2)) == pytest.approx(0.582203, abs=1e-6)


def test_a_sampled_token_outside_top_k_is_scored_with_itself_kept():
    # Token 2 (logit 0) is outside top_k=2 of [2, 1, 0, -1, 3]; it gets 0 - logsumexp(3, 2, 0)
    # = -(3 + log(1 + e^-1 + e^-3)) = -3.349012, not -inf. The entropy does not include it.
    logits, ids = _one_position([2.0, 1.0, 0.0, -1.0, 3.0], token=2)
    assert _at(token_logprobs(logits, ids, top_k=2)) == pytest.approx(-3.349012, abs=1e-6)
    assert _at(token_entropy(logits, top_k=2)) == pytest.approx(0.582203, abs=1e-6)


def test_top_p_on_a_four_token_example():
    # p = [0.5, 0.3, 0.15, 0.05], top_p=0.7: ascending cumsum [0.05, 0.2, 0.5, 1.0]; entries
    # with cumsum <= 0.3 go, leaving {0.5, 0.3} with mass 0.8. log p(token 1) = log(0.3 / 0.8)
    # = -0.980829; H of [0.625, 0.375] = 0.661563.
    logits, ids = _one_position(torch.tensor([0.5, 0.3, 0.15, 0.05]).log(), token=1)
    assert _at(token_logprobs(logits, ids, top_p=0.7)) == pytest.approx(-0.980829, abs=1e-6)
    assert _at(token_entropy(logits, top_p=0.7)) == pytest.approx(0.661563, abs=1e-6)


def test_top_p_applies_to_what_top_k_kept():
    # p = [0.4, 0.3, 0.2, 0.1], top_k=3, top_p=0.75. Top-k leaves [0.4, 0.3, 0.2] / 0.9, ascending
    # cumsum [0.222, 0.556, 1.0]; <= 0.25 drops the 0.2, leaving {0.4, 0.3}:
    # log p(token 0) = log(0.4 / 0.7) = -0.559616. (Top-p on the untruncated p would have kept
    # 0.2 too, since its cumsum starts at 0.1: log(0.4 / 0.9) = -0.810930.)
    logits, ids = _one_position(torch.tensor([0.4, 0.3, 0.2, 0.1]).log(), token=0)
    both = token_logprobs(logits, ids, top_k=3, top_p=0.75)
    assert _at(both) == pytest.approx(-0.559616, abs=1e-6)
    assert _at(token_logprobs(logits, ids, top_p=0.75)) == pytest.approx(-0.810930, abs=1e-6)


def test_top_k_keeps_ties_at_the_kth_value():
    # [1, 2, 2, 0, 2], top_k=2: the 2nd largest value is 2, and all three 2s stay:
    # log p(token 1) = log(1/3) = -1.098612, H = log 3 = 1.098612.
    logits, ids = _one_position([1.0, 2.0, 2.0, 0.0, 2.0], token=1)
    assert _at(token_logprobs(logits, ids, top_k=2)) == pytest.approx(-math.log(3))
    assert _at(token_entropy(logits, top_k=2)) == pytest.approx(math.log(3))


def test_top_k_1_is_greedy():
    # Only the argmax is left: its log-prob and every entropy are exactly 0, with zero gradient.
    logits, ids = _data()
    ids[:, 1:] = logits[:, :-1].argmax(-1)
    x = logits.clone().requires_grad_(True)
    ent = token_entropy(x, top_k=1, chunk_size=2)
    assert torch.equal(ent, torch.zeros(B, L))
    assert torch.equal(token_logprobs(logits, ids, top_k=1), torch.zeros(B, L))
    ent.sum().backward()
    assert torch.equal(x.grad, torch.zeros(B, L, V))


@pytest.mark.parametrize("chunk", [1, 4, 512])
@pytest.mark.parametrize("T", [1.0, 0.7])
@pytest.mark.parametrize("k, p", [(3, 1.0), (-1, 0.8), (0, 0.5), (4, 0.9), (8, 0.95)])
def test_truncated_logprobs_and_entropy_match_the_literal_vllm_mask(chunk, T, k, p):
    logits, ids = _data()
    lp = token_logprobs(logits, ids, temperature=T, top_k=k, top_p=p, chunk_size=chunk)
    ent = token_entropy(logits, temperature=T, top_k=k, top_p=p, chunk_size=chunk)
    want_lp, want_ent = _reference_truncated(logits, ids, T, k, p)
    assert lp.dtype == torch.float32 and torch.isfinite(lp).all()
    assert torch.allclose(lp.double(), want_lp, atol=1e-5)
    assert torch.allclose(ent.double(), want_ent, atol=1e-5)


def test_truncated_gradients_match_autograd_of_the_literal_mask():
    logits, ids = _data()
    g = torch.Generator().manual_seed(1)
    up_lp, up_ent = torch.randn(B, L, generator=g), torch.randn(B, L, generator=g)
    kw = dict(temperature=0.7, top_k=6, top_p=0.9)

    x = logits.clone().requires_grad_(True)
    ((token_logprobs(x, ids, chunk_size=2, **kw) * up_lp).sum()
     + (token_entropy(x, chunk_size=4, **kw) * up_ent).sum()).backward()

    y = logits.double().requires_grad_(True)
    want_lp, want_ent = _reference_truncated(y, ids, 0.7, 6, 0.9)
    ((want_lp * up_lp).sum() + (want_ent * up_ent).sum()).backward()
    assert torch.allclose(x.grad.double(), y.grad, atol=1e-5)


@pytest.mark.parametrize("k, p", [(2, 1.0), (-1, 0.7), (4, 0.8)])
def test_truncated_gradcheck_in_double(k, p):
    # Each row is a permutation of well-spaced values, so no tie or top-p cut sits within eps of a
    # boundary: at T = 0.9 the ascending probabilities are [0.022, 0.043, 0.093, 0.227, 0.616],
    # cumsum [0.022, 0.065, 0.158, 0.384, 1.0]; top_p=0.7 cuts at 0.3 and keeps 2. With top_k=4
    # the cumsum is [0.044, 0.139, 0.371, 1.0]; top_p=0.8 cuts at 0.2 and keeps 2. Some scored
    # tokens fall outside the kept set, so the forced-token path is checked too.
    g = torch.Generator().manual_seed(0)
    base = torch.tensor([0.0, 0.6, 1.3, 2.1, 3.0], dtype=torch.float64)
    perms = torch.stack([torch.randperm(5, generator=g) for _ in range(B * 4)])
    logits = base[perms].view(B, 4, 5).requires_grad_(True)
    ids = torch.randint(0, 5, (B, 4), generator=g)
    kw = dict(temperature=0.9, top_k=k, top_p=p, chunk_size=2)
    assert torch.autograd.gradcheck(lambda z: token_logprobs(z, ids, **kw), logits)
    assert torch.autograd.gradcheck(lambda z: token_entropy(z, **kw), logits)


def test_sampling_through_vllms_own_mask_scores_the_same():
    # Tokens drawn from vLLM's apply_top_k_top_p distribution get vLLM's processed log-probs.
    ops = pytest.importorskip("vllm.v1.sample.ops.topk_topp_sampler")
    logits, _ = _data(seed=2)
    T, N = 0.8, B * (L - 1)
    g = torch.Generator().manual_seed(3)
    for k, p in [(3, None), (None, 0.8), (5, 0.9)]:
        x = logits[:, :-1].reshape(N, V) / T
        masked = ops.apply_top_k_top_p(
            x.clone(),
            None if k is None else torch.full((N,), k, dtype=torch.long),
            None if p is None else torch.full((N,), p),
        )
        lq = torch.log_softmax(masked.double(), dim=-1)
        y = torch.multinomial(lq.exp(), 1, generator=g)  # [N, 1]
        ids = torch.cat([torch.zeros(B, 1, dtype=torch.long), y.view(B, L - 1)], dim=1)
        kw = dict(temperature=T, top_k=k or -1, top_p=p or 1.0, chunk_size=4)
        lp = token_logprobs(logits, ids, **kw)[:, 1:].reshape(N)
        ent = token_entropy(logits, **kw)[:, 1:].reshape(N)
        assert torch.allclose(lp.double(), lq.gather(-1, y).squeeze(-1), atol=1e-5)
        assert torch.allclose(ent.double(), _masked_entropy(masked), atol=1e-5)


@pytest.mark.parametrize("off", [dict(top_k=-1), dict(top_k=0), dict(top_k=V), dict(top_k=100),
                                 dict(top_p=1.0), dict(top_k=0, top_p=1.0)])
def test_disabled_truncation_is_the_untruncated_computation(off):
    # Bit for bit, values and gradients: the masking is skipped, not applied with an all-true mask.
    logits, ids = _data()
    a, b = logits.clone().requires_grad_(True), logits.clone().requires_grad_(True)
    la, ea = token_logprobs(a, ids, chunk_size=2), token_entropy(a, chunk_size=2)
    lb, eb = token_logprobs(b, ids, chunk_size=2, **off), token_entropy(b, chunk_size=2, **off)
    (la + ea).sum().backward()
    (lb + eb).sum().backward()
    assert torch.equal(la, lb) and torch.equal(ea, eb) and torch.equal(a.grad, b.grad)


def test_truncated_forward_allocates_per_chunk_not_per_batch():
    # With top-p the largest op is the sort: [chunk, V] fp32 values + int64 indices, 12 B an entry,
    # where the whole [B, L-1, V] fp32 would be 16x that here.
    logits = torch.randn(4, 64, 4096, requires_grad=True)
    ids = torch.randint(0, 4096, (4, 64))
    chunk = 8
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        token_logprobs(logits, ids, top_k=50, top_p=0.9, chunk_size=chunk)
    assert max(e.cpu_memory_usage for e in prof.events()) <= chunk * 4096 * (4 + 8)


@pytest.mark.parametrize("bad, match", [
    (dict(top_k=-2), r"^top_k=-2 must be an int"),
    (dict(top_k=2.0), r"^top_k=2.0 must be an int"),
    (dict(top_k=True), r"^top_k=True must be an int"),
    (dict(top_p=0.0), r"^top_p=0.0 must be in \(0, 1\]"),
    (dict(top_p=-0.5), r"^top_p=-0.5 must be in \(0, 1\]"),
    (dict(top_p=1.5), r"^top_p=1.5 must be in \(0, 1\]"),
    (dict(top_p=float("nan")), r"^top_p=nan must be in \(0, 1\]"),
])
def test_bad_truncation_arguments_name_the_argument(bad, match):
    logits, ids = _data()
    with pytest.raises(ValueError, match=match):
        token_logprobs(logits, ids, **bad)
    with pytest.raises(ValueError, match=match):
        token_entropy(logits, **bad)
