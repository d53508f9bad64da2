"""Learner pieces that need no process group: DeepSpeed config, LR schedule, metric reduction,
settings checks, rank waits, weight buckets."""

from __future__ import annotations

import math
import re

import pytest
import torch

from rlhf.config import AlgoConfig, ConfigError, LearnerConfig
from rlhf.learner.ds_config import policy_config, reference_config
from rlhf.learner.group import LearnerError, wait_ranks
from rlhf.learner.optim import lr_factor, param_groups
from rlhf.learner.rank_metrics import RankMetrics, reduce_metrics
from rlhf.learner.settings import check_sampling, check_settings
from rlhf.learner.weights import full_parameter_buckets, write_buckets, write_hf_weights
from rlhf.types import SamplingSettings

# --- DeepSpeed config ------------------------------------------------------------------------


def test_policy_config_zero2_defaults():
    ds = policy_config(LearnerConfig(num_ranks=2), "float32", micro_batch_size=4)
    assert ds["zero_optimization"]["stage"] == 2
    assert ds["gradient_accumulation_steps"] == 1  # the learner marks boundaries itself
    assert ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_clipping"] == 1.0
    assert "bf16" not in ds and "offload_optimizer" not in ds["zero_optimization"]


@pytest.mark.parametrize(
    "overrides, dtype, runs",
    [
        ({"num_ranks": 1, "zero_stage": 2}, "float32", 0),  # one fp32 rank: nothing to partition
        ({"num_ranks": 1, "zero_stage": 1}, "float32", 0),
        ({"num_ranks": 1, "zero_stage": 2}, "bfloat16", 2),  # bf16 keeps ZeRO's mixed-precision path
        ({"num_ranks": 1, "zero_stage": 2, "offload_optimizer": True}, "float32", 2),
        ({"num_ranks": 1, "zero_stage": 3}, "float32", 3),
        ({"num_ranks": 2, "zero_stage": 2}, "float32", 2),
    ],
)
def test_the_stage_that_runs(overrides, dtype, runs):
    from rlhf.learner.ds_config import zero_stage

    cfg = LearnerConfig(**overrides)
    assert zero_stage(cfg, dtype) == runs
    ds = policy_config(cfg, dtype, micro_batch_size=1)
    assert ds["zero_optimization"]["stage"] == runs
    # Without ZeRO in fp32 the optimizer clips (CheckedAdamW), so DeepSpeed must not clip again.
    assert ds["gradient_clipping"] == (0.0 if runs == 0 else cfg.grad_clip)


def _checked_step(grads: list[list[float]], max_norm: float):
    from rlhf.learner.optim import CheckedAdamW

    params = [torch.nn.Parameter(torch.zeros(len(g))) for g in grads]
    for p, g in zip(params, grads):
        p.grad = torch.tensor(g)
    opt = CheckedAdamW(params, max_norm, lr=0.1, weight_decay=0.0)
    opt.step()
    return opt, params


def test_checked_adamw_clips_by_the_global_norm_and_keeps_it():
    # grads [3] and [4]: global norm 5; clipped to 1 they are [0.6] and [0.8]. Adam's first update
    # is -lr * sign(g) whatever the scale, so the clipped grads are read back from the moments:
    # exp_avg = (1 - beta1) * g = 0.1 * g.
    opt, params = _checked_step([[3.0], [4.0]], max_norm=1.0)
    assert not opt.overflow and float(opt._global_grad_norm) == pytest.approx(5.0, abs=1e-6)
    got = [float(opt.state[p]["exp_avg"]) for p in params]
    assert got == pytest.approx([0.06, 0.08], abs=1e-7)
    assert [float(p) for p in params] == pytest.approx([-0.1, -0.1], abs=1e-6)


def test_checked_adamw_skips_a_nonfinite_update():
    opt, params = _checked_step([[1.0], [float("nan")]], max_norm=1.0)
    assert opt.overflow and math.isnan(float(opt._global_grad_norm))
    assert all(float(p) == 0.0 for p in params) and not opt.state  # nothing moved, no moments


def test_policy_config_zero3_offload_bf16():
    cfg = LearnerConfig(zero_stage=3, offload_optimizer=True, offload_params=True)
    ds = policy_config(cfg, "bfloat16", micro_batch_size=2)
    zero = ds["zero_optimization"]
    assert zero["offload_optimizer"]["device"] == "cpu" and zero["offload_param"]["device"] == "cpu"
    assert ds["bf16"] == {"enabled": True, "check_grad_overflow": True}


