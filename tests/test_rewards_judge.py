"""The ``judge`` reward (rewards/builtin/judge.py): parsing and arithmetic by hand, then the real
reward against a scripted judge on 127.0.0.1 (tests/support/judge_server.py) that answers, fails
with 429/500, replies garbage or late; bad input named at construction; the runner's usage metrics,
agreement and the ledger's judge line. The same reward against vLLM's real server is at the end.
"""

from __future__ import annotations

import json
import math
import re
import secrets
from pathlib import Path

import pytest

from rlhf.config import ConfigError, LedgerConfig, RewardConfig, RewardFnConfig
from rlhf.run.ledger import CostLedger
from rewards.agreement import agreement
from rewards.builtin.judge import CACHE_FILE, SAMPLES_FILE, Judge
from rewards.builtin.judge_parse import (inconsistent, normalise, pairwise_reward, parse_score, parse_verdict,
                                         weighted_mean)
from rewards.builtin.judge_rubric import load_rubric, placeholders
from rewards.runner import RewardRunner
from tests.support.judge_server import USAGE, JudgeServer

KEY_ENV = "TEST_JUDGE_KEY"


# --- pure functions, by hand --------------------------------------------------------------------


def test_score_is_the_last_one_stated():
    assert parse_score("Score: 3. On reflection, score = 7") == 7.0
    assert parse_score("**Score:** 4.5") == 4.5
    assert parse_score("I give it a seven") is None
    assert parse_score('{"score": 6}', structured=True) == 6.0
    assert parse_score('{"score": "6"}', structured=True) is None  # a string is not a number
    assert parse_score('{"score": true}', structured=True) is None
    assert parse_score("Score: 6", structured=True) is None  # structured replies are JSON only


def test_normalise_maps_the_scale_and_refuses_outside_it():
    # scale [1, 10]: 1 -> 0, 10 -> 1, 4 -> (4 - 1) / 9 = 1/3
    assert normalise(1, 1, 10) == 0.0 and normalise(10, 1, 10) == 1.0
    assert normalise(4, 1, 10) == pytest.approx(1 / 3, abs=1e-12)
    assert normalise(0, 1, 10) is None and normalise(11, 1, 10) is None and normalise(None, 1, 10) is None


def test_verdicts():
    assert parse_verdict("A is terse; B explains. Verdict: B") == "B"
    assert parse_verdict("verdict: TIE") == "tie"
    assert parse_verdict("Verdict: [A]") == "A"
    assert parse_verdict("B is better") is None
    assert parse_verdict('{"verdict": "A"}', structured=True) == "A"
    assert parse_verdict('{"verdict": "C"}', structured=True) is None


def test_pairwise_arithmetic_and_position_bias():
    # First argument: the verdict with the completion as A; second: with the completion as B.
    assert pairwise_reward("A", "B") == 1.0  # wins in both orders
    assert pairwise_reward("B", "A") == 0.0  # loses in both
    assert pairwise_reward("tie", "tie") == 0.5
    # Judge says "A" both times: the completion wins as A (1) and loses as B (0): (1 + 0) / 2 = 0.5,
    # and the pair is inconsistent (the verdict followed the position).
    assert pairwise_reward("A", "A") == 0.5 and inconsistent("A", "A")
    assert pairwise_reward("B", "B") == 0.5 and inconsistent("B", "B")
    assert pairwise_reward("A", "tie") == 0.75 and inconsistent("A", "tie")  # (1 + 0.5) / 2
    assert not inconsistent("A", "B") and not inconsistent("tie", "tie")
    assert pairwise_reward("A", None) is None and not inconsistent(None, "B")


def test_criteria_weighted_mean():
    assert weighted_mean([1.0, 0.25], [1.0, 3.0]) == pytest.approx(0.4375)  # (1 + 0.75) / 4
    assert weighted_mean([1.0, None], [1.0, 3.0]) is None


def test_agreement_by_hand():
    # Pairs scored by both: (1, 1) agree, (0, 1) disagree, (0.8, 0.6) agree (both pass); None skipped.
    got = agreement([1.0, 0.0, 0.8, None], [1.0, 1.0, 0.6, 0.0])
    assert got.pairs == 3 and got.agree == pytest.approx(2 / 3)
    # xs = [1, 0, 0.8] (mean 0.6), ys = [1, 1, 0.6] (mean 13/15): sxy = (0.4*2 - 0.6*2 - 0.2*4) / 15
    # = -0.08; sxx = 0.16+0.36+0.04 = 0.56; syy = (4+4+16)/225 -> r = -0.08 / sqrt(0.0597) = -0.327
    assert got.pearson == pytest.approx(-0.08 / math.sqrt(0.56 * 24 / 225), rel=1e-12)
    assert math.isnan(agreement([1.0, 1.0], [0.0, 1.0]).pearson)  # one side constant: undefined


