"""On-policy distillation: the per-token advantage by hand, the objective with a teacher, the batch,
the tokenizer check, placement and the ledger (no model); then a tiny student distilled from a
perturbed copy of itself, end to end on real vLLM + DeepSpeed engines."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from rlhf.algo.distill import DISTILL_OBJECTIVES, distill_stats
from rlhf.algo.grpo import grpo_objective
from rlhf.cluster.placement import Bundle, plan_placement
from rlhf.config import AlgoConfig, ConfigError, LearnerConfig, LedgerConfig, RolloutConfig
from rlhf.experience.batching import build_train_batch
from rlhf.run.ledger import CostLedger
from rlhf.run.metrics import progress_line
from rlhf.types import Completion, RolloutBatch, TrainBatch
from rlhf.validation import validate
from rollouts.opd_teacher import TokenizerMismatchError, check_same_tokenizer
from tests.support.runs import compose

# One row, prompt at position 0, completion tokens at 1 and 2 (position 3 is padding).
STUDENT = torch.tensor([[0.0, -1.0, -2.0, 0.0]])
TEACHER = torch.tensor([[0.0, -0.5, -3.0, 0.0]])
MASK = torch.tensor([[0.0, 1.0, 1.0, 0.0]])


def test_reverse_kl_advantage_by_hand():
    # A_t = -(log π_s - log π_T): token 1: -(-1 + 0.5) = 0.5 (the teacher likes it more: pushed up);
    # token 2: -(-2 + 3) = -1 (the student is more confident than the teacher: pushed down).
    adv = DISTILL_OBJECTIVES.get("reverse_kl")(STUDENT, TEACHER, MASK, clamp=10.0)
    assert adv.tolist() == [[0.0, 0.5, -1.0, 0.0]]
    # Clamped to [-0.75, 0.75]: token 2's log-ratio 1 becomes 0.75.
    clamped = DISTILL_OBJECTIVES.get("reverse_kl")(STUDENT, TEACHER, MASK, clamp=0.75)
    assert clamped.tolist() == [[0.0, 0.5, -0.75, 0.0]]
    with pytest.raises(ValueError, match="clamp=0 must be > 0"):
        DISTILL_OBJECTIVES.get("reverse_kl")(STUDENT, TEACHER, MASK, clamp=0)
    with pytest.raises(ValueError, match="teacher_logprobs has shape"):
        DISTILL_OBJECTIVES.get("reverse_kl")(STUDENT, TEACHER[:, :3], MASK, clamp=1.0)


def test_distill_stats_by_hand():
    # log ratio x = log π_s - log π_T = [-0.5, 1]: k1 mean 0.25. k3 = e^{-x} - 1 + x:
    # e^{0.5} - 1.5 = 0.148721, e^{-1} = 0.367879: mean 0.258300. Teacher mean (-0.5 - 3) / 2 = -1.75.
    stats = distill_stats(STUDENT, TEACHER, MASK)
    assert stats["distill/reverse_kl"].item() == pytest.approx(0.25, abs=1e-7)
    assert stats["distill/reverse_kl_k3"].item() == pytest.approx((math.exp(0.5) - 1.5 + math.exp(-1)) / 2, abs=1e-6)
    assert stats["distill/teacher_logprob"].item() == pytest.approx(-1.75, abs=1e-7)


def _batch(advantage: float) -> TrainBatch:
    return TrainBatch(input_ids=torch.zeros(1, 4, dtype=torch.long), attention_mask=torch.ones(1, 4, dtype=torch.long),
                      response_mask=MASK.clone(), advantages=torch.tensor([advantage]), teacher_logprobs=TEACHER.clone())


@pytest.mark.parametrize("task_adv, coef", [(0.0, 1.0), (2.0, 0.5)])
def test_objective_adds_the_per_token_distill_advantage(task_adv, coef):
    # On-policy (no old log-probs) the ratio is 1, so the ppo_clip loss per token is -A_t and its
    # gradient w.r.t. log π_s(t) is -A_t / 2 under seq_mean_token_mean (2 tokens, 1 sequence), with
    # A_t = task_adv + coef * [0.5, -1] and log π_s detached inside A_t.
    logprobs = STUDENT.clone().requires_grad_(True)
    cfg = AlgoConfig(distill_coef=coef)
    loss, metrics = grpo_objective(logprobs, _batch(task_adv), cfg, total_tokens=2.0, total_seqs=1.0,
                                   raw_logprobs=logprobs)
    adv = [task_adv + coef * 0.5, task_adv - coef * 1.0]
    assert loss.item() == pytest.approx(-(adv[0] + adv[1]) / 2, abs=1e-6)
    loss.backward()
    assert logprobs.grad[0].tolist() == pytest.approx([0.0, -adv[0] / 2, -adv[1] / 2, 0.0], abs=1e-6)
    assert metrics["distill/reverse_kl"].item() == pytest.approx(0.25, abs=1e-6)


def test_objective_refuses_teacher_logprobs_without_a_coefficient():
    with pytest.raises(ValueError, match="algo.distill_coef=0.0 is not > 0"):
        grpo_objective(STUDENT.clone(), _batch(0.0), AlgoConfig(), total_tokens=2.0, total_seqs=1.0)


# One row over a 3-token vocabulary, the same logits [0, ln 2, ln 4] at every position: raw
# (temperature 1) p = [1, 2, 4] / 7. Prompt token 0, then token 2 sampled twice.
LOGITS = torch.log(torch.tensor([1.0, 2.0, 4.0])).expand(1, 3, 3)
IDS = torch.tensor([[0, 2, 2]])
IDS_MASK = torch.tensor([[0.0, 1.0, 1.0]])


def test_a_teacher_equal_to_the_student_gets_zero_advantage_whatever_the_sampling_temperature_and_top_p():
    # Sampled at T=0.5, top_p=0.8: p_0.5 ∝ [1, 4, 16] / 21; ascending cumulative [1/21, 5/21, 1], top_p
    # drops what is <= 1 - 0.8 = 0.2 (token 0), so token 2 has log(16/20) = log 0.8 in the sampling
    # distribution. The teacher (the same logits, vLLM's raw prompt log-probs) gives log(4/7).
    from rlhf.algo import token_logprobs

    sampled = token_logprobs(LOGITS, IDS, temperature=0.5, top_p=0.8)
    raw = token_logprobs(LOGITS, IDS, temperature=1.0)
    teacher = torch.log_softmax(LOGITS, -1)[0, 0, 2].expand(1, 3) * IDS_MASK  # log(4/7) on the completion
    assert sampled[0, 1:].tolist() == pytest.approx([math.log(0.8)] * 2, abs=1e-6)
    # Comparing the sampling distribution with the teacher's (the old code) gives an exact copy the
    # advantage -(log 0.8 - log(4/7)) = -log 1.4 = -0.336472 on every token: trained flatter.
    wrong = DISTILL_OBJECTIVES.get("reverse_kl")(sampled, teacher, IDS_MASK, clamp=10.0)
    assert wrong[0, 1:].tolist() == pytest.approx([-math.log(1.4)] * 2, abs=1e-6)
    # The objective compares raw with raw: advantage 0, so the pure-distillation loss -mean(A) is 0.
    batch = TrainBatch(input_ids=IDS, attention_mask=torch.ones_like(IDS), response_mask=IDS_MASK,
                       advantages=torch.zeros(1), teacher_logprobs=teacher)
    loss, metrics = grpo_objective(sampled.clone().requires_grad_(True), batch, AlgoConfig(distill_coef=1.0),
                                   total_tokens=2.0, total_seqs=1.0, raw_logprobs=raw)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    assert metrics["distill/reverse_kl"].item() == pytest.approx(0.0, abs=1e-6)
    assert metrics["distill/reverse_kl_k3"].item() == pytest.approx(0.0, abs=1e-6)


def test_objective_takes_the_old_raw_logprobs_over_the_update_s_own_and_refuses_neither():
    # old_raw_logprobs (the pre-update pass's) win over raw_logprobs: STUDENT against TEACHER gives
    # the hand-derived k1 mean 0.25 (test_distill_stats_by_hand); the update's own raw log-probs,
    # TEACHER itself, would give 0.
    batch = _batch(0.0)
    batch.old_raw_logprobs = STUDENT.clone()
    _, metrics = grpo_objective(STUDENT.clone(), batch, AlgoConfig(distill_coef=1.0), total_tokens=2.0,
                                total_seqs=1.0, raw_logprobs=TEACHER.clone())
    assert metrics["distill/reverse_kl"].item() == pytest.approx(0.25, abs=1e-6)
    with pytest.raises(ValueError, match="neither old_raw_logprobs nor raw_logprobs"):
        grpo_objective(STUDENT.clone(), _batch(0.0), AlgoConfig(distill_coef=1.0), total_tokens=2.0, total_seqs=1.0)


def _completion(i: int, prompt: list[int], ids: list[int], teacher: list[float] | None, mask=None) -> Completion:
    return Completion(i, prompt, ids, [-0.1] * len(ids), "stop", "", token_mask=mask, teacher_logprobs=teacher)


def test_batch_places_teacher_logprobs_on_completion_tokens_and_masks_observations():
    rollouts = RolloutBatch([_completion(0, [1, 2], [3, 4], [-0.5, -0.25]),
                             _completion(0, [1, 2], [5, 6, 7], [-1.0, -2.0, -3.0], mask=[1, 0, 1])], n=2)
    batch = build_train_batch(rollouts, torch.zeros(1, 2), torch.zeros(1, 2), pad_id=0)
    # Row 0: prompt at 0-1, completion at 2-3, padding at 4. Row 1: its observation token (position 3) is 0.
    assert batch.teacher_logprobs.tolist() == [[0.0, 0.0, -0.5, -0.25, 0.0], [0.0, 0.0, -1.0, 0.0, -3.0]]


def test_batch_refuses_teacher_logprobs_on_some_completions_or_of_the_wrong_length():
    some = RolloutBatch([_completion(0, [1], [3], [-0.5]), _completion(0, [1], [4], None)], n=2)
    with pytest.raises(ValueError, match="completion 1 has no teacher log-probs"):
        build_train_batch(some, torch.zeros(1, 2), torch.zeros(1, 2), pad_id=0)
    short = RolloutBatch([_completion(0, [1], [3, 4], [-0.5]), _completion(0, [1], [4], [-1.0])], n=2)
    with pytest.raises(ValueError, match="completion 0 has 1 teacher log-probs for 2 tokens"):
        build_train_batch(short, torch.zeros(1, 2), torch.zeros(1, 2), pad_id=0)


# --- the tokenizer check ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def student_tokenizer(tiny_model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_path)


def _swapped_copy(tiny_model_path: str, out: Path, a: int, b: int) -> Path:
    """The tiny model copied to ``out`` with the tokens of ids ``a`` and ``b`` exchanged in its tokenizer."""
    shutil.copytree(tiny_model_path, out)
    data = json.loads((out / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    by_id = {i: t for t, i in vocab.items()}
    vocab[by_id[a]], vocab[by_id[b]] = b, a
    (out / "tokenizer.json").write_text(json.dumps(data))
    return out


def test_same_tokenizer_passes(student_tokenizer):
    check_same_tokenizer(student_tokenizer, student_tokenizer, "student", "teacher", ["What is 3 + 4?"])


def test_tokenizer_mismatch_is_refused_listing_the_first_differing_ids(student_tokenizer, tiny_model_path, tmp_path):
    from transformers import AutoTokenizer

    teacher = AutoTokenizer.from_pretrained(_swapped_copy(tiny_model_path, tmp_path / "swapped", 300, 1000))
    s = {i: t for t, i in student_tokenizer.get_vocab().items()}
    with pytest.raises(TokenizerMismatchError) as err:
        check_same_tokenizer(student_tokenizer, teacher, "tiny", "swapped", [])
    text = str(err.value)
    assert "2 of 49152 token ids differ" in text
    assert f"id 300: student {s[300]!r}, teacher {s[1000]!r}; id 1000: student {s[1000]!r}, teacher {s[300]!r}" in text


def test_training_with_a_mismatched_teacher_fails_before_anything_starts(tiny_model_path, tmp_path):
    from rlhf.train import train

    teacher = _swapped_copy(tiny_model_path, tmp_path / "teacher", 300, 1000)
    cfg = compose("+experiment=tiny_smoke", "+teacher=engines", f"teacher.model={teacher}", "algo.distill_coef=1.0",
                  f"trainer.output_dir={tmp_path / 'run'}")
    with pytest.raises(TokenizerMismatchError, match="id 300"):
        train(cfg)
    assert not (tmp_path / "run" / "ledger.json").exists()  # raised before the ledger, Ray or any engine


# --- config, placement, ledger ------------------------------------------------------------------


def _distill(*overrides: str):
    return compose("+experiment=tiny_smoke", "+teacher=engines", "teacher.model=tiny-random-llama",
                   "algo.distill_coef=1.0", *overrides)


@pytest.mark.parametrize("overrides, message", [
    (["algo.distill_coef=-1"], "algo.distill_coef=-1.0 must be >= 0"),
    (["algo.distill=forward_kl"], "algo.distill='forward_kl' is not a registered distillation objective"),
    (["teacher.source=api", "teacher.model=gpt"], "not teacher.source='api'"),
    (["teacher.engines.max_model_len=1024"], "teacher.engines.max_model_len=1024 must exceed rollout.max_model_len=1024"),
    (["reward.functions=[]"], "trainer.eval_prompts=4 needs a reward"),
    (["reward.functions=[]", "trainer.eval_prompts=0", "algo.dynamic_sampling=true"], "algo.dynamic_sampling"),
])
def test_bad_distillation_settings_are_named(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        validate(_distill(*overrides))


def test_pure_distillation_validates_with_one_sample_per_prompt_and_no_rewards():
    validate(_distill("reward.functions=[]", "trainer.eval_prompts=0", "rollout.n=1"))
    with pytest.raises(ConfigError, match="reward.functions is empty"):
        validate(compose("+experiment=tiny_smoke", "reward.functions=[]"))


def test_teacher_engines_are_placed_beside_or_apart_from_the_policy():
    learner = LearnerConfig(num_ranks=1, num_cpus_per_rank=0.5)
    rollout = RolloutConfig(num_engines=1, num_cpus_per_engine=0.5)
    teacher = RolloutConfig(num_engines=2, num_cpus_per_engine=0.25, num_gpus_per_engine=1.0)
    # Colocated: bundle 0 = rank + engine + teacher 0 (1.25 CPU, 1 GPU); bundle 1 = teacher 1 alone.
    plan = plan_placement("colocated", learner, rollout, teacher)
    assert plan.groups[0].bundles == (Bundle(1.25, 1.0), Bundle(0.25, 1.0))
    assert [(s.group, s.bundle) for s in plan.teachers] == [("colocated", 0), ("colocated", 1)]
    separate = plan_placement("separate", learner, rollout, teacher)
    assert [g.name for g in separate.groups] == ["learner", "engines", "teacher"]
    assert separate.groups[2].bundles == (Bundle(0.25, 1.0),) * 2
    assert plan_placement("separate", learner, rollout).teachers == ()


def test_ledger_counts_teacher_tokens_scored_and_engine_hours(tmp_path):
    now = [0.0]
    cfg = LedgerConfig(device_kind="h100", num_devices=4, teacher_num_devices=2, save_every_s=0)
    ledger = CostLedger(tmp_path, cfg, "grpo", clock=lambda: now[0])
    now[0] = 1800.0  # half an hour before the teacher engines start: 4 devices x 0.5 h = 2 device-hours
    ledger.set_teacher_engines(2)
    now[0] = 3600.0  # half an hour with them: 2 engines x 0.5 h = 1 engine-hour; (4 + 2) x 0.5 h = 3
    ledger.add_teacher_scored(10_000, 12.5)
    ledger.add_teacher_scored(5_000, 7.5)
    data = json.loads(ledger.path.read_text())
    assert data["totals"]["teacher_tokens_scored"] == 15_000
    assert data["totals"]["teacher_scoring_s"] == pytest.approx(20.0)
    assert data["totals"]["teacher_engine_hours"] == pytest.approx(1.0)
    assert data["totals"]["device_hours"] == {"h100": pytest.approx(5.0)}
    assert data["cost"]["compute_usd"] == pytest.approx(5.0 * 2.50)  # h100 at $2.50 per device-hour
    assert "15,000 tokens scored in 20.0 s; 1.0000 engine-hours" in ledger.close()
    # A resumed run carries on from the file: one more hour with the engines adds 2 engine-hours.
    now[0] = 0.0
    again = CostLedger(tmp_path, cfg, "grpo", clock=lambda: now[0])
    again.set_teacher_engines(2)
    now[0] = 3600.0
    again.save()
    assert json.loads(again.path.read_text())["totals"]["teacher_engine_hours"] == pytest.approx(3.0)


# --- end to end -----------------------------------------------------------------------------------


@torch.no_grad()
def _reverse_kl(student_dir: str, teacher_dir: str, tokenizer) -> float:
    """Exact full-vocabulary KL(π_s || π_T) per position, averaged over the last 8 positions of 9
    fixed arithmetic prompts (chat template applied): a measure no sampling noise moves."""
    from transformers import AutoModelForCausalLM

    student, teacher = (AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32).eval() for p in (student_dir, teacher_dir))
    total, count = 0.0, 0
    for a in range(3):
        for b in range(3):
            text = tokenizer.apply_chat_template([{"role": "user", "content": f"What is {a} + {b}?"}],
                                                 add_generation_prompt=True, tokenize=False)
            ids = torch.tensor([tokenizer(text)["input_ids"]])
            ls = torch.log_softmax(student(ids).logits[0, -8:].double(), -1)
            lt = torch.log_softmax(teacher(ids).logits[0, -8:].double(), -1)
            total += float((ls.exp() * (ls - lt)).sum())
            count += ls.shape[0]
    return total / count


def test_tiny_student_distilled_from_a_perturbed_copy_moves_towards_it(ray_session, tiny_model_path,
                                                                       student_tokenizer, tmp_path):
    """Pure distillation, no reward functions: the teacher is the tiny model with N(0, 0.05^2) noise on
    every weight. 6 steps of 4 prompts x 4 samples at lr 2e-3 lower the exact reverse KL on fixed
    prompts from 0.1021 to 0.0920 (measured, Xeon fp32; the run is seeded and reproducible): the test
    asks for at least a 5% fall."""
    from rlhf.run.metrics import read_metrics
    from rlhf.train import train
    from tests.support.teachers import perturbed_copy

    teacher = perturbed_copy(tiny_model_path, tmp_path / "teacher", std=0.05)
    cfg = compose("+experiment=tiny_smoke", "+teacher=engines", f"teacher.model={teacher}", "algo.distill_coef=1.0",
                  "reward.functions=[]", "trainer.eval_prompts=0", "trainer.steps=6", "learner.lr=2e-3",
                  "teacher.engines.kv_cache_gb=0.25", f"trainer.output_dir={tmp_path / 'run'}")
    run = train(cfg)
    before = _reverse_kl(tiny_model_path, str(teacher), student_tokenizer)
    after = _reverse_kl(str(run / "export"), str(teacher), student_tokenizer)
    assert before == pytest.approx(0.1021, abs=2e-3)
    assert after < 0.95 * before, (before, after)
    steps = [m for m in read_metrics(run / "metrics.jsonl") if "loss" in m]
    assert [m["step"] for m in steps] == [1, 2, 3, 4, 5, 6]
    for m in steps:
        # Every token of 4 x 4 completions (16 new tokens at most) and its prompt was scored.
        assert m["distill/teacher_tokens"] > 16 and m["timing/teacher"] > 0
        assert m["distill/reverse_kl_k3"] > 0 and math.isfinite(m["distill/reverse_kl"])
    ledger = json.loads((run / "ledger.json").read_text())["totals"]
    assert ledger["teacher_tokens_scored"] == sum(int(m["distill/teacher_tokens"]) for m in steps)
    assert ledger["teacher_engine_hours"] > 0
    placement = json.loads((run / "placement.json").read_text())
    assert len(placement["teacher_engines"]) == 1


def test_the_step_line_shows_the_reverse_kl_when_distilling():
    line = progress_line(1, 8, {"reward/mean": 0.0, "distill/reverse_kl": 0.12345}, started=0.0)
    assert "reward=0.000 reverse_kl=0.1235 " in line
    assert "reverse_kl" not in progress_line(1, 8, {"reward/mean": 0.5}, started=0.0)


@pytest.mark.parametrize("updates", [
    pytest.param([], id="one_update"),  # the student's log-probs come from the update's own forward
    # From the old-logprob pass. The entropy bonus at a high rate moves the policy in the first
    # update (the distillation advantage is ~0 here), so the second mini-batch sees the old pass's
    # log-probs differ from its own forward's (ratio != 1).
    pytest.param(["algo.mini_batches_per_step=2", "algo.entropy_coef=0.1", "learner.lr=2e-3"], id="two_mini_batches",
                 marks=pytest.mark.slow),
])
def test_a_teacher_that_is_the_student_gives_zero_reverse_kl_at_temperature_and_top_p(
        ray_session, tiny_model_path, tmp_path, updates):
    """Teacher = the student's own folder, rollouts at temperature 0.7 and top_p 0.9: the student's
    log-probs that the advantage compares with the teacher's must be of the same distribution
    (temperature 1, untruncated, as vLLM's prompt log-probs are), so the reverse KL is ~0.

    Tolerances: per token the two sides differ only by fp32 kernel numerics, vLLM against torch,
    < 1e-4 (tests/test_rollout.py TOL; measured ~1e-6), so |mean k1| < 1e-4 and k3 ~ x^2 / 2 < 5e-9.
    Measured (AMD EPYC fp32, seed 0): k1 -7.5e-9, k3 1.8e-13 on both paths. The old code, which compared
    the learner's log-probs at T=0.7, top_p=0.9 with the teacher's raw ones: k1 0.1180, k3 0.0080.
    With two mini-batches, the second one's own post-update log-probs instead of the old pass's:
    k1 -0.0017, k3 0.0043."""
    from rlhf.run.metrics import read_metrics
    from rlhf.train import train

    cfg = compose("+experiment=tiny_smoke", "+teacher=engines", f"teacher.model={tiny_model_path}",
                  "algo.distill_coef=1.0", "reward.functions=[]", "trainer.eval_prompts=0", "trainer.steps=1",
                  "rollout.temperature=0.7", "rollout.top_p=0.9", "teacher.engines.kv_cache_gb=0.25",
                  *updates, f"trainer.output_dir={tmp_path / 'run'}")
    run = train(cfg)
    (m,) = [m for m in read_metrics(run / "metrics.jsonl") if "loss" in m]
    assert abs(m["distill/reverse_kl"]) < 1e-4
    assert 0 <= m["distill/reverse_kl_k3"] < 5e-9
    if updates:  # the first update moved the policy: measured ratio/max 1.61, ratio/min 0.57
        assert m["ratio/max"] > 1.1 and m["ratio/min"] < 0.9