def test_reference_config_follows_the_policy_sharding():
    assert reference_config(LearnerConfig(zero_stage=2), "float32", 2)["zero_optimization"] == {"stage": 0}
    z3 = reference_config(LearnerConfig(zero_stage=3, offload_params=True), "float32", 2)["zero_optimization"]
    assert z3["stage"] == 3 and z3["offload_param"]["device"] == "cpu"


def test_offload_params_needs_stage3():
    with pytest.raises(ConfigError, match="learner.offload_params=true needs learner.zero_stage=3"):
        policy_config(LearnerConfig(zero_stage=2, offload_params=True), "float32", 1)


def test_unknown_dtype_is_named():
    with pytest.raises(ConfigError, match="model.dtype='float8'"):
        policy_config(LearnerConfig(), "float8", 1)


# --- schedule --------------------------------------------------------------------------------


def test_warmup_then_constant():
    f = lr_factor("constant", warmup_steps=4, total_updates=10)
    assert [f(k) for k in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


def test_warmup_then_cosine_to_zero():
    f = lr_factor("cosine", warmup_steps=2, total_updates=6)
    # After warm-up, progress = (k - 2) / 4: 0, 1/4, 1/2, 3/4, 1 -> 0.5 * (1 + cos(pi * p)).
    want = [0.5, 1.0, 1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5, 0.5 * (1 + math.cos(3 * math.pi / 4)), 0.0]
    assert [f(k) for k in range(7)] == pytest.approx(want, abs=1e-12)
    assert f(100) == 0.0  # stays at 0 past the end


def test_bad_schedule_settings_are_named():
    with pytest.raises(ConfigError, match="learner.lr_schedule='linear'"):
        lr_factor("linear", 0, 10)
    with pytest.raises(ConfigError, match="learner.warmup_steps=-1"):
        lr_factor("constant", -1, 10)
    with pytest.raises(ConfigError, match=r"total optimizer updates \(3\) > learner.warmup_steps \(3\)"):
        lr_factor("cosine", 3, 3)


def test_vectors_do_not_decay():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    decay, no_decay = param_groups(model, 0.1)
    assert [p.shape for p in decay["params"]] == [torch.Size([4, 3])]
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert len(no_decay["params"]) == 3  # linear bias, norm weight, norm bias


# --- settings checked before any process starts ----------------------------------------------


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"num_ranks": 0}, "learner.num_ranks=0 must be >= 1"),
        ({"micro_batch_size": 0}, "learner.micro_batch_size=0 must be >= 1"),
        ({"timeout_s": 0.0}, "learner.timeout_s=0.0 must be > 0"),
        ({"backend": "mpi"}, "learner.backend='mpi'"),
        ({"backend": "nccl"}, "learner.backend=nccl needs learner.num_gpus_per_rank > 0"),
        ({"lr": 0.0}, None),  # checked when the optimizer is built, see below
    ],
)
def test_bad_learner_settings_are_named(overrides, message):
    cfg = LearnerConfig(**overrides)
    if message is None:
        from rlhf.learner.optim import build_adamw

        with pytest.raises(ConfigError, match="learner.lr=0.0 must be > 0"):
            build_adamw(torch.nn.Linear(2, 2), cfg)
        return
    with pytest.raises(ConfigError, match=message):
        check_settings(cfg, AlgoConfig(), "float32", total_updates=10)


@pytest.mark.parametrize(
    "sampling, message",
    [
        (SamplingSettings(temperature=0.0), "rollout.temperature=0.0 must be > 0"),
        (SamplingSettings(top_k=0), "rollout.top_k=0 must be -1 (off) or >= 1"),
        (SamplingSettings(top_p=0.0), "rollout.top_p=0.0 must be in (0, 1]"),
    ],
)
def test_the_sampling_the_learner_scores_is_checked_naming_the_rollout_key(sampling, message):
    # The learner takes temperature/top-k/top-p from rollout.* (train.py hands it the engines'
    # SamplingSettings); a value it cannot score is named by that key.
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_sampling(sampling)
    check_sampling(SamplingSettings(temperature=0.7, top_k=8, top_p=0.9))


def test_dr_grpo_aggregation_needs_norm_length():
    algo = AlgoConfig(loss_agg="seq_mean_token_sum_norm", norm_length=None)
    with pytest.raises(ConfigError, match="algo.norm_length"):
        check_settings(LearnerConfig(), algo, "float32", total_updates=10)


