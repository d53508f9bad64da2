"""The off-policy path end to end on the tiny model (issue 14): several updates per batch (the ratio
is no longer 1), asynchronous rollouts one step ahead, and a sampler/learner mismatch refused.

In-process runs on the session's Ray, with the tests' learnable reward so weights really move.
What each rollout correction does to the loss is pinned first, cheaply, on a fixed batch.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from rlhf.algo import grpo_objective, normalisers
from rlhf.config import AlgoConfig
from rlhf.run.metrics import read_metrics
from rlhf.run.timeline import read_timeline
from rlhf.train import MismatchError, train
from rlhf.types import TrainBatch
from support.runs import axis_reward, compose, steps_logged

LR = 1e-2


def tiny(run_dir, model_path, *extra):
    return compose("+experiment=tiny_smoke", f"trainer.output_dir={run_dir}", "trainer.tensorboard=false",
                   "rollout.top_k=8", f"learner.lr={LR}", axis_reward(model_path), *extra)


# Each correction against rollout_correction=none on one fixed batch, at the objective (no engine).
# Positions 0 prompt, then completion tokens; row 0 has 2, row 1 has 3 (its position 3).
# Learner log-probs -1 everywhere and on-policy (ratio 1), so a token's loss is -A * w and the
# default seq_mean_token_mean gives loss = 1/B sum_i (-A_i / n_i) sum_t w_t.
# none (w = 1): (-1 + 0.5) / 2 = -0.25. A correction differs from it by
#   delta = 1/2 [(-1/2) sum_row0 (w - 1) + (0.5/3) sum_row1 (w - 1)].
OFF_MASK = torch.tensor([[0.0, 1.0, 1.0, 0.0], [0.0, 1.0, 1.0, 1.0]])
OFF_ADV = torch.tensor([1.0, -0.5])
RHO = torch.tensor([[1.0, 1.5, 4.0, 1.0], [1.0, 0.25, 1.0, 1.0]])  # rho of the completion tokens
CORRECTED = {
    # tis, cap 2: w = [1.5, 2], [0.25, 1, 1]: delta = 1/2 [-1/2 (0.5 + 1) + 0.5/3 (-0.75)]
    #   = 1/2 (-0.75 - 0.125) = -0.4375.
    "tis": ([[0, 1.5, 2, 0], [0, 0.25, 1, 1]], -0.4375),
    # icepop, band [0.5, 2]: rho 4 and 0.25 dropped, 1.5 weighs 1.5: w = [1.5, 0], [0, 1, 1]:
    #   delta = 1/2 [-1/2 (-0.5) + 0.5/3 (-1)] = 1/2 (1/4 - 1/6) = 1/24. (A 0/1 mask gave 1/6.)
    "icepop": ([[0, 1.5, 0, 0], [0, 0, 1, 1]], 1 / 24),
    # token_reject: w = [1, 0], [0, 1, 1]: delta = 1/2 [-1/2 (-1) + 0.5/3 (-1)] = 1/2 (1/2 - 1/6) = 1/6.
    "token_reject": ([[0, 1, 0, 0], [0, 0, 1, 1]], 1 / 6),
    # seq_mask: row 0's geometric mean sqrt(1.5 * 4) = 2.449 > 2, dropped; row 1's
    #   (0.25 * 1 * 1)^(1/3) = 0.630 kept with weight 1: delta = 1/2 [-1/2 (-2) + 0] = 0.5.
    "seq_mask": ([[0, 0, 0, 0], [0, 1, 1, 1]], 0.5),
}


def _objective(correction: str):
    logprobs = torch.full(OFF_MASK.shape, -1.0, requires_grad=True)
    batch = TrainBatch(
        input_ids=torch.zeros(OFF_MASK.shape, dtype=torch.long),
        attention_mask=torch.ones(OFF_MASK.shape, dtype=torch.long),
        response_mask=OFF_MASK,
        advantages=OFF_ADV,
        sampler_logprobs=(-1.0 - RHO.log()) * OFF_MASK,  # log rho = learner - sampler
    )
    cfg = AlgoConfig(rollout_correction=correction, correction_cap=2.0, correction_low=0.5, correction_high=2.0)
    tokens, seqs = normalisers(OFF_MASK)
    loss, _ = grpo_objective(logprobs, batch, cfg, total_tokens=tokens, total_seqs=seqs)
    (grad,) = torch.autograd.grad(loss, logprobs)
    return loss.item(), grad


@pytest.mark.parametrize("correction", sorted(CORRECTED))
def test_a_correction_changes_the_loss_of_a_fixed_batch_by_the_derived_amount(correction):
    base_loss, base_grad = _objective("none")
    assert base_loss == pytest.approx(-0.25, abs=1e-6)
    weights, delta = CORRECTED[correction]
    loss, grad = _objective(correction)
    assert loss - base_loss == pytest.approx(delta, abs=1e-6)
    # The weight reaches the gradient token by token: d loss / d logp_t = w_t x none's.
    torch.testing.assert_close(grad, torch.tensor(weights) * base_grad)


@pytest.fixture(scope="module")
def multi_update_run(ray_session, tiny_model_path, tmp_path_factory):
    """3 steps x 2 mini-batches x 2 epochs = 12 updates on a cosine schedule with 2 warm-up updates."""
    run_dir = tmp_path_factory.mktemp("multi") / "run"
    train(tiny(run_dir, tiny_model_path, "trainer.steps=3", "trainer.eval_prompts=0",
               "trainer.export_at_end=false", "algo.mini_batches_per_step=2", "algo.epochs_per_step=2",
               "learner.lr_schedule=cosine", "learner.warmup_steps=2"))
    return steps_logged(run_dir)


def test_several_updates_per_batch_move_the_ratio_off_one(multi_update_run):
    steps = multi_update_run
    assert sorted(steps) == [1, 2, 3]
    # Updates 2-4 of a step see weights moved by the earlier ones: the ratio leaves 1.
    assert any(steps[s]["ratio/max"] > 1 + 1e-4 or steps[s]["ratio/min"] < 1 - 1e-4 for s in steps)
    for m in steps.values():
        # Old log-probs are the learner's own before the first update, so the gap to the sampler
        # stays numerics (measured ~1e-7 per token on the tiny model).
        assert m["mismatch/abs_logprob_diff_mean"] < 1e-4 and m["mismatch/kl_k3"] < 1e-6


def test_the_schedule_counts_optimizer_updates(multi_update_run):
    # 12 updates, 2 warm-up: update k uses (k + 1) / 2 for k < 2, then 0.5 (1 + cos(pi (k - 2) / 10)).
    # A step logs the mean of its 4 updates' rates. (Counted in steps, as before, the schedule would
    # have ended at step 3 and these means would differ.)
    def factor(k):
        return (k + 1) / 2 if k < 2 else 0.5 * (1 + math.cos(math.pi * (k - 2) / 10))

    for step, m in multi_update_run.items():
        ks = range((step - 1) * 4, step * 4)
        assert m["lr"] == pytest.approx(LR * sum(factor(k) for k in ks) / 4, rel=1e-6), step


@pytest.fixture(scope="module")
def async_run(ray_session, tiny_model_path, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("async") / "run"
    # lr 1e-2 moves this model far in one update (measured kl_k3 ~0.1 one update stale): no limit.
    train(tiny(run_dir, tiny_model_path, "trainer.steps=4", "trainer.max_staleness=1",
               "algo.max_mismatch_kl=null", "rollout_correction=tis", "trainer.eval_every=2",
               "trainer.export_at_end=false", "algo.dynamic_sampling=true"))
    return run_dir


def test_async_batches_are_one_update_stale_and_corrected(async_run):
    steps = steps_logged(async_run)
    # Batch 1 comes from the start weights (update 0) and is trained at step 1: staleness 0; batch
    # t >= 2 is sampled after update t - 2 and trained after update t - 1: staleness 1.
    assert [steps[s]["async/staleness"] for s in (1, 2, 3, 4)] == [0.0, 1.0, 1.0, 1.0]
    # One update apart (lr 1e-2 moves this model's weights a lot): the gap is policy change, far
    # above step 1's numerics, and TIS weights it.
    assert steps[1]["mismatch/kl_k3"] < 1e-6
    assert all(steps[s]["mismatch/kl_k3"] > 1e-3 for s in (2, 3, 4))
    # Step 1: |log rho| ~1e-7, so every weight min(rho, 2) is 1 to within 1e-6, none truncated.
    assert steps[1]["rollout_correction/weight_mean"] == pytest.approx(1.0, abs=1e-5)
    assert steps[1]["rollout_correction/truncated_frac"] == 0.0
    for s in (2, 3, 4):
        w = steps[s]["rollout_correction/weight_mean"]
        # min(rho, cap) >= exp(-|log rho|) when cap >= 1, and by Jensen the mean of exp(-|log rho|)
        # is >= exp(-mean |log rho|): a lower bound from the logged gap that any TIS run obeys.
        assert w >= math.exp(-steps[s]["mismatch/abs_logprob_diff_mean"]) - 1e-6, s
        # The weights are the ratios, not 1 (an identity correction logs 1.0): measured 0.66, 0.57,
        # 0.75 at steps 2-4 (the learner, one update on, gives the sampled tokens less mass).
        assert w < 0.9, s
    evals = [m["step"] for m in read_metrics(async_run / "metrics.jsonl") if "eval/accuracy" in m]
    assert evals == [0, 2, 4]  # evaluation keeps working, on the weights of that step
    # Dynamic sampling runs inside the producer, ahead of the learner, as in the synchronous loop.
    assert all(1 <= steps[s]["dynamic_sampling/draws"] <= 3 for s in steps)


def test_async_timeline_shows_generation_overlapping_training(async_run):
    spans = read_timeline(async_run / "timeline.jsonl")
    span = {(s["phase"], s["step"]): s for s in spans}
    for step in (1, 2, 3):
        gen, trn, sync = span[("generate", step + 1)], span[("train", step)], span[("sync", step)]
        # Batch step + 1 is generated while step is trained, and finished before the sync.
        assert gen["start"] < trn["end"] and gen["end"] <= sync["start"], step
    assert ("generate", 5) not in span  # nothing is generated past the last step
    assert (async_run / "timeline.png").stat().st_size > 1000


def test_a_sampler_learner_mismatch_is_a_named_error(ray_session, tiny_model_path, tmp_path):
    # raw_logprobs reports log-probs at temperature 1 while the engines sample, and the learner
    # scores, at 0.5: the k3 KL is ~1 per token on this near-uniform model, far above 0.05. With
    # algo.max_mismatch_kl_steps=2, step 1 only warns and step 2, the second in a row, stops the run.
    run_dir = tmp_path / "run"
    cfg = tiny(run_dir, tiny_model_path, "trainer.steps=3", "trainer.eval_prompts=0", "algo.max_mismatch_kl_steps=2",
               "rollout.logprobs_mode=raw_logprobs", "rollout.temperature=0.5")
    with pytest.raises(MismatchError, match=r"step 2: mismatch/kl_k3=\S+ \(sampler vs learner, per token\) "
                                            r"exceeds algo.max_mismatch_kl=0.05.*for 2 consecutive steps"):
        train(cfg)
    # The failing step's figures are logged before the error, with the streak's counts.
    logged = steps_logged(run_dir)
    assert list(logged) == [1, 2] and all(logged[s]["mismatch/kl_k3"] > 0.05 for s in (1, 2))
    assert [logged[s]["mismatch/kl_streak"] for s in (1, 2)] == [1, 2]
    assert json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 2
