"""The weight transport's pure parts and its wire: which transport a placement gets, the flat-bucket
layout, and a real gloo broadcast between two members over loopback (no Ray, vLLM or model)."""

from __future__ import annotations

import threading
import time
from dataclasses import replace

import msgspec
import pytest
import torch

from rlhf.cluster.node import NodeInfo
from rlhf.learner.sync import WeightTransportError, choose_transport, on_rank0_device
from rlhf.sync_wire import GroupFormationError, from_wire, join_group, open_listener, pack, plan_buckets
from rlhf.sync_wire import to_wire, views
from rlhf.types import BroadcastGroup

HEAD = NodeInfo(node_id="aaaa" * 14, ip="10.0.0.1", hostname="head")
OTHER = NodeInfo(node_id="bbbb" * 14, ip="10.0.0.2", hostname="worker-1")


def test_auto_is_files_on_one_node_and_broadcast_across_nodes():
    assert choose_transport("auto", HEAD, [HEAD, HEAD]) == "files"
    assert choose_transport("auto", HEAD, [HEAD, OTHER]) == "broadcast"
    assert choose_transport("broadcast", HEAD, [HEAD]) == "broadcast"  # allowed on one node too
    assert choose_transport("files", HEAD, [HEAD]) == "files"


def test_files_with_an_engine_on_another_node_is_refused_naming_engine_and_both_nodes():
    with pytest.raises(WeightTransportError) as err:
        choose_transport("files", HEAD, [HEAD, OTHER])
    msg = str(err.value)
    assert "rollout engine 1 runs on node worker-1 (10.0.0.2" in msg
    assert "learner rank 0 on node head (10.0.0.1" in msg
    assert "learner.sync_transport=broadcast" in msg


def test_unknown_transport_is_refused():
    with pytest.raises(WeightTransportError, match="learner.sync_transport='nfs' is not one of"):
        choose_transport("nfs", HEAD, [HEAD])


def test_bucket_offsets_are_16_byte_aligned_and_the_layout_survives_msgpack():
    (bucket,) = plan_buckets([[("a", (3,), torch.float32), ("b", (2, 2), torch.bfloat16),
                               ("c", (5,), torch.float32)]])
    # a: 3 x 4 = 12 bytes at 0 (next at 16); b: 4 x 2 = 8 bytes at 16 (next at 32);
    # c: 5 x 4 = 20 bytes at 32, padded to 32: the buffer is 64 bytes.
    assert [(s.offset, s.nbytes) for s in bucket.slots] == [(0, 12), (16, 8), (32, 20)]
    assert bucket.nbytes == 64
    # collective_rpc arguments are msgpack-encoded: the layout must come back equal.
    wire = msgspec.msgpack.decode(msgspec.msgpack.encode(to_wire([bucket])))
    assert from_wire(wire) == [bucket]


def test_pack_then_views_gives_back_every_tensor_and_a_mismatch_is_refused():
    tensors = {"a": torch.arange(3.0), "b": torch.tensor([[1.5, 2.0], [3.0, -4.0]], dtype=torch.bfloat16),
               "c": torch.linspace(0, 1, 5)}
    (bucket,) = plan_buckets([[(n, tuple(t.shape), t.dtype) for n, t in tensors.items()]])
    flat = pack(tensors, bucket, torch.device("cpu"))
    back = dict(views(flat, bucket))
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t)
    with pytest.raises(ValueError, match=r"weight c: \(4,\)"):
        pack({**tensors, "c": torch.zeros(4)}, bucket, torch.device("cpu"))


def test_gloo_broadcast_between_two_members_over_loopback():
    fd, port = open_listener("127.0.0.1")
    group = BroadcastGroup(backend="gloo", addr="127.0.0.1", port=port, world_size=2)
    sent = torch.arange(1000, dtype=torch.float32).view(torch.uint8)
    got = torch.zeros_like(sent)
    errors: list[BaseException] = []

    def receiver() -> None:
        try:
            member = join_group(group, 1, "127.0.0.1", timeout_s=60)
            member.broadcast(got)
            member.close()
        except BaseException as e:  # surfaced by the assert below
            errors.append(e)

    thread = threading.Thread(target=receiver)
    thread.start()
    member = join_group(group, 0, "127.0.0.1", timeout_s=60, listen_fd=fd)
    member.broadcast(sent.clone())
    thread.join(60)
    member.close()
    assert not errors and torch.equal(got, sent)


def _join_in_threads(group: BroadcastGroup, joiners: dict[int, str],
                     timeout_s: float) -> tuple[dict[int, BaseException], list[threading.Thread]]:
    """Group ranks in ``joiners`` join from threads, each through the address given; returns what
    each raised once its thread ends (nothing: it joined, and has left again), and the threads."""
    errors: dict[int, BaseException] = {}

    def join(rank: int, addr: str) -> None:
        try:
            join_group(replace(group, addr=addr), rank, "127.0.0.1", timeout_s).close()
        except BaseException as e:  # returned to the test
            errors[rank] = e

    threads = [threading.Thread(target=join, args=item) for item in joiners.items()]
    for t in threads:
        t.start()
    return errors, threads


def test_a_member_that_never_comes_is_named_at_the_join_within_its_timeout():
    # 1 learner rank + 2 engines of 1 worker: rollout engine 0 joins, engine 1 (group rank 2) never does.
    fd, port = open_listener("127.0.0.1")
    group = BroadcastGroup(backend="gloo", addr="127.0.0.1", port=port, world_size=3, workers_per_engine=1)
    errors, threads = _join_in_threads(group, {1: "127.0.0.1"}, timeout_s=3)
    start = time.monotonic()
    with pytest.raises(GroupFormationError, match=r"rollout engine 1 \(worker 0, group rank 2\) did not join "
                                                  r"within 3s"):
        join_group(group, 0, "127.0.0.1", timeout_s=3, listen_fd=fd)
    assert time.monotonic() - start < 3 + 5  # the timeout plus polling, not the transport's 600 s
    for t in threads:
        t.join(30)
    assert 1 in errors  # the member that came fails too (its group never formed), not hangs


