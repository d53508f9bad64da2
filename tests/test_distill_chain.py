"""The chained experiment end to end on the tiny model: teacher collection -> SFT -> GRPO.

The teacher is the loopback chat-completions server of tests/test_teacher.py (it answers
"What is A + B?" with "A + B = S", wrong when A is odd); the filter reward keeps the right answers.
SFT takes 2 updates, GRPO 1 step from the SFT export. A second run of the same command skips every
stage: no request reaches the teacher and no stage folder changes.
"""

from __future__ import annotations

import json
import secrets
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from rlhf.config.store import register_configs, to_object
from rlhf.distill.chain import STAGE_MARKER, SUMMARY_FILE, run_chain
from rlhf.run.metrics import read_metrics
from test_teacher import ChatServer

ROOT = Path(__file__).resolve().parents[1]
KEY_ENV = "TEST_CHAIN_TEACHER_KEY"
register_configs()

# 12 prompts; A is even in 8 of them, so the teacher is right (and its answer kept) 8 times.
PROMPTS = [{"prompt": f"What is {a} + {b}?", "answer": str(a + b)}
           for a, b in [(0, 1), (2, 3), (4, 1), (6, 2), (8, 0), (2, 2), (4, 4), (6, 1),
                        (1, 1), (3, 2), (5, 0), (7, 1)]]


def chain_config(run_dir: Path, server: ChatServer, prompts: Path):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return to_object(compose(config_name="config", overrides=[
            "+experiment=distill_then_grpo", "model=tiny", f"trainer.output_dir={run_dir}",
            f"teacher.base_url={server.base_url}", "teacher.model=teacher-x",
            f"teacher.api_key_env={KEY_ENV}", f"teacher.path={prompts}", "teacher.max_retries=1",
            "sft.batch_size=4", "sft.epochs=1", "sft.lr=1e-3", "sft.max_seq_len=256",
            "trainer.steps=1", "trainer.prompts_per_step=4", "trainer.eval_prompts=0",
            "trainer.tensorboard=false", "rollout.n=4", "rollout.max_new_tokens=16",
            "rollout.kv_cache_gb=0.25", "learner.micro_batch_size=8",
            "ledger.device_kind=cpu", "ledger.teacher_prompt_price_per_m=1.0",
            "ledger.teacher_completion_price_per_m=4.0", "ledger.closed_api_completion_price_per_m=0.6",
        ]))


@pytest.fixture(scope="module")
def chain(ray_session, tiny_model_path, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("chain")
    prompts = tmp / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in PROMPTS))
    server = ChatServer()
    mp = pytest.MonkeyPatch()
    mp.setenv(KEY_ENV, "sk-test-" + secrets.token_hex(8))
    try:
        cfg = chain_config(tmp / "run", server, prompts)
        summary = run_chain(cfg)
        requests_after_first = server.requests
        stamps = {p: p.stat().st_mtime_ns for p in (tmp / "run").rglob("*") if p.is_file()}
        again = run_chain(cfg)
        yield {"run": tmp / "run", "summary": summary, "again": again, "server": server,
               "first_requests": requests_after_first, "stamps": stamps}
    finally:
        mp.undo()
        server.close()


def test_every_stage_ran_and_handed_its_output_on(chain):
    run = chain["run"]
    for stage in ("collect", "sft", "grpo"):
        assert (run / stage / STAGE_MARKER).is_file(), stage
        assert json.loads((run / stage / "ledger.json").read_text())["totals"]["run_kind"] == stage
    dataset = [json.loads(line) for line in (run / "collect" / "teacher.jsonl").read_text().splitlines()]
    assert len(dataset) == 8 and all(int(r["prompt"].split()[2]) % 2 == 0 for r in dataset)
    assert chain["first_requests"] == 12
    # SFT: 8 examples in batches of 4 = 2 updates; its export is the GRPO stage's model.
    assert [m["step"] for m in read_metrics(run / "sft" / "metrics.jsonl")] == [1, 2]
    grpo_state = json.loads((run / "grpo" / "checkpoints" / "step-1" / "client_state.json").read_text())
    assert grpo_state["config"]["model"]["name_or_path"] == str(run / "sft" / "export")
    assert (run / "grpo" / "export" / "config.json").is_file()
    assert any("reward/mean" in m for m in read_metrics(run / "grpo" / "metrics.jsonl"))


def test_summary_adds_up_the_stage_ledgers(chain):
    run, summary = chain["run"], chain["summary"]
    costs = {s: json.loads((run / s / "ledger.json").read_text())["cost"] for s in ("collect", "sft", "grpo")}
    assert summary.total_usd == pytest.approx(sum(c["total_usd"] for c in costs.values()), rel=1e-12)
    # The teacher bill: each kept-or-not answer was bought once. Prompt "What is A + B?" = 5 words,
    # answer "A + B = S" = 5 words (the test server counts words): 12 x (5 x $1 + 5 x $4) / 1e6.
    assert summary.teacher_usd == pytest.approx(12 * 25 / 1e6, rel=1e-9)
    assert costs["collect"]["teacher_usd"] == pytest.approx(12 * 25 / 1e6, rel=1e-9)
    # Serving figures come from the GRPO stage (the only one that generated).
    assert summary.ratio is not None and summary.ratio == pytest.approx(costs["grpo"]["ratio"])
    assert summary.closed_api_usd_per_m == 0.6
    assert json.loads((run / SUMMARY_FILE).read_text())["total_usd"] == pytest.approx(summary.total_usd)


