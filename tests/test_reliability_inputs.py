"""Bad config and data fail before anything starts; untrusted artefacts are refused without running
them (docs/reliability.md, points 8 and 9).

Point 8 runs ``python -m rlhf.train`` as a user would, with a private RAY_TMPDIR: an empty Ray
folder afterwards proves that no Ray (so no engine and no learner rank, so no model) was started.
Point 9 crafts pickles that would create a marker file if they were ever unpickled.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import datasets
import pytest
import torch

from rlhf.learner.checkpoint import CheckpointError, _manifest, check_pickles, read_checkpoint, save_checkpoint
from support.runs import TrainProcess, compose


# ----------------------------------------------------------------------------- point 8
def bad_inputs(tmp: Path) -> dict[str, tuple[list[str], str]]:
    """name -> (overrides, text the error must contain)."""
    (tmp / "questions.jsonl").write_text(json.dumps({"question": "What is 1 + 1?", "answer": "2"}) + "\n")
    datasets.Dataset.from_dict({"prompt": [], "answer": []}).to_parquet(tmp / "no_rows.parquet")
    (tmp / "corrupt.parquet").write_bytes(b"not a parquet file\x00\x01")
    files = ["data=files", "trainer.eval_prompts=0"]
    return {
        "unknown key": (["trainer.stepz=3"], "trainer.stepz"),
        "impossible batch arithmetic": (["learner.num_ranks=3"], "not divisible by learner.num_ranks=3"),
        "missing column": ([*files, f"data.path={tmp}/questions.jsonl"],
                           "data.prompt_column='prompt' is not a column; the columns are ['question', 'answer']"),
        # The datasets library refuses a file with no rows; its reason is terse but the file is named.
        "empty dataset": ([*files, f"data.path={tmp}/no_rows.parquet"],
                          "no_rows.parquet': cannot load it: ValueError: Instruction \"train\" corresponds to no data"),
        "unreadable file": ([*files, f"data.path={tmp}/corrupt.parquet"], "corrupt.parquet': cannot load it"),
        "missing file": ([*files, f"data.path={tmp}/nowhere.jsonl"], "nowhere.jsonl': no such file"),
    }


CASES = ["unknown key", "impossible batch arithmetic", "missing column", "empty dataset",
         "unreadable file", "missing file"]


@pytest.mark.parametrize("case", CASES)
def test_bad_config_or_data_fails_before_ray_or_any_model_starts(case, tiny_model_path, tmp_path):
    overrides, expected = bad_inputs(tmp_path)[case]
    run = TrainProcess(["+experiment=tiny_smoke", f"trainer.output_dir={tmp_path / 'run'}", *overrides],
                       tmp_path / "log.txt")
    try:
        code = run.wait(timeout_s=300)
        log = run.output()
        started_ray = list(Path(run.ray_tmp).iterdir())
    finally:
        assert run.close() == []
    assert code != 0
    assert expected in log, log[-3000:]
    assert started_ray == []  # ray.init never ran: no engine, no learner rank, no model loaded
    assert "RolloutEngine" not in log and "LearnerRank" not in log


# ----------------------------------------------------------------------------- point 9
class Payload:
    """Unpickling this opens ``marker`` for writing, i.e. creates the file: code ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def real_looking_checkpoint(root: Path) -> Path:
    def write(folder: Path) -> None:
        (folder / "deepspeed").mkdir()
        torch.save({"module": {"w": torch.ones(2)}}, folder / "deepspeed" / "mp_rank_00_model_states.pt")

    return save_checkpoint(root, 1, write, {"step": 1}, keep_last=1)


def test_the_payload_is_live(tmp_path):
    """The crafted file does run code under an unrestricted load (what DeepSpeed's torch.load does)."""
    marker = tmp_path / "PWNED"
    torch.save({"module": Payload(marker)}, tmp_path / "evil.pt")
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert marker.exists()


def test_a_pickle_added_to_a_checkpoint_is_refused_unrun(tmp_path):
    ckpt = real_looking_checkpoint(tmp_path / "ckpts")
    marker = tmp_path / "PWNED"
    torch.save({"module": Payload(marker)}, ckpt / "deepspeed" / "extra_states.pt")
    with pytest.raises(CheckpointError, match=r"unexpected files \['deepspeed/extra_states.pt'\]"):
        read_checkpoint(ckpt)
    assert not marker.exists()


