"""Cost ledger: arithmetic on hand-made figures, atomic updates, resume, summary text."""

from __future__ import annotations

import json
import os

import pytest

from rlhf.config import ConfigError, LedgerConfig
from rlhf.run.ledger import (
    CostLedger,
    api_cost_usd,
    device_cost_usd,
    serving_usd_per_m,
    short_device_name,
)


class FakeClock:
    """A clock the test moves by hand, so wall time and device-hours are exact."""

    def __init__(self, t: float = 100.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def prices(**overrides) -> LedgerConfig:
    cfg = LedgerConfig(
        device_kind="h100",
        num_devices=2,
        device_hour_price={"cpu": 0.10, "h100": 2.00},
        teacher_prompt_price_per_m=1.0,
        teacher_completion_price_per_m=4.0,
        closed_api_prompt_price_per_m=2.5,
        closed_api_completion_price_per_m=10.0,
        save_every_s=0.0,
    )
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def read(path) -> dict:
    return json.loads(path.read_text())


def test_pure_arithmetic():
    # 1.5 h of h100 at $2 + 10 h of cpu at $0.10 = 3.0 + 1.0
    assert device_cost_usd({"h100": 1.5, "cpu": 10.0}, {"h100": 2.0, "cpu": 0.1}) == pytest.approx(4.0)
    # 300k prompt at $1/M = 0.30; 50k completion at $4/M = 0.20
    assert api_cost_usd(300_000, 50_000, 1.0, 4.0) == pytest.approx(0.50)
    # $2.5/h at 1000 tok/s: 3.6M tokens an hour cost $2.5, so 1M cost 2.5 / 3.6 = 0.69444
    assert serving_usd_per_m(2.5, 1000.0) == pytest.approx(0.694444, rel=1e-5)
    with pytest.raises(ValueError, match="tokens_per_s=0"):
        serving_usd_per_m(2.5, 0.0)
    with pytest.raises(ConfigError, match=r"no price for device kind\(s\) \['tpu'\]"):
        device_cost_usd({"tpu": 1.0}, {"cpu": 0.1})


def test_run_cost_and_serving_ratio(tmp_path):
    clock = FakeClock(100.0)
    ledger = CostLedger(tmp_path, prices(), "grpo", clock=clock)
    ledger.add_teacher(prompt_tokens=300_000, completion_tokens=50_000, requests=70)
    ledger.add_generated(tokens=720_000, seconds=360.0)
    ledger.add_trained(tokens=1_000_000)
    clock.t = 100.0 + 1800.0  # half an hour later
    text = ledger.close()

    data = read(tmp_path / "ledger.json")
    totals, cost = data["totals"], data["cost"]
    assert totals["wall_s"] == pytest.approx(1800.0)
    # 2 devices * 0.5 h = 1.0 h of h100 -> $2.00
    assert totals["device_hours"] == {"h100": pytest.approx(1.0)}
    assert cost["compute_usd"] == pytest.approx(2.00)
    # 300k * $1/M + 50k * $4/M = 0.30 + 0.20
    assert cost["teacher_usd"] == pytest.approx(0.50)
    assert cost["total_usd"] == pytest.approx(2.50)
    # 720k tokens / 360 s = 2000 tok/s; 2 h100 cost $4/h -> 4 / (2000 * 3600) * 1e6 = 0.55556 $/M
    assert cost["tokens_per_s"] == pytest.approx(2000.0)
    assert cost["serving_usd_per_m"] == pytest.approx(0.555556, rel=1e-5)
    # closed API $10/M vs 0.55556 $/M = 18.0x
    assert cost["ratio"] == pytest.approx(18.0)
    assert totals["tokens_trained"] == 1_000_000
    assert totals["teacher_requests"] == 70

    assert "ratio              closed API / tuned model = 18.0x" in text
    assert "$0.5556 per 1M output tokens (2000.0 tokens/s on h100)" in text
    assert "$2.5000 (compute $2.0000, teacher API $0.5000)" in text


def test_default_prices_compare_with_a_named_closed_model(tmp_path):
    # The shipped default: gpt-4o's $10/M output list price on a $0.10/h CPU. 100 tok/s for 1 h:
    # 0.10 / (100 * 3600) * 1e6 = $0.27778 per 1M tokens; 10 / 0.27778 = 36.0x.
    clock = FakeClock(0.0)
    ledger = CostLedger(tmp_path, LedgerConfig(device_kind="cpu", save_every_s=0.0), "grpo", clock=clock)
    ledger.add_generated(tokens=360_000, seconds=3600.0)
    clock.t = 3600.0
    text = ledger.close()
    assert "$10.0000 per 1M output tokens (gpt-4o (OpenAI list price, 2026))" in text
    assert "closed API / tuned model = 36.0x" in text
    assert read(tmp_path / "ledger.json")["prices"]["closed_api_name"].startswith("gpt-4o")


def test_summary_without_generation_or_closed_price(tmp_path):
    ledger = CostLedger(tmp_path, prices(closed_api_completion_price_per_m=0.0), "sft",
                        clock=FakeClock())
    text = ledger.close()
    assert "not measured (the run generated no tokens)" in text
    assert "price not set (ledger.closed_api_completion_price_per_m)" in text
    assert "ratio" not in text
    assert read(tmp_path / "ledger.json")["cost"]["ratio"] is None


def test_file_follows_the_run_so_a_crash_leaves_the_last_state(tmp_path):
    clock = FakeClock(0.0)
    ledger = CostLedger(tmp_path, prices(), "collect", clock=clock)
    clock.t = 36.0
    ledger.add_teacher(1000, 200)
    # No close(): what a crash would leave behind.
    data = read(tmp_path / "ledger.json")
    assert data["totals"]["teacher_prompt_tokens"] == 1000
    # 2 devices * 36 s = 72 device-seconds = 0.02 h
    assert data["totals"]["device_hours"]["h100"] == pytest.approx(0.02)


def test_saves_are_throttled_by_save_every_s(tmp_path):
    clock = FakeClock(0.0)
    ledger = CostLedger(tmp_path, prices(save_every_s=60.0), "grpo", clock=clock)
    clock.t = 10.0
    ledger.add_trained(500)  # 10 s after the last save: not written yet
    assert read(tmp_path / "ledger.json")["totals"]["tokens_trained"] == 0
    clock.t = 61.0
    ledger.add_trained(250)  # 61 s after: written, with both updates
    assert read(tmp_path / "ledger.json")["totals"]["tokens_trained"] == 750


def test_failed_write_leaves_previous_file_intact(tmp_path, monkeypatch):
    ledger = CostLedger(tmp_path, prices(), "grpo", clock=FakeClock())
    ledger.add_trained(100)

    def crash(src, dst):
        raise OSError("disk went away")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk went away"):
        ledger.add_trained(900)
    # The reader still sees a complete file with the state of the last good save.
    assert read(tmp_path / "ledger.json")["totals"]["tokens_trained"] == 100


def test_resume_adds_to_the_earlier_session(tmp_path):
    clock = FakeClock(0.0)
    first = CostLedger(tmp_path, prices(), "grpo", clock=clock)
    first.add_generated(1000, 2.0)
    clock.t = 1800.0
    first.close()

    clock2 = FakeClock(5000.0)  # a new process: its clock starts anywhere
    second = CostLedger(tmp_path, prices(device_kind="cpu", num_devices=1), "grpo", clock=clock2)
    second.add_generated(500, 1.0)
    clock2.t = 5000.0 + 900.0
    second.close()

    totals = read(tmp_path / "ledger.json")["totals"]
    assert totals["tokens_generated"] == 1500
    assert totals["generation_s"] == pytest.approx(3.0)
    # 1800 s + 900 s of wall time; h100 hours from the first session (2 * 0.5 h) are kept and
    # the second session adds 1 cpu * 0.25 h.
    assert totals["wall_s"] == pytest.approx(2700.0)
    assert totals["device_hours"] == {"h100": pytest.approx(1.0), "cpu": pytest.approx(0.25)}


def test_bad_inputs_are_named(tmp_path):
    with pytest.raises(ConfigError, match=r"ledger.device_kind='a100' has no price"):
        CostLedger(tmp_path, prices(device_kind="a100"), "grpo", clock=FakeClock())
    CostLedger(tmp_path / "sft", prices(), "sft", clock=FakeClock()).close()
    with pytest.raises(ValueError, match=r"belongs to a 'sft' run; this is a 'grpo' run"):
        CostLedger(tmp_path / "sft", prices(), "grpo", clock=FakeClock())
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "ledger.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"bad/ledger.json: not a ledger"):
        CostLedger(tmp_path / "bad", prices(), "grpo", clock=FakeClock())


@pytest.mark.parametrize("name, kind", [
    ("NVIDIA H100 80GB HBM3", "h100"),
    ("NVIDIA H200", "h200"),
    ("NVIDIA A100-SXM4-80GB", "a100"),
    ("NVIDIA L40S", "l40s"),
    ("Some Accelerator", "some-accelerator"),
])
def test_short_device_name(name, kind):
    assert short_device_name(name) == kind
