"""The DeepSpeed learner on CPU (gloo, fp32) with 2 ranks as Ray actors, ZeRO-2 and ZeRO-3.

One learner group per ZeRO stage is shared by the module. The fixture ``trained`` takes two GRPO
updates on it from the initial weights (with a KL term, an entropy bonus, off-policy ratios that
clip, a dropped row, gradient accumulation over 2 micro-batches per rank, warm-up then cosine LR,
weight decay and gradient clipping all active) and replays the same two updates as a plain
single-process torch loop, so the comparison tests do not depend on test order.

The GPU path (NCCL, bf16) is checked by scripts/gpu_check.sh, which runs LearnerRank under torchrun.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace

import pytest
import torch

from rlhf.algo import grpo_objective, normalisers, token_entropy, token_logprobs
from rlhf.config import AlgoConfig, LearnerConfig
from rlhf.learner import LearnerError, LearnerGroup
from rlhf.learner.checkpoint import CheckpointError, latest_complete, read_checkpoint, save_checkpoint, verify_checkpoint
from rlhf.learner.optim import build_adamw, lr_factor
from rlhf.learner.rank import load_hf_model
from rlhf.types import TrainBatch

DTYPE = "float32"
VOCAB = 49152
B, L, PROMPT = 8, 14, 5
TOTAL_STEPS = 50

# Tolerances (fp32 on CPU). The group and the plain loop compute the same sums in a different
# order (per micro-batch and per rank, then reduced over gloo), which perturbs gradients by
# float32 rounding, ~1e-7 relative. Adam divides by sqrt(v) + eps with eps = 1e-5, so an
# element's update moves by at most lr / eps x its gradient error (1e-3 / 1e-5 x ~1e-10 = 1e-8),
# plus an ulp of rounding on parameters of size ~1 (6e-8): measured <= 1.2e-7 after two updates of
# ~1e-3 each, so parameters must agree to 1e-6. The gradient SCALE (world-size and accumulation
# bookkeeping) is pinned by the pre-clipping grad norm (DeepSpeed's vs a float64 sum: measured
# ~1e-8 relative) at 1e-6: clipping is active here (norm > 1.0), and it would hide a scale error
# from the parameters alone.
PARAM_ATOL = 1e-6
NORM_RTOL = 1e-6
LOGPROB_ATOL = 1e-5


def learner_cfg(stage: int, **overrides) -> LearnerConfig:
    base = dict(
        num_ranks=2,
        zero_stage=stage,
        micro_batch_size=2,  # 4 rows per rank -> 2 micro-batches: accumulation is exercised
        num_threads=1,
        lr=1e-3,
        adam_eps=1e-5,
        weight_decay=0.1,
        warmup_steps=2,
        lr_schedule="cosine",
        grad_clip=1.0,
        timeout_s=600.0,
        zero3_param_persistence_threshold=0,  # partition every parameter, however small
    )
    return LearnerConfig(**{**base, **overrides})


ALGO = AlgoConfig(kl_coef=0.05, entropy_coef=0.01, clip_low=0.2, clip_high=0.28)


def make_batch(seed: int) -> TrainBatch:
    """8 right-padded rows of 14 tokens: 5 prompt tokens, completions of various lengths."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (B, L), generator=g)
    lengths = torch.tensor([14, 12, 9, 14, 11, 7, 13, 10])
    pos = torch.arange(L)[None, :]
    attention = (pos < lengths[:, None]).long()
    response = ((pos >= PROMPT) & (attention > 0)).float()
    weight = torch.ones(B)
    weight[5] = 0.0  # a dropped completion (reward None): no loss, no metric weight
    return TrainBatch(
        input_ids=ids,
        attention_mask=attention,
        response_mask=response,
        advantages=torch.randn(B, generator=g),
        sample_weight=weight,
    )


def off_policy(batch: TrainBatch, logprobs: torch.Tensor, seed: int) -> TrainBatch:
    """Old log-probs = current ones shifted by up to +-0.4, so some ratios leave [0.8, 1.28]."""
    g = torch.Generator().manual_seed(seed)
    noise = (torch.rand(logprobs.shape, generator=g) - 0.5) * 0.8
    return replace(batch, old_logprobs=(logprobs + noise) * batch.response_mask)


@pytest.fixture(scope="module", params=[2, 3], ids=["zero2", "zero3"])
def group(request, ray_session, tiny_model_path):
    g = LearnerGroup(learner_cfg(request.param), ALGO, tiny_model_path, DTYPE, False, TOTAL_STEPS)
    yield g
    g.shutdown()


