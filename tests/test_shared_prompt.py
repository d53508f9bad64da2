"""Shared-prompt passes and token-budget micro-batches (rlhf/learner/packing.py): the plans and
layouts by hand, then the real learner (2 ranks, ZeRO-2 and ZeRO-3, DeepSpeed on gloo) against a
plain single-process torch loop that computes every row whole, as the learner did before."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from test_learner import ALGO, LOGPROB_ATOL, NORM_RTOL, PARAM_ATOL, TOTAL_STEPS, _hf_logprobs, learner_cfg
from test_learner import off_policy, plain_torch_updates

from rlhf.config import AlgoConfig, ConfigError, LearnerConfig
from rlhf.learner import LearnerGroup
from rlhf.learner.packing import PassPlan, layout, micro_batches, plan_micro_batches, plan_passes, prompt_groups
from rlhf.learner.packing import sliding_windows, split_to, startup_probe
from rlhf.learner.settings import check_settings
from rlhf.types import TrainBatch


def batch_of(rows: list[tuple[list[int], list[int]]]) -> TrainBatch:
    """Right-padded (with 0) rows of (prompt ids, completion ids)."""
    width = max(len(p) + len(c) for p, c in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    attention = torch.zeros_like(ids)
    response = torch.zeros(ids.shape)
    for i, (p, c) in enumerate(rows):
        ids[i, : len(p) + len(c)] = torch.tensor(p + c)
        attention[i, : len(p) + len(c)] = 1
        response[i, len(p) : len(p) + len(c)] = 1.0
    return TrainBatch(input_ids=ids, attention_mask=attention, response_mask=response,
                      advantages=torch.arange(len(rows), dtype=torch.float32),
                      old_logprobs=-ids.float() * response)


A, B, C = [1, 2, 3], [4, 5], [6, 7, 8, 9]
# Rows (prompt, lengths): 0 A 6, 1 B 5, 2 A 4, 3 B 7, 4 A 5, 5 C 6.
SIX = batch_of([(A, [10, 11, 12]), (B, [13, 14, 15]), (A, [16]), (B, [17, 18, 19, 20, 21]),
                (A, [22, 23]), (C, [24, 25])])


def plans(*args, **kw) -> list[list[int]]:
    return [p.tolist() for p in plan_micro_batches(*args, **kw)]


# --- plans ---------------------------------------------------------------------------------------


def test_rows_of_one_prompt_are_grouped():
    assert prompt_groups(SIX) == [[0, 2, 4], [1, 3], [5]]


def test_shared_plan_keeps_groups_adjacent_longest_first():
    # Groups by their longest row: B (7) [3, 1], A (6) [0, 4, 2], C (6) [5]; no budget: one batch.
    assert plans(SIX, 16, share=True) == [[3, 1, 0, 4, 2, 5]]


def test_shared_plan_cuts_by_the_token_budget():
    # Cost = distinct prompts x (longest prompt - 1) + rows x (longest completion + 1):
    # [3]: 1x1 + 1x6 = 7; [3, 1]: 1 + 2x6 = 13; [3, 1, 0]: 2x2 + 3x6 = 22 > 20, so close [3, 1].
    # [0, 4, 2]: 1x2 + 3x4 = 14; with 5: 2x3 + 4x4 = 22 > 20, so close; [5] alone.
    assert plans(SIX, 16, max_tokens=20, share=True) == [[3, 1], [0, 4, 2], [5]]


def test_unshared_plan_cuts_by_padded_rows_times_length():
    # Longest first: 3 (7), 0 (6), 5 (6), 1 (5), 4 (5), 2 (4). [3, 0]: 2x7 = 14, + 5: 21 > 20;
    # [5, 1, 4]: 3x6 = 18, + 2: 24 > 20; [2].
    assert plans(SIX, 16, max_tokens=20) == [[3, 0], [5, 1, 4], [2]]


def test_row_cap_still_applies():
    assert plans(SIX, 2, share=True) == [[3, 1], [0, 4], [2, 5]]


def test_a_row_longer_than_the_budget_runs_alone():
    assert plans(SIX, 16, max_tokens=3) == [[3], [0], [5], [1], [4], [2]]


def test_split_to_halves_the_largest_first():
    # [0, 4, 2] (3 rows) -> [0, 4], [2]; then [3, 1] and [0, 4] tie at 2 rows: the first splits.
    got = split_to([torch.tensor(p) for p in ([3, 1], [0, 4, 2], [5])], 5)
    assert [p.tolist() for p in got] == [[3], [1], [0, 4], [2], [5]]


def test_split_to_refuses_impossible_counts():
    three = [torch.tensor(p) for p in ([3, 1], [0, 4, 2], [5])]
    with pytest.raises(ValueError, match="6 rows cannot make 7 micro-batches"):
        split_to(three, 7)
    with pytest.raises(ValueError, match="cannot merge 3 micro-batches into 2"):
        split_to(three, 2)


def test_bad_row_cap_is_refused():
    with pytest.raises(ValueError, match="max_rows=0"):
        plan_micro_batches(SIX, 0)


# --- layouts -------------------------------------------------------------------------------------


def test_shared_layout_by_hand():
    batch = batch_of([([11, 12, 13], [14, 15]), ([11, 12, 13], [16]), ([21, 22], [23, 24, 25])])
    mb = layout(batch, torch.arange(3), share=True)
    assert mb.shared
    # The prefix pass: each distinct prompt minus its last token, once.
    assert mb.prefix_ids.tolist() == [[11, 12], [21, 0]]
    assert mb.prefix_mask.tolist() == [[1, 1], [1, 0]]
    assert mb.prefix_of.tolist() == [0, 0, 1]
    # The suffix pass: last prompt token + completion, at the positions continuing the prompt.
    assert mb.input_ids.tolist() == [[13, 14, 15, 0], [13, 16, 0, 0], [22, 23, 24, 25]]
    assert mb.position_ids.tolist() == [[2, 3, 4, 5], [2, 3, 4, 5], [1, 2, 3, 4]]
    assert mb.cols.tolist() == mb.position_ids.tolist()
    # Keys: the row's cached prompt (its padding masked), then its own suffix tokens.
    assert mb.attention_mask.tolist() == [[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0], [1, 0, 1, 1, 1, 1]]
    # Per-token fields move with the tokens; per-row fields stay.
    assert mb.view.response_mask.tolist() == [[0, 1, 1, 0], [0, 1, 0, 0], [0, 1, 1, 1]]
    assert mb.view.old_logprobs.tolist() == [[0, -14, -15, 0], [0, -16, 0, 0], [0, -23, -24, -25]]
    assert mb.view.advantages.tolist() == [0.0, 1.0, 2.0]
    assert mb.computed_tokens() == 2 * 2 + 3 * 4


def test_layout_is_two_pass_whenever_sharing_is_on():
    # Distinct prompts still run two passes (no saving, the same cost), so every rank's graph is alike.
    distinct = batch_of([([11, 12], [1]), ([21, 22], [2])])
    mb = layout(distinct, torch.arange(2), share=True)
    assert mb.shared and mb.prefix_ids.tolist() == [[11], [21]]
    assert not layout(SIX, torch.arange(6), share=False).shared


def test_pass_plan_takes_the_most_micro_batches_of_any_rank():
    # SIX's shared plan at 20 tokens has 3 micro-batches; rows 0-1 alone (A and B): 1.
    assert plan_passes([SIX, SIX.select(slice(0, 2))], 16, 20, share=True) == PassPlan(3, True)
    assert plan_passes([SIX], 16, 20, share=False) == PassPlan(3, False)


def test_a_one_token_prompt_turns_sharing_off_for_every_rank():
    # A one-token prompt leaves nothing to cache before its last token.
    one = batch_of([([11], [1, 2]), ([11], [3])])
    assert plan_passes([SIX, one], 16, 0, share=True) == PassPlan(1, False)


def test_micro_batches_split_to_the_agreed_count():
    got = micro_batches(SIX, 16, share=True, plan=PassPlan(2, True))
    assert [mb.rows.tolist() for mb in got] == [[3, 1, 0], [4, 2, 5]]
    assert all(mb.shared for mb in got)


# --- settings ------------------------------------------------------------------------------------


def test_negative_token_budget_is_refused():
    with pytest.raises(ConfigError, match="learner.max_tokens_per_micro_batch=-1 must be >= 0"):
        check_settings(LearnerConfig(max_tokens_per_micro_batch=-1), AlgoConfig(), "float32", 10)


def test_sharing_with_gradient_checkpointing_is_refused():
    with pytest.raises(ConfigError, match="learner.share_prompt=true .* learner.gradient_checkpointing=true"):
        check_settings(LearnerConfig(gradient_checkpointing=True), AlgoConfig(), "float32", 10)
    check_settings(LearnerConfig(gradient_checkpointing=True, share_prompt=False), AlgoConfig(), "float32", 10)


# --- the learner ---------------------------------------------------------------------------------

VOCAB = 49152
BUDGET = 40


def grouped_batch(seed: int) -> TrainBatch:
    """8 rows of up to 14 tokens. Rank 0 (rows 0-3): one 5-token prompt, lengths 9, 8, 8, 7.
    Rank 1 (rows 4-7): rows 4, 5 one 3-token prompt (lengths 14, 12), rows 6 and 7 prompts of 6
    and 4 tokens of their own (lengths 13, 10). Row 5 is dropped (weight 0)."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (5, 3, 6, 4)]
    which = [0, 0, 0, 0, 1, 1, 2, 3]
    lengths = [9, 8, 8, 7, 14, 12, 13, 10]
    rows = []
    for k, n in zip(which, lengths):
        p = prompts[k]
        rows.append((p, torch.randint(0, VOCAB, (n - len(p),), generator=g).tolist()))
    batch = batch_of(rows)
    weight = torch.ones(8)
    weight[5] = 0.0
    return replace(batch, advantages=torch.randn(8, generator=g), old_logprobs=None, sample_weight=weight)


