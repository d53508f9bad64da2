"""grpo_objective: composition of policy loss, KL and entropy, sample weights, summable metrics."""

import dataclasses

import pytest
import torch

from rlhf.algo import grpo_objective, normalisers
from rlhf.config import AlgoConfig
from rlhf.types import TrainBatch

MASK = torch.tensor([[0.0, 1.0, 1.0, 0.0], [0.0, 1.0, 1.0, 1.0]])


def _batch(**kw):
    B, L = MASK.shape
    fields = dict(
        input_ids=torch.zeros(B, L, dtype=torch.long),
        attention_mask=torch.ones(B, L, dtype=torch.long),
        response_mask=MASK,
        advantages=torch.tensor([1.0, -0.5]),
    )
    return TrainBatch(**(fields | kw))


def _run(cfg, batch, logprobs=None, **kw):
    logprobs = torch.full(MASK.shape, -1.0) if logprobs is None else logprobs
    tokens, seqs = normalisers(batch.response_mask, batch.sample_weight)
    return grpo_objective(logprobs, batch, cfg, total_tokens=tokens, total_seqs=seqs, **kw)


def test_on_policy_grpo_loss_by_hand():
    # ratio 1: per-token loss -A. seq_mean_token_mean: (-1 + 0.5) / 2 = -0.25.
    loss, m = _run(AlgoConfig(), _batch())
    assert loss.item() == pytest.approx(-0.25)
    assert m["policy_loss"].item() == pytest.approx(-0.25)
    assert m["ratio/mean"].item() == pytest.approx(1.0)  # share of the whole batch: all of it
    assert m["clip_frac/low"].item() == 0.0 and "kl" not in m and "entropy" not in m


def test_kl_and_entropy_terms_by_hand():
    # k1 with logp - ref = 0.5 on every token -> agg 0.5; entropy 2.0 on every token -> agg 2.0.
    # loss = -0.25 + 0.1 * 0.5 - 0.01 * 2.0 = -0.22
    cfg = AlgoConfig(kl_coef=0.1, kl_estimator="k1", entropy_coef=0.01)
    batch = _batch(ref_logprobs=torch.full(MASK.shape, -1.5))
    loss, m = _run(cfg, batch, entropy=torch.full(MASK.shape, 2.0))
    assert loss.item() == pytest.approx(-0.22)
    assert m["kl"].item() == pytest.approx(0.5) and m["entropy"].item() == pytest.approx(2.0)


def test_kl_is_logged_but_not_added_when_kl_coef_is_zero():
    loss, m = _run(AlgoConfig(kl_estimator="k1"), _batch(ref_logprobs=torch.full(MASK.shape, -1.5)))
    assert loss.item() == pytest.approx(-0.25) and m["kl"].item() == pytest.approx(0.5)


def test_zero_sample_weight_drops_the_sequence():
    # Only row 0 (A = 1) is left: loss -1 over 1 sequence.
    loss, _ = _run(AlgoConfig(), _batch(sample_weight=torch.tensor([1.0, 0.0])))
    assert loss.item() == pytest.approx(-1.0)


def test_old_logprobs_make_it_off_policy():
    # old = logp - log 2 on row 0 -> ratio 2 > 1.2 with A = 1: clipped at -1.2 per token.
    # Row 1 on-policy: 0.5. Loss (-1.2 + 0.5) / 2 = -0.35; high clip binds on 2 of 5 tokens.
    old = torch.full(MASK.shape, -1.0)
    old[0] -= torch.log(torch.tensor(2.0))
    loss, m = _run(AlgoConfig(), _batch(old_logprobs=old))
    assert loss.item() == pytest.approx(-0.35, abs=1e-6)
    assert m["clip_frac/high"].item() == pytest.approx(0.4)
    assert m["ratio/max"].item() == pytest.approx(2.0)


def test_dr_grpo_uses_the_configured_norm_length():
    # seq sums / 8: (-2/8 + 1.5/8) / 2 = -0.03125
    cfg = AlgoConfig(advantage="dr_grpo", loss_agg="seq_mean_token_sum_norm", norm_length=8)
    loss, _ = _run(cfg, _batch())
    assert loss.item() == pytest.approx(-0.03125)
    with pytest.raises(ValueError, match="algo.norm_length is null"):
        _run(dataclasses.replace(cfg, norm_length=None), _batch())


def test_micro_batch_metrics_sum_to_the_whole_batch():
    g = torch.Generator().manual_seed(0)
    B, L = 6, 5
    mask = (torch.rand(B, L, generator=g) > 0.3).float()
    logprobs = -torch.rand(B, L, generator=g)
    batch = TrainBatch(
        input_ids=torch.zeros(B, L, dtype=torch.long),
        attention_mask=torch.ones(B, L, dtype=torch.long),
        response_mask=mask,
        advantages=torch.randn(B, generator=g),
        old_logprobs=logprobs + 0.4 * torch.randn(B, L, generator=g),
        ref_logprobs=logprobs + 0.1 * torch.randn(B, L, generator=g),
    )
    cfg = AlgoConfig(loss_agg="token_mean")
    tokens, seqs = normalisers(mask)
    whole_loss, whole = grpo_objective(logprobs, batch, cfg, total_tokens=tokens, total_seqs=seqs)
    parts = [
        grpo_objective(logprobs[r], batch.select(r), cfg, total_tokens=tokens, total_seqs=seqs)
        for r in (slice(0, 1), slice(1, 4), slice(4, 6))
    ]
    assert torch.allclose(sum(p[0] for p in parts), whole_loss, atol=1e-6)
    for key in ["policy_loss", "kl", "clip_frac/low", "clip_frac/high", "ratio/mean"]:
        assert torch.allclose(sum(p[1][key] for p in parts), whole[key], atol=1e-6), key
    assert max(p[1]["ratio/max"] for p in parts) == whole["ratio/max"]
    assert min(p[1]["ratio/min"] for p in parts) == whole["ratio/min"]


