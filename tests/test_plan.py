"""The plan's memory arithmetic (ZeRO sharding by hand)."""

from __future__ import annotations

import pytest

from rlhf.config import Config
from rlhf.plan import estimate_memory

GIB = 1024**3


def test_zero3_two_ranks_fp32_with_reference():
    cfg = Config()
    cfg.learner.zero_stage, cfg.learner.num_ranks, cfg.algo.kl_coef = 3, 2, 0.05
    n = 100 * GIB // 4  # chosen so the fp32 weights are exactly 100 GiB
    m = estimate_memory(cfg, n)
    # Stage 3 shards params, grads and optimizer over 2 ranks: 50 + 50 + (8 bytes x n)/2 = 100, ref 50.
    assert (m.policy_gib, m.grads_gib, m.optimizer_gib, m.reference_gib) == pytest.approx((50, 50, 100, 50))
    assert m.learner_rank_gib == pytest.approx(250)


def test_zero2_bf16_keeps_fp32_master_and_full_params():
    cfg = Config()
    cfg.model.dtype, cfg.learner.zero_stage, cfg.learner.num_ranks = "bfloat16", 2, 4
    n = GIB  # 1 Gi parameters
    m = estimate_memory(cfg, n)
    # bf16 weights 2 GiB unsharded; grads 2/4; Adam 2 moments + fp32 master = 12 bytes, /4 = 3 GiB.
    assert (m.policy_gib, m.grads_gib, m.optimizer_gib, m.reference_gib) == pytest.approx((2, 0.5, 3, 0))


def test_offloaded_optimizer_leaves_no_optimizer_memory_on_device():
    cfg = Config()
    cfg.learner.offload_optimizer = True
    assert estimate_memory(cfg, GIB).optimizer_gib == 0