@pytest.mark.parametrize("fmt", ["torch zip", "raw pickle"])
def test_a_swapped_pickle_with_a_rewritten_manifest_is_refused_unrun(tmp_path, fmt):
    """Whoever can write the folder can rewrite its manifest too; the weights-only test-load that
    LearnerGroup.load runs before DeepSpeed (check_pickles) still refuses the payload."""
    ckpt = real_looking_checkpoint(tmp_path / "ckpts")
    marker = tmp_path / "PWNED"
    target = ckpt / "deepspeed" / "mp_rank_00_model_states.pt"
    if fmt == "torch zip":
        torch.save({"module": Payload(marker)}, target)
    else:  # the legacy format torch.load(weights_only=False) also accepts
        target.write_bytes(pickle.dumps({"module": Payload(marker)}))
    (ckpt / "COMPLETE").write_text(json.dumps({"step": 1, "files": _manifest(ckpt)}))
    assert read_checkpoint(ckpt) == {"step": 1}  # the manifest matches: it proves integrity only
    with pytest.raises(CheckpointError, match="mp_rank_00_model_states.pt is not a plain tensor checkpoint"):
        check_pickles(ckpt)
    assert not marker.exists()


def test_resume_refuses_the_swapped_pickle_before_any_rank_reads_it(tmp_path):
    """LearnerGroup.load (the resume path) raises before its first rank call: a group with no
    ranks at all reaches the refusal, so no rank could have unpickled anything."""
    from rlhf.learner.group import LearnerGroup

    ckpt = real_looking_checkpoint(tmp_path / "ckpts")
    marker = tmp_path / "PWNED"
    torch.save({"module": Payload(marker)}, ckpt / "deepspeed" / "mp_rank_00_model_states.pt")
    (ckpt / "COMPLETE").write_text(json.dumps({"step": 1, "files": _manifest(ckpt)}))
    with pytest.raises(CheckpointError, match="not a plain tensor checkpoint"):
        LearnerGroup.__new__(LearnerGroup).load(ckpt)
    assert not marker.exists()


def remote_code_model(tiny_model_path: str, folder: Path, marker: Path) -> Path:
    """The tiny model with an auto_map pointing at custom code that creates ``marker`` on import."""
    import shutil

    shutil.copytree(tiny_model_path, folder)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w')\n")
    return folder


def test_trust_remote_code_is_off_by_default_and_custom_code_is_not_run(tiny_model_path, tmp_path):
    from rlhf.learner.rank import load_hf_model
    from rollouts.engine import llm_kwargs

    cfg = compose()  # the default run
    assert cfg.model.trust_remote_code is False
    # What the engines are built with (vllm.LLM(**llm_kwargs(...)), rollouts/engine.py).
    assert llm_kwargs(cfg.rollout, "m", cfg.model.dtype, cfg.model.trust_remote_code)["trust_remote_code"] is False
    marker = tmp_path / "PWNED"
    folder = remote_code_model(tiny_model_path, tmp_path / "custom", marker)
    model = load_hf_model(str(folder), "float32", cfg.model.trust_remote_code)  # the learner's loader
    assert type(model).__name__ == "LlamaForCausalLM"  # transformers' own class: auto_map ignored
    assert not marker.exists()
    # Turned on, the same folder's code runs: the flag is what kept it out.
    with pytest.raises(Exception):  # evil.py defines no classes; importing it already ran it
        load_hf_model(str(folder), "float32", True)
    assert marker.exists()


def test_only_safetensors_weights_are_loaded(tiny_model_path, tmp_path):
    """A folder whose weights are only a pickled pytorch_model.bin is refused by the learner's
    loader and by vLLM's loader as our engines configure it (load_format=safetensors)."""
    import shutil

    from rlhf.learner.rank import load_hf_model
    from rollouts.engine import llm_kwargs

    folder = tmp_path / "bin_only"
    shutil.copytree(tiny_model_path, folder)
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "PWNED"
    torch.save({"model.embed_tokens.weight": Payload(marker)}, folder / "pytorch_model.bin")
    with pytest.raises(OSError, match="safetensors"):
        load_hf_model(str(folder), "float32", False)

    from vllm.config import LoadConfig
    from vllm.model_executor.model_loader.default_loader import DefaultModelLoader

    cfg = compose("+experiment=tiny_smoke")
    load_format = llm_kwargs(cfg.rollout, str(folder), "float32")["load_format"]
    loader = DefaultModelLoader(LoadConfig(load_format=load_format))
    with pytest.raises(RuntimeError, match="Cannot find any model weights"):
        loader._prepare_weights(str(folder), None, None, fall_back_to_pt=True, allow_patterns_overrides=None)
    assert not marker.exists()