# --- metric reduction ------------------------------------------------------------------------


def _rank(sums, maxs, mins, tokens, seconds, skipped=False, lr=1e-5):
    return RankMetrics(sums, maxs, mins, tokens=tokens, seconds=seconds, grad_norm=2.0, lr=lr, skipped=skipped)


def test_micro_batches_add_shares_and_keep_extremes_of_kept_tokens_only():
    inf, nan = math.inf, math.nan
    m = RankMetrics.from_micro_batches(
        [
            ({"loss": 0.5, "clip_frac/low": 0.1, "ratio/max": 1.2, "ratio/min": 0.9}, 3.0),
            ({"loss": -0.2, "clip_frac/low": 0.05, "ratio/max": 1.4, "ratio/min": 0.95}, 2.0),
            # Every row dropped (sample_weight 0): token shares are 0/0 and the ratio extremes are
            # max/min's identities; only the loss (a finite 0 share) is counted.
            ({"loss": 0.0, "clip_frac/low": nan, "ratio/max": -inf, "ratio/min": inf}, 0.0),
        ],
        tokens=30.0, seconds=1.25, grad_norm=2.0, lr=1e-5, skipped=False,
    )
    assert m.sums == pytest.approx({"loss": 0.3, "clip_frac/low": 0.15})  # 0.5 - 0.2 + 0; 0.1 + 0.05
    assert m.maxs == {"ratio/max": 1.4} and m.mins == {"ratio/min": 0.9}
    assert (m.tokens, m.seconds) == (30.0, 1.25)


def test_a_rank_with_no_kept_tokens_still_reports_every_share_as_zero():
    m = RankMetrics.from_micro_batches(
        [({"loss": 0.0, "clip_frac/low": math.nan, "ratio/max": -math.inf}, 0.0)],
        tokens=10.0, seconds=0.5, grad_norm=2.0, lr=1e-5, skipped=False,
    )
    assert m.sums == {"loss": 0.0, "clip_frac/low": 0.0} and m.maxs == {}


def test_ranks_sum_shares_and_tokens_take_extremes_and_the_slowest_rank():
    r0 = _rank({"loss": 0.25, "clip_frac/low": 0.1}, {"ratio/max": 1.3}, {"ratio/min": 0.7},
               tokens=60.0, seconds=1.0)
    r1 = _rank({"loss": -0.05, "clip_frac/low": 0.05}, {"ratio/max": 1.6}, {"ratio/min": 0.9},
               tokens=40.0, seconds=1.5)
    m = reduce_metrics([r0, r1], wall_s=2.0)
    assert m["loss"] == pytest.approx(0.20)  # shares of the whole-batch loss add up: 0.25 - 0.05
    assert m["clip_frac/low"] == pytest.approx(0.15)  # 0.1 + 0.05
    assert m["ratio/max"] == 1.6 and m["ratio/min"] == 0.7
    assert m["tokens/s"] == pytest.approx(50.0)  # (60 + 40) tokens / 2.0 s of wall time
    assert m["learner/step_s"] == 1.5  # the slower rank's 1.5 s, not the 2.5 s sum
    assert m["grad_norm"] == 2.0 and m["lr"] == 1e-5 and m["skipped"] == 0.0
    assert "tokens" not in m and "seconds" not in m


def test_a_rank_missing_the_extremes_leaves_the_others():
    # Rank 1 kept no tokens, so it has no ratio extremes: rank 0's stand.
    r0 = _rank({"loss": 0.25}, {"ratio/max": 1.3}, {"ratio/min": 0.7}, tokens=60.0, seconds=1.0)
    r1 = _rank({"loss": 0.0}, {}, {}, tokens=40.0, seconds=1.0)
    m = reduce_metrics([r0, r1], wall_s=1.0)
    assert (m["ratio/max"], m["ratio/min"], m["loss"]) == (1.3, 0.7, 0.25)


@pytest.mark.parametrize("other", [dict(skipped=True), dict(lr=2e-5)], ids=["skipped", "lr"])
def test_ranks_that_took_different_updates_raise(other):
    r0 = _rank({"loss": 0.1}, {}, {}, tokens=1.0, seconds=1.0)
    r1 = _rank({"loss": 0.1}, {}, {}, tokens=1.0, seconds=1.0, **other)
    with pytest.raises(RuntimeError, match="learner rank 1 took a different update from rank 0"):
        RankMetrics.combine([r0, r1])