def test_placeholders_and_literal_braces(tmp_path):
    text = 'Q: {prompt}\nA: {completion}\nReply as {"score": N}. Again: {prompt}'
    assert placeholders(text) == ["prompt", "completion"]
    path = tmp_path / "r.txt"
    path.write_text(text)
    rubric = load_rubric(str(path), "judge.rubric", ["prompt", "completion"])
    assert rubric.render({"prompt": "2+2", "completion": "4"}) == 'Q: 2+2\nA: 4\nReply as {"score": N}. Again: 2+2'


def test_unknown_placeholder_is_named_with_file_and_allowed(tmp_path):
    path = tmp_path / "r.txt"
    path.write_text("{prompt} {completion} {colour}")
    with pytest.raises(ConfigError, match=re.escape(f"{path} uses placeholder {{colour}}") + ".*allowed here.*{answer}"):
        load_rubric(str(path), "judge.rubric", ["prompt", "completion", "answer"])


def test_shipped_rubrics_load_by_name():
    for name, allowed in [("support_helpfulness", ["prompt", "completion"]),
                          ("support_pairwise", ["prompt", "first", "second"]),
                          ("arithmetic_reference", ["prompt", "completion", "answer"])]:
        assert load_rubric(name, "judge.rubric", allowed).slots
    with pytest.raises(ConfigError, match=r"judge.rubric='nope': no such file.*arithmetic_reference"):
        load_rubric("nope", "judge.rubric", None)


# --- against a scripted judge on 127.0.0.1 ----------------------------------------------------


def pointwise_judge(text: str):
    """The answer decides: 'good' 9, 'bad' 2, 'garbage' no score, 'over' 11 (off scale), 'down' 500,
    'slow' answers after the client's timeout; 'flaky' gets one 429 first (JudgeServer)."""
    answer = text.split("Answer: ", 1)[1]
    if "down" in answer:
        return ("status", 500)
    if "slow" in answer:
        return ("slow", 3.0, "Score: 5")
    if "garbage" in answer:
        return "I cannot decide."
    if "over" in answer:
        return "Score: 11"
    return "Fine. Score: 9" if "good" in answer else "Poor. Score: 2"


@pytest.fixture
def key(monkeypatch) -> str:
    key = "sk-judge-" + secrets.token_hex(12)
    monkeypatch.setenv(KEY_ENV, key)
    return key


@pytest.fixture
def server(key):
    s = JudgeServer(key, pointwise_judge)
    yield s
    s.close()


@pytest.fixture
def rubric(tmp_path) -> str:
    path = tmp_path / "rubric.txt"
    path.write_text("Grade 1-10.\nQuestion: {prompt}\nAnswer: {completion}")
    return str(path)


def judge(server: JudgeServer, rubric: str | None, run_dir, **kw) -> Judge:
    settings = dict(model="judge-x", rubric=rubric, base_url=server.base_url, api_key_env=KEY_ENV,
                    max_retries=1, backoff_base_s=0.01, backoff_max_s=0.02, timeout_s=5.0, run_dir=run_dir,
                    columns=["answer"])
    return Judge(**{**settings, **kw})


def test_pointwise_scores_failures_are_counted_nones(server, rubric, tmp_path):
    j = judge(server, rubric, tmp_path, timeout_s=1.5)  # 'slow' answers after 3 s: both tries time out
    completions = ["good", "bad", "garbage", "over", "down", "slow", "good flaky"]
    got = j(["q"] * 7, completions, answer=["1"] * 7)
    # 9 on [1, 10] -> 8/9; 2 -> 1/9; garbage and 11 unparsable; 500 twice and slow twice: errors.
    assert got[:2] == [pytest.approx(8 / 9, abs=1e-12), pytest.approx(1 / 9, abs=1e-12)]
    assert got[2:6] == [None, None, None, None]
    assert got[6] == pytest.approx(8 / 9, abs=1e-12)  # answered after one 429 and a retry
    u = j.usage()
    assert (u["requests"], u["cache_hits"], u["unparsable"], u["errors"]) == (7, 0, 2, 2)
    # 5 answers came back (good, bad, garbage, over, flaky's second try), 11 + 3 tokens each.
    assert (u["prompt_tokens"], u["completion_tokens"]) == (5 * USAGE[0], 5 * USAGE[1])
    # At the server: 7 first tries + retries of down, slow and flaky (max_retries=1) = 10 posts.
    assert server.requests == 10
    assert all(p["temperature"] == 0.0 and p["model"] == "judge-x" for p in server.posts)