def test_the_learner_batch_plans_as_derived():
    batch = grouped_batch(0)
    rank0, rank1 = batch.select(slice(0, 4)), batch.select(slice(4, 8))
    # Rank 0: 1 prompt x 4 + 4 rows x (9 - 5 + 1) = 24 <= 40: one micro-batch.
    assert plans(rank0, 4, max_tokens=BUDGET, share=True) == [[0, 1, 2, 3]]
    # Rank 1, groups by longest row: B [0, 1] (14), C [2] (13), D [3] (10). [0, 1]: 1x2 + 2x12 =
    # 26; + row 2: 2x5 + 3x12 = 46 > 40, close. [2, 3]: 2x5 + 2x8 = 26.
    assert plans(rank1, 4, max_tokens=BUDGET, share=True) == [[0, 1], [2, 3]]
    # The group agrees on 2 two-pass micro-batches; rank 0 halves its one.
    plan = plan_passes([rank0, rank1], 4, BUDGET, share=True)
    assert plan == PassPlan(2, True)
    got = micro_batches(rank0, 4, BUDGET, share=True, plan=plan)
    assert [mb.rows.tolist() for mb in got] == [[0, 1], [2, 3]]


@pytest.fixture(scope="module", params=[2, 3], ids=["zero2", "zero3"])
def shared_group(request, ray_session, tiny_model_path):
    cfg = learner_cfg(request.param, micro_batch_size=4, max_tokens_per_micro_batch=BUDGET, share_prompt=True)
    g = LearnerGroup(cfg, ALGO, tiny_model_path, "float32", False, TOTAL_STEPS)
    yield g
    g.shutdown()


