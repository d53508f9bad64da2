"""The training loop end to end on a simulated 3-node Ray cluster (tests/support/sim_cluster.py),
trainer.placement=separate: learner ranks and the engine on different nodes, weights by broadcast,
and a distillation teacher on a node of its own. The scenario runs in a fresh process (the
session's own Ray is already joined here)."""

from __future__ import annotations

import math
import re

import pytest

from support.sim_cluster import run_scenario


@pytest.fixture(scope="module")
def got():
    return run_scenario("train_separate_three_nodes", timeout_s=900)


def test_ranks_and_engine_run_on_three_different_nodes(got):
    # 2-CPU ranks fill the two 2-CPU nodes (one each); the 1-CPU engine has only the third node left.
    ranks = [n["node_id"] for n in got["placement"]["learner_ranks"]]
    engines = [n["node_id"] for n in got["placement"]["engines"]]
    assert got["placement"]["placement"] == "separate"
    assert len(set(ranks)) == 2 and len(engines) == 1 and engines[0] not in ranks


def test_files_across_nodes_is_refused_by_name_before_any_step(got):
    assert got["files_error"] is not None
    assert "learner.sync_transport=files" in got["files_error"] and "rollout engine 0" in got["files_error"]
    # Refused once the placement groups were reserved (their nodes are known), before any actor
    # started (no engine or rank wrote a log), so no step was logged and no checkpoint written.
    assert got["files_run_actor_logs"] == []
    assert not got["files_run_metrics"] and not got["files_run_checkpoints"]


def test_weights_reach_the_engine_by_broadcast_and_the_probe_agrees(got):
    # auto resolves to broadcast when an engine is away from rank 0: nothing was written under sync_dir.
    assert got["placement"]["weight_transport"] == "broadcast"
    assert got["sync_dir_after"] == []
    assert got["transport_metric"] == [1.0, 1.0, 1.0]
    assert all(0 <= g <= got["probe_tolerance"] for g in got["probe_gaps"])


def test_checkpoint_covers_every_rank_export_is_written_and_the_run_resumes(got):
    assert got["complete"] and got["export"]
    assert got["manifest_ranks"] == [0, 1]
    # Steps 1-2, then the resumed run's step 3 (its first sync after loading step-2 is not a step).
    assert got["steps"] == [1, 2, 3]


def test_a_learner_rank_killed_mid_step_fails_the_run_naming_it_and_keeps_the_checkpoint():
    got = run_scenario("rank_killed_mid_step", timeout_s=900)
    assert got["killed"] == 1
    # The first rank to fail is named with the stage (the killed one dies; its partner may fail
    # first in the broken collective): well before learner.timeout_s=600 would have fired.
    assert re.search(r"LearnerError: learner rank [01] (died during|failed in) train_step", got["error"]), got["error"]
    assert "did not finish" not in got["error"]
    # trainer.max_restarts=0: no restart, and the error says which key would have allowed one.
    assert "trainer.max_restarts=0" in got["error"], got["error"]
    # Step 1's checkpoint was complete before the kill and still verifies; step 2 was never saved.
    assert got["complete"] == [1] and got["step1_state_step"] == 1


@pytest.mark.slow  # a second simulated-cluster run with a learner restart
def test_a_learner_rank_killed_on_one_of_two_nodes_restarts_the_group_and_the_run_finishes():
    got = run_scenario("rank_restarted_two_nodes", timeout_s=900)
    assert got["error"] is None, got["error"]
    ranks = [n["node_id"] for n in got["placement"]["learner_ranks"]]
    assert len(set(ranks)) == 2 and got["killed"] == 1
    # Killed in step 2's train_step after step 1's checkpoint: step 2, redone, carries the restart.
    assert got["steps"] == [1, 2, 3] and got["restarts"] == [0.0, 1.0, 1.0]
    assert got["seconds_lost"][0] == 0 and got["seconds_lost"][1] > 0
    # The new ranks formed a new broadcast group with the engine on the third node; every sync probed clean.
    assert got["transport_metric"] == [1.0, 1.0, 1.0]
    assert all(0 <= g <= 1e-3 for g in got["probe_gaps"])
    assert got["complete"] == [2, 3]  # keep_last=2


def test_async_rollouts_overlap_across_two_nodes():
    got = run_scenario("train_async_two_nodes", timeout_s=900)
    assert len(got["rank_nodes"]) == 1 and got["engine_nodes"][0] != got["rank_nodes"][0]
    assert got["transport"] == "broadcast"
    # Batch 1 from the start weights (staleness 0), then one update behind, never more.
    assert got["staleness"] == [0.0, 1.0, 1.0]
    assert all(0 <= g <= 1e-3 for g in got["probe_gaps"])  # each sync landed on the other node
    span = {(s["phase"], s["step"]): s for s in got["spans"]}
    for step in (1, 2):  # the engine's node generated batch step + 1 while the rank trained step
        assert span[("generate", step + 1)]["start"] < span[("train", step)]["end"]
        assert span[("generate", step + 1)]["end"] <= span[("sync", step)]["start"]


def test_a_teacher_on_its_own_node_scores_what_another_node_generated():
    got = run_scenario("opd_separate_three_nodes", timeout_s=900)
    # Three 1-CPU nodes and three 1-CPU groups (rank, policy engine, teacher engine): one each.
    nodes = got["rank_nodes"] + got["engine_nodes"] + got["teacher_nodes"]
    assert len(nodes) == 3 and len(set(nodes)) == 3
    # tiny_smoke: 4 prompts x 4 samples a step; the teacher scores each sequence's prompt and
    # completion, and a chat-templated prompt alone is over 16 tokens: more than 16 x 16 = 256 a step.
    assert len(got["teacher_tokens"]) == 2 and all(t > 256 for t in got["teacher_tokens"])
    assert all(math.isfinite(kl) for kl in got["reverse_kl"])
    ledger = got["ledger"]
    assert ledger["run_kind"] == "opd"
    assert ledger["teacher_tokens_scored"] == sum(int(t) for t in got["teacher_tokens"])
    assert ledger["teacher_engine_hours"] > 0 and ledger["teacher_scoring_s"] > 0