def plain_torch_updates(model_path: str, cfg: LearnerConfig, batches: list[TrainBatch], device: str = "cpu") -> dict:
    """The reference: one process, whole batch in one forward, torch AdamW + LambdaLR, fp32.

    (scripts/gpu_learner_check.py runs it on CUDA.)"""
    model = load_hf_model(model_path, "float32", False).to(device).train()
    opt = build_adamw(model, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(cfg.lr_schedule, cfg.warmup_steps, TOTAL_STEPS))
    norms, losses, lrs = [], [], []
    for batch in batches:
        batch = batch.to(device)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        logprobs = token_logprobs(logits, batch.input_ids)
        entropy = token_entropy(logits)
        total_tokens, total_seqs = normalisers(batch.response_mask, batch.sample_weight)
        loss, _ = grpo_objective(logprobs, batch, ALGO, total_tokens=total_tokens, total_seqs=total_seqs,
                                 entropy=entropy)
        opt.zero_grad()
        loss.backward()
        # Clip as DeepSpeed does, with the norm summed in float64: torch's float32 clip_grad_norm_
        # is itself off by ~1e-5 relative over 3.2M elements, DeepSpeed's norm by ~1e-8.
        norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters())).item()
        for p in model.parameters():
            p.grad.mul_(min(1.0, cfg.grad_clip / (norm + 1e-6)))
        norms.append(norm)
        losses.append(float(loss.detach()))
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return {"params": {k: v.detach().float().cpu() for k, v in model.named_parameters()},
            "grad_norm": norms, "loss": losses, "lr": lrs}


@pytest.fixture(scope="module")
def trained(group, tiny_model_path):
    """Two updates on the fresh group, and the same two in plain torch."""
    initial = group.full_state()
    batches, metrics, walls = [], [], []
    for step in range(2):
        batch = make_batch(seed=step)
        batch.ref_logprobs = group.compute_ref_logprobs(batch)
        batch = off_policy(batch, group.compute_logprobs(batch), seed=100 + step)
        batches.append(batch)
        start = time.perf_counter()
        metrics.append(group.train_step(batch))
        walls.append(time.perf_counter() - start)
    after = group.full_state()
    reference = plain_torch_updates(tiny_model_path, group.cfg, batches)
    return {"initial": initial, "after": after, "metrics": metrics, "batches": batches, "reference": reference,
            "walls": walls}


# --- the update ------------------------------------------------------------------------------


def test_two_updates_match_plain_torch(trained):
    ref = trained["reference"]
    for name, want in ref["params"].items():
        got = trained["after"][name]
        moved = (want - trained["initial"][name]).abs().max().item()
        assert moved > 1e-4, f"{name} did not move in the reference ({moved})"
        torch.testing.assert_close(got, want, atol=PARAM_ATOL, rtol=0, msg=lambda m: f"{name}: {m}")
    for step, m in enumerate(trained["metrics"]):
        # grad_norm is measured before clipping: it pins the gradient scale (world size, accumulation).
        assert m["grad_norm"] == pytest.approx(ref["grad_norm"][step], rel=NORM_RTOL)
        assert m["grad_norm"] > 1.0  # so clipping to 1.0 was active in both
        assert m["loss"] == pytest.approx(ref["loss"][step], rel=NORM_RTOL, abs=1e-6)
        assert m["lr"] == pytest.approx(ref["lr"][step], rel=1e-12)
        assert m["skipped"] == 0.0


def test_schedule_warms_up_linearly(trained):
    # warmup_steps=2: update 0 uses lr * 1/2, update 1 lr * 2/2 (the cosine part is pinned in
    # test_learner_units.py).
    assert [m["lr"] for m in trained["metrics"]] == pytest.approx([5e-4, 1e-3], rel=1e-12)


def test_metrics_are_the_whole_batch_values(trained):
    m = trained["metrics"][1]
    assert {"loss", "policy_loss", "kl", "entropy", "clip_frac/low", "clip_frac/high", "grad_norm", "lr",
            "tokens/s", "skipped"} <= set(m)
    # Old log-probs were shifted by up to +-0.4, so ratios spread over about [0.67, 1.5]: both
    # clip bounds bind for some tokens, and a fraction is a share of tokens in [0, 1].
    assert 0.0 < m["clip_frac/low"] < 1.0 and 0.0 < m["clip_frac/high"] < 1.0
    # After one update the policy differs from the reference, so the k3 KL estimate is > 0.
    assert m["kl"] > 0.0
    # Random tiny model: near-uniform over 49,152 tokens -> entropy close to ln(49152) = 10.80.
    assert 10.0 < m["entropy"] < math.log(VOCAB) + 1e-3
    assert m["tokens/s"] > 0


