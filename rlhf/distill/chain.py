"""From closed to open in one run: teacher collection -> SFT -> GRPO from the SFT model.

    python -m rlhf.distill.chain +experiment=distill_then_grpo teacher.model=... teacher.path=...

One composed config drives all three stages, each in its own folder under ``trainer.output_dir``:

    collect/  teacher.jsonl (the SFT dataset), teacher_cache.jsonl, ledger.json   (rlhf.distill.teacher)
    sft/      metrics, checkpoints, export/ (the SFT model), ledger.json          (rlhf.distill.sft)
    grpo/     metrics, checkpoints, export/ (the final model), ledger.json        (rlhf.train)
    summary.json                                                                   (this module)

The SFT stage reads ``collect/teacher.jsonl``; the GRPO stage starts from
``model.name_or_path=sft/export``. A stage that finishes writes ``STAGE_COMPLETE`` in its folder and
is skipped when the chain runs again; an interrupted stage resumes (the collection from its response
cache, SFT and GRPO from their last checkpoint: both run with ``trainer.resume=true``).

The summary adds up the stages' costs and carries the GRPO stage's serving cost per 1M tokens next
to the closed API's price (the ledger's ratio).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path


from rlhf.cli import hydra_main
from rlhf.config import Config, ConfigError
from rlhf.config.store import register_configs
from rlhf.ledger import LEDGER_FILE, atomic_write_text
from rlhf.validation import validate

register_configs()

STAGES = ("collect", "sft", "grpo")
STAGE_MARKER = "STAGE_COMPLETE"
SUMMARY_FILE = "summary.json"


@dataclass(frozen=True)
class ChainSummary:
    """The cost of the whole chain (USD) and the serving comparison from the GRPO stage."""

    stage_usd: dict[str, float]  # stage -> its ledger's total cost
    total_usd: float
    teacher_usd: float  # of which paid to the teacher API
    serving_usd_per_m: float | None
    closed_api_usd_per_m: float | None
    ratio: float | None  # closed API price / serving cost of the tuned model


def stage_done(stage_dir: Path) -> bool:
    return (stage_dir / STAGE_MARKER).is_file()


def mark_done(stage_dir: Path, outputs: dict[str, str]) -> None:
    """Written last: a stage folder without it is resumed, never trusted."""
    atomic_write_text(stage_dir / STAGE_MARKER, json.dumps(outputs, indent=1) + "\n")


def summarise(run_dir: Path) -> ChainSummary:
    """Sum of the stage ledgers' costs; the serving figures come from the GRPO stage's ledger."""
    costs = {}
    for stage in STAGES:
        path = run_dir / stage / LEDGER_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path}: the {stage} stage wrote no ledger")
        costs[stage] = json.loads(path.read_text(encoding="utf-8"))["cost"]
    grpo = costs["grpo"]
    return ChainSummary(
        stage_usd={s: c["total_usd"] for s, c in costs.items()},
        total_usd=sum(c["total_usd"] for c in costs.values()),
        teacher_usd=sum(c["teacher_usd"] for c in costs.values()),
        serving_usd_per_m=grpo["serving_usd_per_m"],
        closed_api_usd_per_m=grpo["closed_api_usd_per_m"],
        ratio=grpo["ratio"],
    )


def format_chain_summary(s: ChainSummary) -> str:
    stages = ", ".join(f"{k} ${v:.4f}" for k, v in s.stage_usd.items())
    lines = [f"chain cost         ${s.total_usd:.4f} ({stages}; teacher API ${s.teacher_usd:.4f})"]
    if s.serving_usd_per_m is not None:
        lines.append(f"serving cost       ${s.serving_usd_per_m:.4f} per 1M output tokens (tuned model)")
    if s.closed_api_usd_per_m is not None:
        lines.append(f"closed API         ${s.closed_api_usd_per_m:.4f} per 1M output tokens")
    if s.ratio is not None:
        lines.append(f"ratio              closed API / tuned model = {s.ratio:.1f}x")
    return "\n".join(lines)


def stage_configs(cfg: Config, run_dir: Path) -> tuple[Config, Config]:
    """The SFT and GRPO stages' configs: new objects, the composed one is left as it is."""
    sft_dir, grpo_dir = run_dir / "sft", run_dir / "grpo"
    sft_cfg = replace(
        cfg,
        sft=replace(cfg.sft, data_path=str(run_dir / "collect" / cfg.teacher.output_file)),
        trainer=replace(cfg.trainer, output_dir=str(sft_dir), resume=True, export_at_end=True),
    )
    grpo_cfg = replace(
        cfg,
        model=replace(cfg.model, name_or_path=str(sft_dir / "export")),
        trainer=replace(cfg.trainer, output_dir=str(grpo_dir), resume=True),
    )
    return sft_cfg, grpo_cfg


def run_chain(cfg: Config) -> ChainSummary:
    """Run the stages not yet complete, in order; returns (and writes) the chain's cost summary."""
    from rlhf.distill.sft import EXPORT_DIR, check_config, run_sft
    from rlhf.distill.teacher import collect_run
    from rlhf.train import train

    run_dir = Path(cfg.trainer.output_dir)
    sft_cfg, grpo_cfg = stage_configs(cfg, run_dir)
    # Every stage's settings are checked before the first one spends anything.
    check_config(sft_cfg)
    validate(grpo_cfg)
    if not cfg.trainer.export_at_end:
        raise ConfigError("trainer.export_at_end=false: the chain hands each stage's export to the next")

    collect_dir = run_dir / "collect"
    if stage_done(collect_dir):
        print(f"collect: complete in {collect_dir}, skipped", flush=True)
    else:
        result = collect_run(cfg.teacher, cfg.ledger, collect_dir)
        mark_done(collect_dir, {"dataset": str(result.dataset_path)})

    sft_dir = Path(sft_cfg.trainer.output_dir)
    if stage_done(sft_dir):
        print(f"sft: complete in {sft_dir}, skipped", flush=True)
    else:
        run_sft(sft_cfg)
        mark_done(sft_dir, {"export": str(sft_dir / EXPORT_DIR)})

    grpo_dir = Path(grpo_cfg.trainer.output_dir)
    if stage_done(grpo_dir):
        print(f"grpo: complete in {grpo_dir}, skipped", flush=True)
    else:
        train(grpo_cfg)
        mark_done(grpo_dir, {"export": str(grpo_dir / "export"), "base": grpo_cfg.model.name_or_path})

    summary = summarise(run_dir)
    atomic_write_text(run_dir / SUMMARY_FILE, json.dumps(asdict(summary), indent=2) + "\n")
    print(format_chain_summary(summary), flush=True)
    return summary


main = hydra_main(run_chain)


if __name__ == "__main__":
    main()
