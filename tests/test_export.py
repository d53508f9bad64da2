"""HF export from a saved checkpoint through scripts/export.py; the folder loads in transformers
and (slow) in vLLM with log-probs matching transformers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlhf.config import AlgoConfig, LearnerConfig
from rlhf.types import TrainBatch

REPO = Path(__file__).resolve().parents[1]
# One fp32 rank: runs without ZeRO (rlhf/learner/ds_config.py zero_stage), so its checkpoint holds
# the module whole and no ZeRO partitions.
ONE_RANK = LearnerConfig(num_ranks=1, zero_stage=2, micro_batch_size=4, num_threads=2, lr=1e-2, timeout_s=600.0)


@pytest.fixture(scope="module")
def run(ray_session, tiny_model_path, tmp_path_factory):
    """A run folder holding one checkpoint of a tiny model after one update, and its weights."""
    from rlhf.learner import LearnerGroup

    group = LearnerGroup(ONE_RANK, AlgoConfig(), tiny_model_path, "float32", False, total_updates=10)
    try:
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, 49152, (4, 12), generator=g)
        ones = torch.ones_like(ids)
        group.train_step(TrainBatch(input_ids=ids, attention_mask=ones, response_mask=ones.float(),
                                    advantages=torch.tensor([1.0, -1.0, 0.5, -0.5])))
        root = tmp_path_factory.mktemp("run")
        state = {"step": 1, "config": {"model": {"name_or_path": tiny_model_path, "dtype": "float32"}}}
        group.save(root / "checkpoints", 1, state, keep_last=1)
        weights = group.full_state()
    finally:
        group.shutdown()
    return root, weights


def export(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "scripts" / "export.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=600, cwd=REPO)


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory):
    root, _ = run
    out = tmp_path_factory.mktemp("exports") / "hf"
    result = export(root, "--out", out)  # a run folder: the latest complete checkpoint is used
    assert result.returncode == 0, result.stderr[-2000:]
    assert "checkpoints/step-1" in result.stdout
    return out


def test_export_of_a_run_loads_in_transformers_with_the_trained_weights(run, exported, tiny_model_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, weights = run
    files = {p.name for p in exported.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= files
    assert not any(f.endswith((".pt", ".bin", ".pkl")) for f in files)  # safetensors only
    model = AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
    for (name, p), (_, b) in zip(model.named_parameters(), base.named_parameters()):
        torch.testing.assert_close(p.detach(), weights[name], atol=0, rtol=0)
        assert not torch.equal(p, b), f"{name} equals the base model: the update was not exported"
    tok = AutoTokenizer.from_pretrained(exported)
    assert tok("What is 3 + 5?")["input_ids"] == AutoTokenizer.from_pretrained(tiny_model_path)("What is 3 + 5?")["input_ids"]


def test_export_in_bfloat16(run, tmp_path):
    from transformers import AutoModelForCausalLM

    root, weights = run
    result = export(root / "checkpoints" / "step-1", "--out", tmp_path / "bf16", "--dtype", "bfloat16")
    assert result.returncode == 0, result.stderr[-2000:]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16")
    assert model.dtype == torch.bfloat16
    w = dict(model.named_parameters())["model.norm.weight"]
    torch.testing.assert_close(w.detach(), weights["model.norm.weight"].to(torch.bfloat16), atol=0, rtol=0)


def test_missing_checkpoint_path_is_named(tmp_path):
    result = export(tmp_path / "nope", "--out", tmp_path / "out")
    assert result.returncode != 0
    assert f"checkpoint path {tmp_path / 'nope'} does not exist" in result.stderr


def test_folder_without_complete_checkpoint_is_named(tmp_path):
    (tmp_path / "checkpoints" / ".tmp-step-3").mkdir(parents=True)
    result = export(tmp_path, "--out", tmp_path / "out")
    assert result.returncode != 0
    assert "no complete checkpoint" in result.stderr and str(tmp_path) in result.stderr


def test_tampered_checkpoint_is_refused_before_unpickling(run, tmp_path):
    import shutil

    root, _ = run
    copy = tmp_path / "step-1"
    shutil.copytree(root / "checkpoints" / "step-1", copy)
    (copy / "deepspeed" / "injected.pt").write_bytes(b"\x80\x04not ours")
    result = export(copy, "--out", tmp_path / "out")
    assert result.returncode != 0
    assert "unexpected files ['deepspeed/injected.pt']" in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_export_loads_in_vllm_with_logprobs_matching_transformers(ray_session, exported):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf.config import RolloutConfig
    from rollouts.group import EngineGroup

    ids = AutoTokenizer.from_pretrained(exported)("The capital of France is Paris, and 2 + 2 = 4.")["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32).eval()
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), dim=-1)
    want = [0.0] + [lp[t - 1, ids[t]].item() for t in range(1, len(ids))]
    engines = EngineGroup(RolloutConfig(num_engines=1, max_model_len=256, kv_cache_gb=0.25, timeout_s=600.0),
                          str(exported), dtype="float32")
    try:
        got = engines.probe(ids)[0]
    finally:
        engines.shutdown()
    # fp32 on both sides; vLLM's CPU kernels differ from torch by rounding only (~1e-6 measured
    # on this model in tests/test_rollout.py), a wrong or stale weight by > 1e-2.
    assert max(abs(a - b) for a, b in zip(got, want)) < 1e-4


def test_a_learner_without_zero_refuses_a_checkpoint_with_zero_partitions(run, tiny_model_path, tmp_path):
    import shutil

    from rlhf.learner import LearnerError, LearnerGroup

    root, _ = run
    saved = root / "checkpoints" / "step-1"
    assert not list(saved.rglob("*zero_pp_rank_*"))  # saved without ZeRO
    copy = tmp_path / "step-1"
    shutil.copytree(saved, copy)
    (copy / "deepspeed" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"")  # as ZeRO-2 writes
    group = LearnerGroup(ONE_RANK, AlgoConfig(), tiny_model_path, "float32", False, total_updates=10)
    try:
        # The rank's own check (the manifest check in LearnerGroup.load would refuse the extra file first).
        with pytest.raises(LearnerError, match="saved with ZeRO optimizer partitions, but this learner runs "
                           "without ZeRO .learner.zero_stage=2, learner.num_ranks=1"):
            group._call("load_checkpoint", "load_checkpoint", None, str(copy))
    finally:
        group.shutdown()