def test_step_seconds_are_the_ranks_time_inside_the_update(trained):
    for m, wall in zip(trained["metrics"], trained["walls"]):
        # The slowest rank's train_step runs inside the group's call, so it is > 0 and <= the
        # wall time measured around that call (a timer restarted mid-step, or one subtracting a
        # token position from perf_counter, breaks one bound or the other).
        assert 0.0 < m["learner/step_s"] <= wall
        # tokens/s divides the batch's attention tokens, 14+12+9+14+11+7+13+10 = 90 (the dropped
        # row is still computed), by the group's wall time, which lies within the test's.
        assert m["tokens/s"] >= 90 / wall


def test_reference_logprobs_stay_at_the_initial_model(group, trained, tiny_model_path):
    batch = trained["batches"][0]
    model = load_hf_model(tiny_model_path, DTYPE, False).eval()
    with torch.no_grad():
        want = token_logprobs(model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits,
                              batch.input_ids)
    # Log-probs exist for completion tokens only: padding is trimmed away, and the prompt positions
    # before the first completion token are never projected onto the vocabulary (they hold 0).
    valid = batch.response_mask.bool()
    got = group.compute_ref_logprobs(batch)
    torch.testing.assert_close(got[valid], want.float()[valid], atol=LOGPROB_ATOL, rtol=0)


def _hf_logprobs(state: dict[str, torch.Tensor], model_path: str, batch: TrainBatch) -> torch.Tensor:
    """Independent of rlhf.algo: float64 log_softmax of a transformers forward pass."""
    model = load_hf_model(model_path, "float32", False).eval()
    model.load_state_dict(state, strict=False)
    model.tie_weights()
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.double()
    lp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, batch.input_ids[:, 1:, None])[..., 0]
    return torch.cat([torch.zeros(batch.size, 1, dtype=lp.dtype), lp], dim=1)


def test_learner_logprobs_equal_a_transformers_forward(group, tiny_model_path):
    batch = make_batch(seed=7)
    state = group.full_state()
    got = group.compute_logprobs(batch)
    want = _hf_logprobs(state, tiny_model_path, batch)
    valid = batch.response_mask.bool()
    torch.testing.assert_close(got.double()[valid], want[valid], atol=LOGPROB_ATOL, rtol=0)
    # Every completion starts at position PROMPT=5, so positions 0..4 are never scored.
    assert batch.loss_start() == PROMPT - 1 and got[:, :PROMPT].abs().max() == 0


def test_logprobs_of_an_odd_row_count_are_padded_and_trimmed(group):
    batch = make_batch(seed=8)
    three = batch.select(slice(0, 3))  # 3 rows over 2 ranks
    valid = three.response_mask.bool()  # only completion tokens carry a log-prob
    torch.testing.assert_close(group.compute_logprobs(three)[valid], group.compute_logprobs(batch)[:3][valid],
                               atol=1e-6, rtol=0)


# --- non-finite updates ----------------------------------------------------------------------


def test_nonfinite_loss_on_one_rank_skips_the_update_on_every_rank(group, trained):
    before = group.full_state()
    opt_before = group.optimizer_states()
    batch = make_batch(seed=11)
    batch.ref_logprobs = group.compute_ref_logprobs(batch)
    batch.advantages[6] = float("nan")  # row 6 is on rank 1 (rows 4..7)
    m = group.train_step(batch)
    assert m["skipped"] == 1.0
    after = group.full_state()
    for name in before:
        assert torch.equal(before[name], after[name]), name
    for r, (a, b) in enumerate(zip(opt_before, group.optimizer_states())):
        for k in a:
            assert torch.equal(a[k], b[k]), f"rank {r} optimizer state {k} changed"
    batch.advantages[6] = 0.5
    ok = group.train_step(batch)
    assert ok["skipped"] == 0.0 and math.isfinite(ok["grad_norm"])


# --- bad input -------------------------------------------------------------------------------


def test_rows_not_divisible_by_ranks_is_rejected(group):
    with pytest.raises(ValueError, match="7 rows, not divisible by learner.num_ranks=2"):
        group.train_step(make_batch(seed=3).select(slice(0, 7)))


def test_batch_with_no_weighted_tokens_is_rejected(group):
    batch = make_batch(seed=3)
    batch.sample_weight = torch.zeros(B)
    with pytest.raises(ValueError, match="nothing to learn from"):
        group.train_step(batch)


# --- checkpoints -----------------------------------------------------------------------------


def _step(group, seed: int) -> dict:
    batch = make_batch(seed=seed)
    batch.ref_logprobs = group.compute_ref_logprobs(batch)
    return group.train_step(batch)


