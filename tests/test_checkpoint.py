"""Atomic checkpoints: visibility only when complete, pruning after success, manifest checks.

The learner writes its files through the ``write_model_state`` callback; here plain functions
write files into the folder they are given, so every failure point can be placed exactly. The
same flow with real DeepSpeed files is in tests/test_learner.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlhf.cluster.node import NodeInfo, RankFiles
from rlhf.learner.checkpoint import (
    CheckpointError,
    complete_checkpoints,
    latest_complete,
    read_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)


def writer(payload: bytes):
    def write(folder: Path) -> None:
        (folder / "deepspeed").mkdir()
        (folder / "deepspeed" / "mp_rank_00_model_states.pt").write_bytes(payload)

    return write


def test_save_publishes_a_complete_folder(tmp_path):
    path = save_checkpoint(tmp_path, 3, writer(b"weights"), {"step": 3, "rng": [1, 2]}, keep_last=2)
    assert path == tmp_path / "step-3"
    assert sorted(p.name for p in path.iterdir()) == ["COMPLETE", "client_state.json", "deepspeed"]
    assert read_checkpoint(path) == {"step": 3, "rng": [1, 2]}
    manifest = json.loads((path / "COMPLETE").read_text())
    assert manifest["step"] == 3 and set(manifest["files"]) == {"client_state.json",
                                                                "deepspeed/mp_rank_00_model_states.pt"}


def test_config_is_written_as_yaml(tmp_path):
    import yaml

    state = {"step": 1, "config": {"learner": {"lr": 1e-5}, "model": {"name_or_path": "x"}}}
    path = save_checkpoint(tmp_path, 1, writer(b"w"), state, keep_last=1)
    assert yaml.safe_load((path / "config.yaml").read_text()) == state["config"]


def test_keep_last_prunes_oldest_after_the_new_one_is_complete(tmp_path):
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, step, writer(b"w%d" % step), {"step": step}, keep_last=2)
    assert [s for s, _ in complete_checkpoints(tmp_path)] == [3, 4]
    assert latest_complete(tmp_path) == tmp_path / "step-4"


def test_crash_inside_the_write_keeps_the_previous_checkpoint(tmp_path):
    good = save_checkpoint(tmp_path, 1, writer(b"good"), {"step": 1}, keep_last=1)

    def crash(folder: Path) -> None:
        writer(b"half")(folder)
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, 2, crash, {"step": 2}, keep_last=1)
    assert [p.name for p in tmp_path.iterdir()] == ["step-1"]  # no step-2, no temp folder left
    assert latest_complete(tmp_path) == good
    assert read_checkpoint(good) == {"step": 1}
    assert (good / "deepspeed" / "mp_rank_00_model_states.pt").read_bytes() == b"good"


def test_leftover_temp_folder_of_a_killed_save_is_ignored_then_replaced(tmp_path):
    good = save_checkpoint(tmp_path, 1, writer(b"good"), {"step": 1}, keep_last=2)
    stale = tmp_path / ".tmp-step-2"  # a process killed mid-save leaves this, without a marker
    (stale / "deepspeed").mkdir(parents=True)
    (stale / "deepspeed" / "mp_rank_00_model_states.pt").write_bytes(b"partial")
    assert latest_complete(tmp_path) == good
    path = save_checkpoint(tmp_path, 2, writer(b"new"), {"step": 2}, keep_last=2)
    assert not stale.exists()
    assert (path / "deepspeed" / "mp_rank_00_model_states.pt").read_bytes() == b"new"


def test_folder_without_marker_is_not_a_checkpoint(tmp_path):
    (tmp_path / "step-7").mkdir()
    assert latest_complete(tmp_path) is None
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        read_checkpoint(tmp_path / "step-7")


def test_saving_the_same_step_again_replaces_it(tmp_path):
    save_checkpoint(tmp_path, 5, writer(b"first"), {"step": 5, "v": 1}, keep_last=2)
    path = save_checkpoint(tmp_path, 5, writer(b"second"), {"step": 5, "v": 2}, keep_last=2)
    assert read_checkpoint(path)["v"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-5"]


def test_unexpected_pickle_file_is_refused(tmp_path):
    path = save_checkpoint(tmp_path, 1, writer(b"w"), {"step": 1}, keep_last=1)
    (path / "deepspeed" / "extra.pt").write_bytes(b"\x80\x04not ours")
    with pytest.raises(CheckpointError, match=r"unexpected files \['deepspeed/extra.pt'\]"):
        read_checkpoint(path)


def test_altered_file_is_refused(tmp_path):
    path = save_checkpoint(tmp_path, 1, writer(b"abcd"), {"step": 1}, keep_last=1)
    (path / "deepspeed" / "mp_rank_00_model_states.pt").write_bytes(b"abce")  # same size
    with pytest.raises(CheckpointError, match="mp_rank_00_model_states.pt was changed"):
        verify_checkpoint(path)


def test_missing_file_is_refused(tmp_path):
    path = save_checkpoint(tmp_path, 1, writer(b"w"), {"step": 1}, keep_last=1)
    (path / "deepspeed" / "mp_rank_00_model_states.pt").unlink()
    with pytest.raises(CheckpointError, match="missing files"):
        verify_checkpoint(path)


def test_state_that_is_not_json_fails_before_writing(tmp_path):
    called = []
    with pytest.raises(TypeError):
        save_checkpoint(tmp_path, 1, lambda f: called.append(f), {"step": object()}, keep_last=1)
    assert called == [] and list(tmp_path.iterdir()) == []


def test_bad_keep_last_is_named(tmp_path):
    with pytest.raises(ValueError, match="trainer.keep_last=0"):
        save_checkpoint(tmp_path, 1, writer(b"w"), {}, keep_last=0)


def test_no_checkpoint_folder_at_all(tmp_path):
    assert latest_complete(tmp_path / "nothing") is None


NODE_B = NodeInfo(node_id="b" * 40, ip="10.0.0.2", hostname="node-b")


def two_rank_writer(rank1_lands_here: bool = True):
    """Rank 0 and rank 1 each write a shard and report it; rank 1's may land on its own node."""

    def write(folder: Path) -> list[RankFiles]:
        (folder / "deepspeed").mkdir()
        (folder / "deepspeed" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"r0")
        if rank1_lands_here:
            (folder / "deepspeed" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(b"r1")
        return [RankFiles(0, NODE_B, {"deepspeed/zero_pp_rank_0_mp_rank_00_optim_states.pt": 2}),
                RankFiles(1, NODE_B, {"deepspeed/zero_pp_rank_1_mp_rank_00_optim_states.pt": 2})]

    return write


def test_the_manifest_lists_every_ranks_shard(tmp_path):
    path = save_checkpoint(tmp_path, 1, two_rank_writer(), {"step": 1}, keep_last=2)
    assert verify_checkpoint(path)["ranks"] == {
        "0": ["deepspeed/zero_pp_rank_0_mp_rank_00_optim_states.pt"],
        "1": ["deepspeed/zero_pp_rank_1_mp_rank_00_optim_states.pt"]}


def test_a_shard_written_where_the_driver_cannot_see_it_is_never_complete(tmp_path):
    with pytest.raises(CheckpointError, match=r"learner rank 1 on node 10.0.0.2 \(host node-b\) wrote "
                                              r"deepspeed/zero_pp_rank_1_.* this driver does not see it"):
        save_checkpoint(tmp_path, 1, two_rank_writer(rank1_lands_here=False), {"step": 1}, keep_last=2)
    assert complete_checkpoints(tmp_path) == [] and not list(tmp_path.iterdir())


def test_a_checkpoint_missing_a_ranks_shard_is_refused_naming_the_rank(tmp_path):
    path = save_checkpoint(tmp_path, 1, two_rank_writer(), {"step": 1}, keep_last=2)
    (path / "deepspeed" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    with pytest.raises(CheckpointError, match=r"lacks the shard of learner rank\(s\) 1"):
        read_checkpoint(path)