def test_rerun_skips_completed_stages(chain):
    run = chain["run"]
    assert chain["server"].requests == chain["first_requests"]  # nothing bought twice
    changed = [p for p, t in chain["stamps"].items() if p.stat().st_mtime_ns != t and p.name != SUMMARY_FILE]
    assert changed == []
    assert chain["again"] == chain["summary"]
    assert sorted(p.name for p in run.iterdir()) == ["collect", "grpo", "sft", SUMMARY_FILE]


# --- an open teacher on our engines: collect -> SFT -> on-policy distillation -> GRPO ---------------


@pytest.fixture(scope="module")
def open_chain(ray_session, tiny_model_path, tmp_path_factory):
    """The tiny model's perturbed copy as the open teacher; no filter (its random answers are never
    right), 6 prompts x 1 answer -> 6 SFT examples, OPD and GRPO 1 step each."""
    from tests.support.teachers import perturbed_copy

    tmp = tmp_path_factory.mktemp("open-chain")
    prompts = tmp / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in PROMPTS[:6]))
    teacher = perturbed_copy(tiny_model_path, tmp / "teacher", std=0.05)
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = to_object(compose(config_name="config", overrides=[
            "+experiment=opd_chain", "model=tiny", f"trainer.output_dir={tmp / 'run'}",
            f"teacher.model={teacher}", f"teacher.path={prompts}", "teacher.filter_reward=null",
            "teacher.max_tokens=8", "teacher.engines.kv_cache_gb=0.25",
            "sft.batch_size=3", "sft.epochs=1", "sft.lr=1e-3", "sft.max_seq_len=256",
            "trainer.steps=1", "trainer.prompts_per_step=4", "trainer.eval_prompts=0",
            "trainer.tensorboard=false", "rollout.n=4", "rollout.max_new_tokens=16",
            "rollout.kv_cache_gb=0.25", "learner.micro_batch_size=8", "ledger.device_kind=cpu",
        ]))
    summary = run_chain(cfg)
    again = run_chain(cfg)
    return {"run": tmp / "run", "summary": summary, "again": again}


def test_open_teacher_chain_runs_every_stage_and_resumes(open_chain):
    run = open_chain["run"]
    for stage in ("collect", "sft", "opd", "grpo"):
        assert (run / stage / STAGE_MARKER).is_file(), stage
        assert json.loads((run / stage / "ledger.json").read_text())["totals"]["run_kind"] == stage
    # The engines answered every prompt once: 6 rows, 2 SFT updates of 3.
    assert len((run / "collect" / "teacher.jsonl").read_text().splitlines()) == 6
    assert [m["step"] for m in read_metrics(run / "sft" / "metrics.jsonl")] == [1, 2]
    # OPD starts from the SFT export and distils; GRPO starts from the OPD export and does not.
    opd = json.loads((run / "opd" / "checkpoints" / "step-1" / "client_state.json").read_text())["config"]
    grpo = json.loads((run / "grpo" / "checkpoints" / "step-1" / "client_state.json").read_text())["config"]
    assert opd["model"]["name_or_path"] == str(run / "sft" / "export") and opd["algo"]["distill_coef"] == 1.0
    assert grpo["model"]["name_or_path"] == str(run / "opd" / "export") and grpo["algo"]["distill_coef"] == 0.0
    (step,) = [m for m in read_metrics(run / "opd" / "metrics.jsonl") if "loss" in m]
    assert step["distill/teacher_tokens"] > 0 and "distill/reverse_kl" in step
    assert not any("distill/reverse_kl" in m for m in read_metrics(run / "grpo" / "metrics.jsonl"))
    # The summary counts the open teacher: tokens scored are the OPD ledger's, engine-hours the
    # collect and OPD stages' together.
    ledgers = {s: json.loads((run / s / "ledger.json").read_text())["totals"] for s in ("collect", "opd")}
    summary = open_chain["summary"]
    assert summary.teacher_tokens_scored == ledgers["opd"]["teacher_tokens_scored"] == int(step["distill/teacher_tokens"])
    assert summary.teacher_engine_hours == pytest.approx(
        ledgers["collect"]["teacher_engine_hours"] + ledgers["opd"]["teacher_engine_hours"], rel=1e-9)
    assert ledgers["collect"]["tokens_generated"] > 0
    assert open_chain["again"] == summary  # the rerun skipped every stage