def test_no_ranks_raise():
    with pytest.raises(ValueError, match="no ranks"):
        RankMetrics.combine([])


# --- waiting on ranks ------------------------------------------------------------------------


def test_a_stalled_rank_is_named_with_the_stage(ray_session):
    import ray

    @ray.remote(num_cpus=0)
    def finish(seconds: float) -> float:
        import time

        time.sleep(seconds)
        return seconds

    ray.get(finish.remote(0.0))  # a worker process is up, so rank 0's call returns at once
    slow = finish.remote(60.0)
    try:
        with pytest.raises(LearnerError, match="learner rank 1 did not finish train_step within 5s"):
            wait_ranks("train_step", [finish.remote(0.0), slow], timeout_s=5.0)
    finally:
        ray.cancel(slow, force=True)


def test_a_failing_rank_is_named_with_its_error(ray_session):
    import ray

    @ray.remote(num_cpus=0)
    def boom(fail: bool) -> int:
        if fail:
            raise ValueError("bad shard")
        return 1

    with pytest.raises(LearnerError, match="learner rank 1 failed in compute_logprobs: ValueError: bad shard"):
        wait_ranks("compute_logprobs", [boom.remote(False), boom.remote(True)], timeout_s=60.0)


# --- weight buckets --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model(tiny_model_path):
    from rlhf.learner.rank import load_hf_model

    return load_hf_model(tiny_model_path, "float32", False)


def test_buckets_hold_every_parameter_once_and_the_tied_head_on_request(tiny_model):
    names = {n for n, _ in tiny_model.named_parameters()}
    # 64 KiB buckets: the 12 MiB embedding gets its own, small matrices are grouped.
    plain = list(full_parameter_buckets(tiny_model, 0, 64 << 10, include_tied_head=False))
    seen = [n for b in plain for n in b]
    assert sorted(seen) == sorted(names) and "lm_head.weight" not in seen
    assert 2 < len(plain) < len(names)
    buckets = list(full_parameter_buckets(tiny_model, 0, 64 << 10, True))
    # The head follows the embedding's bucket, alone: safetensors refuses shared storage in a file.
    head = [i for i, b in enumerate(buckets) if "lm_head.weight" in b]
    assert len(head) == 1 and buckets[head[0]].keys() == {"lm_head.weight"}
    assert "model.embed_tokens.weight" in buckets[head[0] - 1]
    assert torch.equal(buckets[head[0]]["lm_head.weight"], tiny_model.model.embed_tokens.weight)


def test_buckets_share_cpu_parameters_unless_asked_to_copy(tiny_model):
    shared = next(iter(full_parameter_buckets(tiny_model, 0, 1 << 30, False)))
    copied = next(iter(full_parameter_buckets(tiny_model, 0, 1 << 30, False, copy=True)))
    name, p = next(iter(tiny_model.named_parameters()))
    assert shared[name].data_ptr() == p.data_ptr()  # writing needs no 0.5 GB copy first
    assert copied[name].data_ptr() != p.data_ptr() and torch.equal(copied[name], p.detach())


def test_other_ranks_yield_nothing_without_zero3(tiny_model):
    assert list(full_parameter_buckets(tiny_model, 1, 1 << 20, True)) == []


def test_bucket_files_round_trip(tiny_model, tmp_path):
    from safetensors.torch import load_file

    paths, nbytes = write_buckets(full_parameter_buckets(tiny_model, 0, 1 << 20, True), tmp_path)
    loaded = {k: v for p in paths for k, v in load_file(p).items()}
    state = dict(tiny_model.named_parameters())
    assert nbytes == sum(t.numel() * 4 for t in loaded.values())
    for name, p in state.items():
        assert torch.equal(loaded[name], p.detach())


def test_sharded_hf_weights_load_in_transformers(tiny_model, tiny_model_path, tmp_path):
    import shutil

    from transformers import AutoModelForCausalLM

    write_hf_weights(full_parameter_buckets(tiny_model, 0, 1 << 20, False), tmp_path)
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert not (tmp_path / "model.safetensors").exists()
    shutil.copy(f"{tiny_model_path}/config.json", tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    for (name, a), (_, b) in zip(tiny_model.named_parameters(), loaded.named_parameters()):
        assert torch.equal(a, b), name
