"""The weight transport's pure parts and its wire: which transport a placement gets, the flat-bucket
layout, and a real gloo broadcast between two members over loopback (no Ray, vLLM or model)."""

from __future__ import annotations

import threading

import msgspec
import pytest
import torch

from rlhf.learner.transport import WeightTransportError, choose_transport
from rlhf.node import NodeInfo
from rlhf.types import BroadcastGroup
from rlhf.weight_wire import from_wire, join_group, open_listener, pack, plan_buckets, to_wire, views

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


def test_a_member_that_never_comes_fails_the_rendezvous_instead_of_hanging():
    fd, port = open_listener("127.0.0.1")
    group = BroadcastGroup(backend="gloo", addr="127.0.0.1", port=port, world_size=2)
    with pytest.raises(Exception, match="(?i)timeout|timed out"):
        join_group(group, 0, "127.0.0.1", timeout_s=2, listen_fd=fd)