def test_save_then_resume_restores_parameters_optimizer_and_schedule(group, trained, tmp_path):
    root = tmp_path / "checkpoints"
    state = {"step": 2, "data": {"position": 16}, "config": {"model": {"name_or_path": "tiny"}}}
    path = group.save(root, 2, state, keep_last=2)
    saved_params, saved_opt = group.full_state(), group.optimizer_states()
    after_save = _step(group, seed=21)
    params_after_step = group.full_state()
    assert any(not torch.equal(saved_params[k], params_after_step[k]) for k in saved_params)

    assert group.load(path) == state
    for k, v in group.full_state().items():
        assert torch.equal(v, saved_params[k]), k
    for r, (want, got) in enumerate(zip(saved_opt, group.optimizer_states())):
        assert want.keys() == got.keys() and any(k.endswith("exp_avg_sq") for k in want)
        for k in want:
            assert torch.equal(want[k], got[k]), f"rank {r} optimizer state {k}"
    # The same update from the restored state lands on the same parameters with the same LR.
    again = _step(group, seed=21)
    assert again["lr"] == after_save["lr"]
    for k, v in group.full_state().items():
        torch.testing.assert_close(v, params_after_step[k], atol=1e-7, rtol=0)


def test_interrupted_save_leaves_previous_checkpoint_loadable(group, trained, tmp_path):
    root = tmp_path / "checkpoints"
    good = group.save(root, 5, {"step": 5}, keep_last=2)
    params = group.full_state()

    def crash_midway(tmp):
        group._call("save_checkpoint", "save_checkpoint", None, str(tmp))  # DeepSpeed files written
        raise OSError("disk full")  # ... then the save dies before the marker

    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(root, 6, crash_midway, {"step": 6}, keep_last=1)
    # keep_last=1 would have deleted step-5, but only after step-6 was complete.
    assert latest_complete(root) == good
    assert sorted(p.name for p in root.iterdir()) == ["step-5"]
    _step(group, seed=22)
    assert group.load(good) == {"step": 5}
    for k, v in group.full_state().items():
        assert torch.equal(v, params[k]), k
    assert read_checkpoint(good) == {"step": 5}


# --- export ----------------------------------------------------------------------------------


def test_a_checkpoint_missing_one_ranks_shard_is_refused_by_name(group, tmp_path):
    path = group.save(tmp_path / "checkpoints", 3, {"step": 3}, keep_last=1)
    ranks = verify_checkpoint(path)["ranks"]
    assert sorted(ranks) == ["0", "1"] and all(ranks.values())  # both ranks' shards are in the manifest
    (path / ranks["1"][0]).unlink()
    with pytest.raises(CheckpointError, match=r"lacks the shard of learner rank\(s\) 1"):
        group.load(path)


def test_export_loads_in_transformers_with_the_learner_weights(group, tiny_model_path, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = group.export(tmp_path / "export")
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= names
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    state = group.full_state()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), state[name].to(p.dtype), atol=0, rtol=0)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # still tied
    assert AutoTokenizer.from_pretrained(out)("1 + 1 =")["input_ids"]
    batch = make_batch(seed=9)
    valid = batch.response_mask.bool()  # only completion tokens carry a log-prob
    torch.testing.assert_close(_hf_logprobs(dict(model.named_parameters()), str(out), batch).float()[valid],
                               group.compute_logprobs(batch)[valid], atol=LOGPROB_ATOL, rtol=0)


def test_export_from_a_saved_checkpoint_has_the_saved_weights(group, tiny_model_path, tmp_path):
    from transformers import AutoModelForCausalLM

    from rlhf.learner.export import export_checkpoint

    ckpt = group.save(tmp_path / "checkpoints", 9, {"step": 9, "config": {"model": {"dtype": DTYPE}}})
    saved = group.full_state()
    _step(group, seed=23)  # the live model moves on; the export must not follow it
    out = export_checkpoint(ckpt, tmp_path / "export", base_model_path=tiny_model_path)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), saved[name].to(p.dtype), atol=0, rtol=0)


# --- a dead rank -----------------------------------------------------------------------------


def test_dead_rank_is_named_with_the_stage(ray_session, tiny_model_path):
    import ray

    g = LearnerGroup(learner_cfg(2, timeout_s=120.0), AlgoConfig(), tiny_model_path, DTYPE, False, TOTAL_STEPS)
    try:
        ray.kill(g.ranks[1], no_restart=True)
        with pytest.raises(LearnerError, match="learner rank 1 died during train_step"):
            g.train_step(make_batch(seed=1))
    finally:
        g.shutdown()