def test_rerun_is_served_from_the_cache_with_zero_requests(server, rubric, tmp_path, key):
    completions = ["good", "bad", "garbage"]
    first = judge(server, rubric, tmp_path)(["q"] * 3, completions, answer=["1"] * 3)
    assert server.requests == 3
    again = judge(server, rubric, tmp_path)  # a resumed run: a new reward on the same run folder
    assert again(["q"] * 3, completions, answer=["1"] * 3) == first
    assert server.requests == 3  # zero new requests
    u = again.usage()
    assert (u["requests"], u["cache_hits"], u["prompt_tokens"], u["unparsable"]) == (0, 3, 0, 1)
    # A different prompt is a different question: asked, not served from the cache.
    again(["q2"], ["good"], answer=["1"])
    assert server.requests == 4
    # The key is in no file the judge wrote; the samples log has the first 2 of each call.
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert key not in path.read_text(errors="replace"), path
    samples = [json.loads(line) for line in (tmp_path / SAMPLES_FILE).read_text().splitlines()]
    assert [(s["call"], s["completion"]) for s in samples] == [(1, "good"), (1, "bad"), (1, "good"), (1, "bad"),
                                                               (2, "good")]
    assert samples[0]["replies"][0]["reply"] == "Fine. Score: 9" and samples[0]["score"] == pytest.approx(8 / 9)
    assert (tmp_path / CACHE_FILE).exists()


def verdict_judge(text: str) -> str:
    """Prefers the text saying 'good' whichever place it is in; 'biased' prompts always get A."""
    if "biased" in text:
        return "Verdict: A"
    a = text.split("A: ", 1)[1].split("\nB: ", 1)[0]
    b = text.split("\nB: ", 1)[1]
    if ("good" in a) == ("good" in b):
        return "Verdict: tie"
    return "Verdict: A" if "good" in a else "Verdict: B"


def test_pairwise_asks_both_orders_and_cancels_position_bias(key, tmp_path):
    server = JudgeServer(key, verdict_judge)
    try:
        path = tmp_path / "pair.txt"
        path.write_text("Question: {prompt}\nA: {first}\nB: {second}")
        j = judge(server, str(path), tmp_path, mode="pairwise", columns=["reference"])
        got = j(["fair", "fair", "fair", "biased"], ["good", "meh", "good too", "meh"],
                reference=["meh", "good", "good", "good"])
        # good vs meh: A then B -> 1; meh vs good: loses both -> 0; both good: tie twice -> 0.5;
        # biased judge says A both times -> (1 + 0) / 2 = 0.5, one inconsistent pair.
        assert got == [1.0, 0.0, 0.5, 0.5]
        # 8 questions, 6 distinct: sample 1's two orders (A=meh B=good, A=good B=meh) are sample 0's,
        # so they are asked once each and answered twice.
        u = j.usage()
        assert (u["inconsistent_pairs"], u["requests"], u["cache_hits"]) == (1, 6, 2)
        asked = {p["messages"][0]["content"] for p in server.posts}  # they arrive in any order
        assert {"Question: fair\nA: good\nB: meh", "Question: fair\nA: meh\nB: good"} <= asked
    finally:
        server.close()


def test_criteria_combine_by_weight(key, tmp_path):
    server = JudgeServer(key, lambda text: "Score: 10" if text.startswith("R1") else "Score: 4")
    try:
        for name, text in [("r1.txt", "R1 {completion}"), ("r2.txt", "R2 {completion}")]:
            (tmp_path / name).write_text(text)
        j = judge(server, None, tmp_path, criteria=[
            {"name": "right", "rubric": str(tmp_path / "r1.txt"), "weight": 1.0},
            {"name": "tone", "rubric": str(tmp_path / "r2.txt"), "weight": 3.0}])
        # right: 10 -> 1; tone: 4 -> 3/9; (1 * 1 + 3 * 1/3) / 4 = 0.5
        assert j(["q"], ["x"], answer=["1"]) == [pytest.approx(0.5, abs=1e-12)]
    finally:
        server.close()


