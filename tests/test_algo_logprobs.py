"""token_logprobs / token_entropy: alignment, match with log_softmax, gradients, memory bound."""

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


def test_backward_keeps_no_copy_of_the_logits():
    # Everything autograd saves is either the logits themselves or [B, L]-sized statistics.
    logits, ids = _data()
    logits.requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        token_logprobs(logits, ids, chunk_size=2)
        token_entropy(logits, chunk_size=2)
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
