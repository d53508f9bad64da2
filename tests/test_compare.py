"""``python -m rlhf.compare`` end to end: the "closed" model is the tiny model behind vLLM's real
OpenAI-compatible server (tests/conftest.py tiny_api_server, with a key), the open models the tiny
model and a copy of its folder (an "export") on our engines; math_answer on the arithmetic data,
4 prompts, 8 tokens. The tiny model is random, so the checks are the plumbing and the arithmetic:
every figure in compare.json is recomputed here from its own per-prompt table.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from rlhf.chat.client import Endpoint
from rlhf.compare import CACHE_FILE, JSON_FILE, MD_FILE, PNG_FILE, check_compare, held_out, run_compare
from rlhf.config import ConfigError
from rlhf.config.store import register_configs, to_object
from rlhf.experience.answers import closed_answers

ROOT = Path(__file__).resolve().parents[1]
KEY_ENV = "TEST_COMPARE_CLOSED_KEY"
# Reads the closed_answer column, as a pairwise judge would: the run's win score.
NEEDS_SOLUTION = (ROOT / "tests" / "support" / "eval_rewards.py").as_posix() + ":needs_solution"
PAIRWISE = (ROOT / "tests" / "support" / "compare_rewards.py").as_posix() + ":longer_than_closed"
register_configs()


def compare_config(tmp: Path, served, models: list[str], *extra: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return to_object(compose(config_name="config", overrides=[
            "+experiment=tiny_smoke", f"model.name_or_path={models[0]}", f"trainer.output_dir={tmp}",
            f"compare.base_url={served.base_url}", f"compare.model={served.model}", f"compare.api_key_env={KEY_ENV}",
            f"compare.models=[{','.join(models)}]", "compare.labels=[base,tuned]", "compare.prompts=4",
            "compare.max_tokens=8", "compare.latency_requests=2", "compare.max_retries=1",
            "ledger.device_kind=cpu", "ledger.closed_api_name=tiny-closed", "ledger.closed_api_price_date=2026-12-01",
            *extra]))


@pytest.fixture(scope="module")
def verdict_run(ray_session, tiny_api_server, tiny_model_path, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("compare")
    export = tmp / "export"
    shutil.copytree(tiny_model_path, export)  # any HF folder of the model stands in for a tuned export
    mp = pytest.MonkeyPatch()
    mp.setenv(KEY_ENV, tiny_api_server.key)
    try:
        cfg = compare_config(tmp / "run", tiny_api_server, [tiny_model_path, str(export)],
                             f"reward.functions=[{{fn: math_answer, kwargs: {{mode: last_number}}}}, "
                             f"{{fn: '{PAIRWISE}', weight: 0}}]", "compare.win_reward=longer_than_closed")
        verdict = run_compare(cfg)
        yield {"cfg": cfg, "verdict": verdict, "out": tmp / "run", "tmp": tmp}
    finally:
        mp.undo()


def test_report_figures_are_the_per_prompt_arithmetic(verdict_run):
    out = verdict_run["out"]
    saved = json.loads((out / JSON_FILE).read_text())
    assert (out / MD_FILE).is_file() and (out / PNG_FILE).stat().st_size > 0
    assert saved["prompts"] == 4 and saved["reward"] == "math_answer" and saved["win_from"] == "longer_than_closed"
    closed, closed_answers_ = saved["closed"]["scores"], saved["closed"]["answers"]
    assert len(closed) == 4 and saved["closed"]["usd_per_m"] == 10.0  # ledger's default list price
    # The closed answers are scored by the quality reward alone: the pairwise one would compare each
    # closed answer with itself (a paid judge's calls for nothing).
    assert list(saved["closed"]["rewards"]) == ["math_answer"]
    assert saved["closed_price"]["date"] == "2026-12-01" and saved["device_kind"] == "cpu"
    assert [m["label"] for m in saved["open"]] == ["base", "tuned"]
    for m in saved["open"]:
        scores = m["scores"]
        assert all(s in (0.0, 1.0) for s in scores)  # math_answer: right or wrong, nothing unscored here
        mean = sum(scores) / 4
        assert m["quality"]["mean"] == pytest.approx(mean, abs=1e-12)
        sd = math.sqrt(sum((s - mean) ** 2 for s in scores) / 3)
        assert m["quality"]["stderr"] == pytest.approx(sd / 2, abs=1e-12)
        assert m["rewards"]["math_answer"] == scores
        # Win per prompt from the pairwise reward, which saw the closed answer to the same prompt:
        # 1 for a longer answer, 0.5 as long, 0 shorter.
        wins = [1.0 if len(a) > len(c) else 0.5 if len(a) == len(c) else 0.0
                for a, c in zip(m["answers"], closed_answers_)]
        assert m["wins"] == wins == m["rewards"]["longer_than_closed"]
        rate = sum(wins) / 4
        half = 1.959963984540054 * math.sqrt(sum((w - rate) ** 2 for w in wins) / 3) / 2
        assert m["win_rate"]["rate"] == pytest.approx(rate, abs=1e-12)
        assert m["win_rate"]["half_width"] == pytest.approx(half, abs=1e-12)
        # Cost: $0.10/h on one CPU at the measured tokens/s.
        assert m["usd_per_m"] == pytest.approx(0.10 / (m["tokens_per_s"] * 3600) * 1e6, rel=1e-12)
        assert all(1 <= t <= 8 for t in m["answer_tokens"]) and m["latency"]["n"] == 2
        # Break-even: $0.10 x 1 x 730 h = $73 a month / $10 per 1M = 7.3M tokens, unless the CPU's
        # cost per token is above the API's ("never", null).
        expected = None if m["usd_per_m"] >= 10.0 else 7.3
        assert m["break_even_m_tokens"] == (pytest.approx(expected, rel=1e-12) if expected else None)
    assert saved["closed"]["latency"]["n"] == 2 and saved["closed_requests_paid"] == 6  # 4 answers + 2 timed
    assert saved["machine"]["cpu_count"] >= 1


def test_a_rerun_buys_nothing_and_the_key_is_written_nowhere(verdict_run, tiny_api_server):
    cfg, out = verdict_run["cfg"], verdict_run["out"]
    lines = (out / CACHE_FILE).read_text().splitlines()
    c = cfg.compare
    again = closed_answers(held_out(cfg, c.models[0]), Endpoint.of(c, owner="compare"), tiny_api_server.key,
                           c.model, {"temperature": c.temperature, "max_tokens": c.max_tokens}, None,
                           c.latency_requests, out / CACHE_FILE)
    assert (again.requests_paid, again.cache_hits) == (0, 6)
    assert (out / CACHE_FILE).read_text().splitlines() == lines
    assert again.texts == json.loads((out / JSON_FILE).read_text())["closed"]["answers"]
    for path in verdict_run["tmp"].rglob("*"):
        if path.is_file():
            assert tiny_api_server.key.encode() not in path.read_bytes(), path


def test_without_a_pairwise_reward_a_prompt_is_won_by_the_higher_score(tmp_path):
    """build_verdict on a hand-made table (no engine): closed scores [1, 0, 1, 0], open [1, 1, 0, 0]
    -> wins [0.5, 1, 0, 0.5], rate 0.5; deviations 0, 0.5, -0.5, 0 -> variance 0.5/3, stderr
    sqrt(1/24), half width 1.96 x 0.2041 = 0.4001. Cost: $0.10/h at 20 tokens/s = 0.1 / 72000 x 1e6
    = $1.3889 per 1M < $10 -> break-even 0.1 x 730 / 10 = 7.3M tokens a month."""
    from rewards.runner import RewardResult
    from rlhf.compare import Setup, build_verdict
    from rlhf.config import Config
    from rlhf.experience.answers import Answers

    cfg = Config()
    setup = Setup(["base"], ["base"], "math_answer", None, "cpu", None)
    closed = Answers(["a"] * 4, [1] * 4, [0.2, 0.4])
    opened = Answers(["b"] * 4, [2] * 4, [0.1, 0.3, 0.5], tokens_per_s=20.0)
    v = build_verdict(cfg, setup, closed, {"math_answer": [1.0, 0.0, 1.0, 0.0]},
                      [(opened, RewardResult(total=[], per_fn={"math_answer": [1.0, 1.0, 0.0, 0.0]}))])
    m = v.open[0]
    assert m.wins == [0.5, 1.0, 0.0, 0.5] and m.win_rate.rate == 0.5
    assert m.win_rate.half_width == pytest.approx(1.959963984540054 * math.sqrt(1 / 24), rel=1e-12)
    assert m.usd_per_m == pytest.approx(0.1 / 72000 * 1e6, rel=1e-12)
    assert m.break_even_m_tokens == pytest.approx(7.3, rel=1e-12)
    assert (m.latency.median_s, v.closed.latency.median_s) == (0.3, pytest.approx(0.3, rel=1e-12))
    assert (v.win_from, v.closed.usd_per_m, v.closed_price["date"]) == ("reward", 10.0, "2026-12-01")


@pytest.mark.parametrize("override, env, match", [
    ("compare.base_url=null", True, r"compare\.base_url is not set"),
    ("compare.model=null", True, r"compare\.model is not set"),
    (None, False, rf"compare\.api_key_env='{KEY_ENV}': the environment variable is not set"),
    ("compare.base_url=http://127.0.0.1:9/v1", True, r"compare\.base_url='http://127.0.0.1:9/v1': the endpoint is unreachable"),
    ("compare.model=gpt-nothing", True, r"compare\.model='gpt-nothing': .* serves \['tiny'\], not 'gpt-nothing'"),
    ("compare.reward=judge_x", True, r"compare\.reward='judge_x' is not a configured reward"),
    ("compare.win_reward=nope", True, r"compare\.win_reward='nope' is not a configured reward"),
    (f"reward.functions=[{{fn: '{NEEDS_SOLUTION}'}}]", True,
     r"reward\.functions\[0\] 'needs_solution' .*\['solution'\] have no default"),
    ("compare.models=[/no/such/export,/no/other]", True, r"compare\.models\[0\]='/no/such/export': no such model folder"),
    ("ledger.closed_api_completion_price_per_m=0", True, r"ledger\.closed_api_completion_price_per_m must be > 0"),
])
def test_bad_input_is_named_before_any_engine_starts(tiny_api_server, tiny_model_path, tmp_path, monkeypatch,
                                                     override, env, match):
    if env:
        monkeypatch.setenv(KEY_ENV, tiny_api_server.key)
    else:
        monkeypatch.delenv(KEY_ENV, raising=False)
    cfg = compare_config(tmp_path, tiny_api_server, [tiny_model_path, tiny_model_path],
                         *([override] if override else []))
    with pytest.raises(ConfigError, match=match) as err:
        check_compare(cfg)
    assert tiny_api_server.key not in str(err.value)
    assert not (tmp_path / "logs").exists()  # nothing was started


def test_a_wrong_key_is_named(tiny_api_server, tiny_model_path, tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sk-wrong-key-0000")
    cfg = compare_config(tmp_path, tiny_api_server, [tiny_model_path, tiny_model_path])
    with pytest.raises(ConfigError, match=r"compare\.base_url=.*answered HTTP 401") as err:
        check_compare(cfg)
    assert "sk-wrong-key-0000" not in str(err.value)


# --- the chain's last stage (rlhf/distill/chain.py) ---------------------------------------------------


def test_the_chain_skips_its_verdict_without_a_closed_model(tmp_path, capsys):
    from rlhf.distill.chain import compare_stage_config, run_compare_stage

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = to_object(compose(config_name="config", overrides=["+experiment=tiny_smoke",
                                                                 f"trainer.output_dir={tmp_path}"]))
    stage = compare_stage_config(cfg, tmp_path)
    assert stage is None
    assert run_compare_stage(stage, tmp_path / "compare") is None
    assert "compare: skipped, no closed model to compare with" in capsys.readouterr().out
    assert not (tmp_path / "compare").exists()


def test_the_chain_compares_its_start_model_and_final_export(tiny_api_server, tiny_model_path, tmp_path,
                                                            monkeypatch):
    from rlhf.distill.chain import check_compare_stage, compare_stage_config

    monkeypatch.setenv(KEY_ENV, tiny_api_server.key)
    cfg = compare_config(tmp_path / "other", tiny_api_server, [tiny_model_path], "compare.labels=[]")
    stage = compare_stage_config(cfg, tmp_path)
    assert stage.compare.models == [tiny_model_path, str(tmp_path / "grpo" / "export")]
    assert stage.compare.labels == ["start", "tuned"]
    assert stage.trainer.output_dir == str(tmp_path / "compare")
    check_compare_stage(stage)  # the export does not exist yet: only the rest is checked up front
    bad = compare_stage_config(compare_config(tmp_path, tiny_api_server, [tiny_model_path], "compare.labels=[]",
                                              "compare.model=gpt-nothing"), tmp_path)
    with pytest.raises(ConfigError, match=r"compare\.model='gpt-nothing'"):
        check_compare_stage(bad)