@pytest.fixture(scope="module")
def shared_trained(shared_group, tiny_model_path):
    initial = shared_group.full_state()
    batches, metrics = [], []
    for step in range(2):
        batch = grouped_batch(seed=step)
        batch.ref_logprobs = shared_group.compute_ref_logprobs(batch)
        batch = off_policy(batch, shared_group.compute_logprobs(batch), seed=100 + step)
        batches.append(batch)
        metrics.append(shared_group.train_step(batch))
    reference = plain_torch_updates(tiny_model_path, shared_group.cfg, batches)
    return {"initial": initial, "after": shared_group.full_state(), "metrics": metrics, "reference": reference}


def test_shared_updates_match_whole_rows_in_plain_torch(shared_trained):
    # Same tolerances as tests/test_learner.py: only the summation order differs (the prompt's
    # gradient arrives summed over its rows by the cache gather's backward).
    ref = shared_trained["reference"]
    for name, want in ref["params"].items():
        moved = (want - shared_trained["initial"][name]).abs().max().item()
        assert moved > 1e-4, f"{name} did not move in the reference ({moved})"
        torch.testing.assert_close(shared_trained["after"][name], want, atol=PARAM_ATOL, rtol=0,
                                   msg=lambda m: f"{name}: {m}")
    for step, m in enumerate(shared_trained["metrics"]):
        assert m["grad_norm"] == pytest.approx(ref["grad_norm"][step], rel=NORM_RTOL)
        assert m["loss"] == pytest.approx(ref["loss"][step], rel=NORM_RTOL, abs=1e-6)
        assert m["skipped"] == 0.0