def test_structured_asks_for_the_json_schema(key, tmp_path, rubric):
    server = JudgeServer(key, lambda text: '{"score": 7}')
    try:
        j = judge(server, rubric, tmp_path, structured=True)
        assert j(["q"], ["x"], answer=["1"]) == [pytest.approx(6 / 9)]
        fmt = server.posts[0]["response_format"]
        assert fmt["type"] == "json_schema" and fmt["json_schema"]["schema"]["required"] == ["score"]
    finally:
        server.close()


# --- bad input, named at construction -----------------------------------------------------------


def test_bad_input_is_named_before_any_request(server, rubric, tmp_path, monkeypatch, key):
    bad = tmp_path / "bad.txt"
    bad.write_text("{prompt} {completion} {colour}")
    with pytest.raises(ConfigError, match=r"uses placeholder \{colour\}.*allowed here"):
        judge(server, str(bad), tmp_path)
    with pytest.raises(ConfigError, match=r"judge.model='other': http://127.0.0.1:\d+/v1 serves \['judge-x'\], not 'other'"):
        judge(server, rubric, tmp_path, model="other")
    with pytest.raises(ConfigError, match=r"judge.base_url='http://127.0.0.1:9/v1': the endpoint is unreachable"):
        judge(server, rubric, tmp_path, base_url="http://127.0.0.1:9/v1")
    with pytest.raises(ConfigError, match=r"judge.mode='both': not one of \['pointwise', 'pairwise'\]"):
        judge(server, rubric, tmp_path, mode="both")
    with pytest.raises(ConfigError, match=r"judge.scale=\(5.0, 1.0\): must be \[lo, hi\] with lo < hi"):
        judge(server, rubric, tmp_path, scale=[5, 1])
    with pytest.raises(ConfigError, match=r"give exactly one of rubric"):
        judge(server, rubric, tmp_path, criteria=[{"rubric": rubric}])
    with pytest.raises(ConfigError, match=r"judge.reference_column='reference': pairwise mode"):
        judge(server, rubric, tmp_path, mode="pairwise")
    with pytest.raises(ConfigError, match=r"judge.backend='api': not one of"):
        judge(server, rubric, tmp_path, backend="api")
    monkeypatch.setattr(server, "key", "a-different-key")
    with pytest.raises(ConfigError, match=r"answered HTTP 401") as wrong_key:
        judge(server, rubric, tmp_path)
    assert key not in str(wrong_key.value)  # the server quoted nothing, but the message is redacted anyway
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(ConfigError, match=rf"judge.api_key_env='{KEY_ENV}': the environment variable is not set"):
        judge(server, rubric, tmp_path)
    assert server.requests == 0


# --- the runner: context, usage metrics, agreement; the ledger's judge line ----------------------


def runner(server: JudgeServer, rubric: str, run_dir, **reward) -> RewardRunner:
    kwargs = dict(model="judge-x", rubric=rubric, base_url=server.base_url, api_key_env=KEY_ENV,
                  max_retries=0, timeout_s=5.0)
    cfg = RewardConfig(functions=[RewardFnConfig(fn="judge", kwargs=kwargs),
                                  RewardFnConfig(fn="math_answer", weight=0.0)], **reward)
    return RewardRunner(cfg, columns=["answer"], run_dir=run_dir)


def test_runner_reports_usage_per_call_agreement_and_api_usage(server, tmp_path):
    rubric = tmp_path / "with_answer.txt"
    rubric.write_text("Question: {prompt}\nCorrect: {answer}\nAnswer: {completion}")
    with runner(server, str(rubric), tmp_path, agreement=["judge", "math_answer"]) as rewards:
        scored = rewards.score(["q"] * 4, ["good 4", "bad 4", "good 5", "garbage 4"], {"answer": ["4"] * 4})
        assert all("Correct: 4\n" in p["messages"][0]["content"] for p in server.posts)  # the column reached it
        m = scored.metrics
        # judge: 8/9, 1/9, 8/9, None; math_answer (last number == 4): 1, 1, 0, 1.
        # Both scored: 3 pairs; pass/fail agree on (good 4) only -> 1/3.
        assert m["agreement/judge_vs_math_answer"] == pytest.approx(1 / 3)
        assert (m["judge/requests"], m["judge/unparsable"], m["judge/cache_hits"]) == (4.0, 1.0, 0.0)
        assert m["judge/prompt_tokens"] == 4 * USAGE[0]
        assert "judge/requests" in scored.counted
        again = rewards.score(["q"], ["good 4"], {"answer": ["4"]})  # cached: this call's increase is 0
        assert (again.metrics["judge/requests"], again.metrics["judge/cache_hits"]) == (0.0, 1.0)
        used = rewards.api_usage()
        assert (used.requests, used.prompt_tokens, used.completion_tokens) == (4, 4 * USAGE[0], 4 * USAGE[1])