def test_kl_coef_without_ref_names_the_key():
    with pytest.raises(ValueError, match=r"algo.kl_coef=0.1 > 0 but the batch has no ref_logprobs"):
        _run(AlgoConfig(kl_coef=0.1), _batch())


def test_entropy_coef_without_entropy_names_the_key():
    with pytest.raises(ValueError, match="algo.entropy_coef=0.01"):
        _run(AlgoConfig(entropy_coef=0.01), _batch())


def test_unknown_loss_name_lists_known_names():
    with pytest.raises(KeyError, match="gspo, ppo_clip"):
        _run(dataclasses.replace(AlgoConfig(), policy_loss="ppo"), _batch())


def test_a_fractional_sample_weight_counts_once_per_sequence():
    # Row 1 (A = -0.5) weighs 0.5. seq_mean_token_mean: per-sequence losses -1 and +0.5, weighted
    # (1 * -1 + 0.5 * 0.5) / (1 + 0.5) = -0.5.
    w = torch.tensor([1.0, 0.5])
    loss, _ = _run(AlgoConfig(), _batch(sample_weight=w))
    assert loss.item() == pytest.approx(-0.5)
    # token_mean: tokens 2 x -1 (weight 1) and 3 x 0.5 (weight 0.5) over 2 + 1.5 weighted tokens:
    # (-2 + 0.75) / 3.5 = -0.357142... (The weight applied twice, in the policy loss's mask and in
    # the aggregation's, as before issue 14, gave (-2 + 3 * 0.5 * 0.25) / 3.5 = -0.464.)
    loss, _ = _run(AlgoConfig(loss_agg="token_mean"), _batch(sample_weight=w))
    assert loss.item() == pytest.approx(-1.25 / 3.5)


def test_sampler_logprobs_give_mismatch_metrics_and_no_change_without_a_correction():
    # learner (this forward, on-policy) -1 everywhere; sampler -1 + ln 2 on row 1: rho = 1/2 there.
    sampler = torch.tensor([[0.0, -1.0, -1.0, 0.0], [0.0, -1.0 + 0.6931472, -1.0 + 0.6931472, -1.0 + 0.6931472]])
    loss, m = _run(AlgoConfig(), _batch(sampler_logprobs=sampler))
    assert loss.item() == pytest.approx(-0.25)  # rollout_correction=none: the loss is unchanged
    # 5 tokens, 3 with |log rho| = ln 2: mean 3 ln 2 / 5; k3 per such token 0.5 - 1 + ln 2 = 0.1931.
    assert m["mismatch/abs_logprob_diff_mean"].item() == pytest.approx(3 * 0.6931472 / 5, rel=1e-5)
    assert m["mismatch/abs_logprob_diff_max"].item() == pytest.approx(0.6931472, rel=1e-5)
    assert m["mismatch/kl_k3"].item() == pytest.approx(3 * (0.5 - 1 + 0.6931472) / 5, rel=1e-5)
    assert m["mismatch/ratio_out_of_range_frac"].item() == 0.0  # rho = 0.5 is on the boundary


def test_tis_weights_the_policy_loss_per_token():
    # rho = 0.5 on row 1's tokens: its per-token loss +0.5 becomes 0.25; row 0 keeps -1.
    # seq_mean_token_mean: (-1 + 0.25) / 2 = -0.375.
    sampler = torch.tensor([[0.0, -1.0, -1.0, 0.0], [0.0, -1.0 + 0.6931472, -1.0 + 0.6931472, -1.0 + 0.6931472]])
    loss, m = _run(AlgoConfig(rollout_correction="tis"), _batch(sampler_logprobs=sampler))
    assert loss.item() == pytest.approx(-0.375, rel=1e-5)
    assert m["rollout_correction/weight_mean"].item() == pytest.approx((2 * 1 + 3 * 0.5) / 5, rel=1e-5)
    # icepop with band [0.6, 2]: row 1's tokens are masked (0 loss, still in the normaliser): -0.5.
    loss, m = _run(AlgoConfig(rollout_correction="icepop", correction_low=0.6), _batch(sampler_logprobs=sampler))
    assert loss.item() == pytest.approx(-0.5, rel=1e-5)
    assert m["rollout_correction/masked_frac"].item() == pytest.approx(3 / 5)


def test_old_logprobs_are_the_learner_side_of_the_ratio():
    # With old log-probs (several updates per batch), rho compares them, not this forward, with the
    # sampler: old = sampler gives no mismatch although logprobs differ from both.
    sampler = torch.full(MASK.shape, -2.0)
    _, m = _run(AlgoConfig(), _batch(sampler_logprobs=sampler, old_logprobs=sampler.clone()))
    assert m["mismatch/kl_k3"].item() == 0.0