def test_shared_logprobs_equal_a_transformers_forward(shared_group, shared_trained, tiny_model_path):
    batch = grouped_batch(seed=7)
    got = shared_group.compute_logprobs(batch)
    want = _hf_logprobs(shared_group.full_state(), tiny_model_path, batch)
    valid = batch.response_mask.bool()
    torch.testing.assert_close(got.double()[valid], want[valid], atol=LOGPROB_ATOL, rtol=0)
    assert got[~valid].abs().max() == 0  # prompt and padding positions hold 0


# --- sliding-window attention --------------------------------------------------------------------

WINDOW = 4


def tiny_mistral(window: int | None = WINDOW):
    """A tiny random Mistral (the shape of tests/support/families.py) whose every layer slides a
    ``window``-token window; fp32, eager and sdpa agree, sdpa is transformers' default."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("mistral", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=2, num_key_value_heads=1, head_dim=32, vocab_size=VOCAB,
                                  sliding_window=window, tie_word_embeddings=False)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def _float64_logprobs(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    lp = torch.log_softmax(logits[:, :-1].double(), dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
    return torch.cat([torch.zeros(ids.shape[0], 1, dtype=lp.dtype), lp], dim=1)


@torch.no_grad()
def _shared_logprobs(model, batch: TrainBatch) -> torch.Tensor:
    """The learner's two passes (rank.py ``_logits``), in plain transformers: [B, L] at the rows'
    own positions, completion tokens only."""
    mb = layout(batch, torch.arange(batch.size), share=True)
    cache = model(input_ids=mb.prefix_ids, attention_mask=mb.prefix_mask, use_cache=True).past_key_values
    cache.reorder_cache(mb.prefix_of)
    logits = model(input_ids=mb.input_ids, attention_mask=mb.attention_mask, position_ids=mb.position_ids,
                   past_key_values=cache, use_cache=True).logits
    lp = _float64_logprobs(logits, mb.view.input_ids)
    out, real = torch.zeros(batch.input_ids.shape, dtype=lp.dtype), mb.view.response_mask > 0
    out[mb.rows[:, None].expand_as(mb.cols)[real], mb.cols[real]] = lp[real]
    return out


def test_sliding_windows_are_read_from_the_config():
    from transformers import AutoConfig

    assert sliding_windows(tiny_mistral().config) == [4, 4]  # no layer_types: every layer slides
    assert sliding_windows(tiny_mistral(None).config) == []
    # Gemma 2 alternates sliding and full layers; Qwen2 slides none unless use_sliding_window.
    assert sliding_windows(AutoConfig.for_model("gemma2", num_hidden_layers=2, sliding_window=16)) == [16]
    assert sliding_windows(AutoConfig.for_model("qwen2", num_hidden_layers=2)) == []


def test_the_shared_layout_drops_shorter_prompts_keys_on_a_sliding_window_model():
    # The proof behind refusing share_prompt for such models. The start-up probe: rows 0 and 1
    # share a 12-token prompt, row 2 has a 7-token one; every prompt is longer than the window.
    batch = startup_probe(VOCAB)
    model, unwindowed = tiny_mistral(), tiny_mistral(None)
    unwindowed.load_state_dict(model.state_dict())
    with torch.no_grad():
        whole = _float64_logprobs(model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits,
                                  batch.input_ids)
        full = _float64_logprobs(unwindowed(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits,
                                 batch.input_ids)
    got = _shared_logprobs(model, batch)
    real = batch.response_mask.bool()
    gap = [(got[i] - whole[i])[real[i]].abs().max().item() for i in range(3)]
    # transformers' whole-row forward does apply the window: without it the scores move (~0.2).
    assert (whole - full)[real].abs().max() > 0.05
    # The prefix block is 11 wide (12 - 1); a sliding layer caches its last 3 (window - 1)
    # slots. For the 12-token prompt those are its own last keys: exact up to summation order.
    assert max(gap[:2]) < 1e-5
    # Row 2's prompt fills slots 0-5; the cache keeps slots 8-10, padding: its keys are gone.
    assert gap[2] > 0.05


def test_sharing_on_a_window_shorter_than_the_longest_sequence_is_refused_by_name():
    from rlhf.config import Config
    from rlhf.validation import check_model

    cfg = Config()
    short = replace(cfg, rollout=replace(cfg.rollout, max_model_len=WINDOW))
    mistral = tiny_mistral().config
    with pytest.raises(ConfigError, match=r"learner.share_prompt=true: /m/tiny \(mistral\) has sliding-window "
                                          rf"attention with a 4-token window, shorter than rollout.max_model_len="
                                          rf"{cfg.rollout.max_model_len}.*learner.share_prompt=false"):
        check_model(cfg, mistral, "/m/tiny")
    check_model(short, mistral, "/m/tiny")  # every sequence fits the window: it never applies
    check_model(replace(cfg, learner=replace(cfg.learner, share_prompt=False)), mistral, "/m/tiny")
    check_model(cfg, tiny_mistral(None).config, "/m/tiny")


def test_the_learner_start_up_check_catches_a_sliding_window(ray_session, tmp_path):
    # The second line of defence, for a window no config key declares (remote code): the start-up
    # probe's ragged prompts (12 and 7 tokens) are longer than the 4-token window, so the shared
    # layout's gap on row 2 (~0.1, as above) is far over the fp32 tolerance of 1e-4.
    from rlhf.learner import LearnerError

    path = str(tmp_path / "mistral")
    tiny_mistral().save_pretrained(path)
    cfg = learner_cfg(2, num_ranks=1, share_prompt=True)
    with pytest.raises(LearnerError, match=rf"learner rank 0 failed in start-up: .*learner.share_prompt=true: "
                                           rf"{path} scores a prompt-cached completion differently"):
        LearnerGroup(cfg, ALGO, path, "float32", False, TOTAL_STEPS).shutdown()


def test_plan_mode_refuses_sharing_on_a_sliding_window_model(tmp_path):
    # plan=true reads the model's config too, so the refusal shows before a run would start.
    import subprocess
    import sys
    from pathlib import Path

    path = tmp_path / "mistral"
    tiny_mistral().config.save_pretrained(path)  # config.json is all a plan reads
    out = subprocess.run(
        [sys.executable, "-m", "rlhf.train", "plan=true", f"model.name_or_path={path}",
         f"trainer.output_dir={tmp_path}/run"],
        cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=180,
    )
    assert out.returncode == 2, out.stdout + out.stderr
    assert f"learner.share_prompt=true: {path} (mistral) has sliding-window attention with a 4-token window" in out.stderr