def test_runner_context_and_agreement_errors(server, rubric, tmp_path):
    with pytest.raises(ValueError, match=r"reward.agreement=\['judge', 'format'\]: \['format'\] not among"):
        runner(server, rubric, tmp_path, agreement=["judge", "format"])
    with pytest.raises(ValueError, match=r"reward.agreement=\['judge'\]: name two different functions"):
        runner(server, rubric, tmp_path, agreement=["judge"])
    cfg = RewardConfig(functions=[RewardFnConfig(fn="judge", kwargs=dict(run_dir="x", model="m", rubric=rubric))])
    with pytest.raises(TypeError, match=r"kwargs \['run_dir'\] are set by the runner"):
        RewardRunner(cfg, columns=["answer"], run_dir=tmp_path)


def test_ledger_prices_the_judge_on_its_own_line_and_resumes(tmp_path):
    cfg = LedgerConfig(device_kind="cpu", judge_prompt_price_per_m=2.0, judge_completion_price_per_m=8.0)
    ledger = CostLedger(tmp_path, cfg, run_kind="grpo")
    ledger.set_judge_usage(10, 1_000_000, 250_000)
    text = ledger.close()
    # 1M prompt x $2 + 0.25M completion x $8 = $4
    saved = json.loads((tmp_path / "ledger.json").read_text())
    assert saved["cost"]["judge_usd"] == pytest.approx(4.0)
    assert saved["cost"]["total_usd"] == pytest.approx(saved["cost"]["compute_usd"] + 4.0)
    assert "judge tokens       1,000,000 prompt + 250,000 completion in 10 requests ($4.0000)" in text
    # A resumed session adds its own use on top of the saved totals.
    again = CostLedger(tmp_path, cfg, run_kind="grpo")
    again.set_judge_usage(1, 100, 10)
    assert (again.totals.judge_requests, again.totals.judge_prompt_tokens) == (11, 1_000_100)


def test_ledger_written_before_judges_still_loads(tmp_path):
    ledger = CostLedger(tmp_path, LedgerConfig(device_kind="cpu"), run_kind="grpo")
    ledger.close()
    saved = json.loads((tmp_path / "ledger.json").read_text())
    for key in ("judge_requests", "judge_prompt_tokens", "judge_completion_tokens"):
        del saved["totals"][key]
    (tmp_path / "ledger.json").write_text(json.dumps(saved))
    assert CostLedger(tmp_path, LedgerConfig(device_kind="cpu"), run_kind="grpo").totals.judge_requests == 0


def test_validate_names_a_bad_agreement_before_anything_loads():
    from hydra import compose, initialize_config_dir

    from rlhf.config.store import register_configs, to_object
    from rlhf.validation import validate

    register_configs()
    root = Path(__file__).resolve().parents[1]
    with initialize_config_dir(config_dir=str(root / "conf"), version_base="1.3"):
        cfg = to_object(compose(config_name="config", overrides=[
            "+experiment=tiny_smoke", "reward=judge", "reward.agreement=[judge,judge_typo]"]))
    with pytest.raises(ConfigError, match=r"reward.agreement=\['judge', 'judge_typo'\]: \['judge_typo'\] not among"):
        validate(cfg)


def test_a_misspelt_setting_is_refused_by_validation_without_building_anything():
    from rewards.api import check_specs

    spec = RewardFnConfig(fn="judge", kwargs={"model": "m", "rubric": "support_helpfulness", "temprature": 0})
    with pytest.raises(ValueError, match=r"reward.functions\[0\].kwargs \(fn='judge'\).*'temprature'"):
        check_specs([spec])