def test_a_member_joining_through_a_wrong_address_is_named_at_the_join():
    # 1 learner rank + 1 engine of 2 workers; worker 1 (group rank 2) is given 127.0.0.2, where
    # nothing listens (the store is bound to 127.0.0.1 only): it cannot reach the store.
    fd, port = open_listener("127.0.0.1")
    group = BroadcastGroup(backend="gloo", addr="127.0.0.1", port=port, world_size=3, workers_per_engine=2)
    errors, threads = _join_in_threads(group, {1: "127.0.0.1", 2: "127.0.0.2"}, timeout_s=3)
    with pytest.raises(GroupFormationError, match=r"rollout engine 0 \(worker 1, group rank 2\) did not join"):
        join_group(group, 0, "127.0.0.1", timeout_s=3, listen_fd=fd)
    for t in threads:
        t.join(30)
    assert set(errors) == {1, 2}
    # The member itself says why, naming itself (the driver adds "rollout engine 0 failed in ...").
    assert isinstance(errors[2], GroupFormationError)
    assert str(errors[2]).startswith(f"weight group: rollout engine 0 (worker 1, group rank 2) cannot reach "
                                     f"learner rank 0's store at 127.0.0.2:{port} within 3s")


def test_the_join_proves_the_group_with_one_broadcast():
    # Both members return only after rank 0's (port, size) went through and matched: a third
    # process is not needed to see it, the join itself returns a formed group.
    fd, port = open_listener("127.0.0.1")
    group = BroadcastGroup(backend="gloo", addr="127.0.0.1", port=port, world_size=2)
    errors, threads = _join_in_threads(group, {1: "127.0.0.1"}, timeout_s=30)
    join_group(group, 0, "127.0.0.1", timeout_s=30, listen_fd=fd).close()
    for t in threads:
        t.join(30)
    assert errors == {}


# --- NCCL and shared devices ---------------------------------------------------------------------

GPU0 = replace(HEAD, gpu_ids=("0",))


def test_engines_on_rank0s_gpu_are_found_by_node_and_gpu_id():
    engines = [replace(HEAD, gpu_ids=("0",)), replace(HEAD, gpu_ids=("1",)),
               replace(OTHER, gpu_ids=("0",)),  # GPU 0 of another node: another device
               replace(HEAD, gpu_ids=("1", "0")), HEAD]  # a 2-GPU engine holding GPU 0; a CPU engine
    assert on_rank0_device(GPU0, engines) == [(0, ["0"]), (3, ["0"])]
    assert on_rank0_device(HEAD, engines) == []  # rank 0 on CPU shares no device


def test_nccl_broadcast_onto_rank0s_gpu_is_refused_naming_the_engine():
    same = [replace(HEAD, gpu_ids=("1",)), replace(HEAD, gpu_ids=("0",))]
    with pytest.raises(WeightTransportError, match=r"learner.sync_transport=broadcast with learner.backend=nccl: "
                                                   r"rollout engine 1 shares GPU 0 with learner rank 0 on node "
                                                   r"head .*learner.sync_transport=files \(or auto\)"):
        choose_transport("broadcast", GPU0, same, "nccl")
    # auto sends them files (every engine is on rank 0's node); gloo has no such limit.
    assert choose_transport("auto", GPU0, same, "nccl") == "files"
    assert choose_transport("broadcast", GPU0, same, "gloo") == "broadcast"
    # An engine elsewhere needs broadcast, so auto cannot route the clashing one to files.
    mixed = [replace(OTHER, gpu_ids=("0",)), replace(HEAD, gpu_ids=("0",))]
    with pytest.raises(WeightTransportError, match=r"rollout engine 1 shares GPU 0 .*engines \[0\] run on "
                                                   r"other nodes and need broadcast, so give engine 1 a GPU"):
        choose_transport("auto", GPU0, mixed, "nccl")


def test_colocated_fractional_gpus_with_nccl_broadcast_are_refused_before_start():
    # Bundle 0 holds rank 0 (0.5 GPU) and engine 0 (0.5 GPU): 0.5 + 0.5 <= 1, one GPU for both.
    from rlhf.config import Config, ConfigError
    from rlhf.validation import check_weight_sync

    cfg = Config()
    gpu = replace(cfg, learner=replace(cfg.learner, backend="nccl", sync_transport="broadcast", num_gpus_per_rank=0.5),
                  rollout=replace(cfg.rollout, num_gpus_per_engine=0.5))
    assert gpu.trainer.placement == "colocated"
    with pytest.raises(ConfigError, match=r"learner.sync_transport=broadcast with learner.backend=nccl: .*learner "
                                          r"rank 0 \(learner.num_gpus_per_rank=0.5\) and rollout engine 0 "
                                          r"\(rollout.num_gpus_per_engine=0.5\) on one GPU"):
        check_weight_sync(gpu)
    check_weight_sync(replace(gpu, learner=replace(gpu.learner, sync_transport="auto")))  # connect decides
    whole = replace(gpu, learner=replace(gpu.learner, num_gpus_per_rank=1.0),
                    rollout=replace(gpu.rollout, num_gpus_per_engine=1.0))
    check_weight_sync(whole)  # 1 + 1: a GPU each
    check_weight_sync(replace(gpu, trainer=replace(gpu.trainer, placement="separate")))
