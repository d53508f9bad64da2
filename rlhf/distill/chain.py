"""From closed to open in one run: teacher collection -> SFT -> [on-policy distillation] -> GRPO.

    python -m rlhf.distill.chain +experiment=distill_then_grpo teacher.model=... teacher.path=...
    python -m rlhf.distill.chain +experiment=opd_chain teacher.model=<open model> teacher.path=...

One composed config drives every stage, each in its own folder under ``trainer.output_dir``:

    collect/  teacher.jsonl (the SFT dataset), teacher_cache.jsonl, ledger.json   (rlhf.distill.collect)
    sft/      metrics, checkpoints, export/ (the SFT model), ledger.json          (rlhf.distill.sft)
    opd/      metrics, checkpoints, export/, ledger.json                          (rlhf.train, distilling)
    grpo/     metrics, checkpoints, export/ (the final model), ledger.json        (rlhf.train)
    summary.json                                                                   (this module)
    compare/  compare.json, compare.md, compare.png, compare_cache.jsonl          (rlhf.compare)

The SFT stage reads ``collect/teacher.jsonl``. With an open teacher on our engines
(``teacher.source=engines``) and ``algo.distill_coef > 0``, an on-policy distillation stage follows
from ``sft/export`` (the rewards as configured: weight 0 for pure distillation), and GRPO starts from
``opd/export`` with ``algo.distill_coef=0``; otherwise GRPO starts from ``sft/export``. A stage that finishes writes ``STAGE_COMPLETE`` in its folder and
is skipped when the chain runs again; an interrupted stage resumes (the collection from its response
cache, SFT and GRPO from their last checkpoint: both run with ``trainer.resume=true``).

The summary adds up the stages' costs and carries the GRPO stage's serving cost per 1M tokens next
to the closed API's price (the ledger's ratio). The last stage is the verdict (rlhf.compare): the
chain's start model and its final export against the closed model of ``compare.*`` on the held-out
prompts; with no closed model configured (compare.base_url, compare.model) it is skipped, and the
chain says so. Its endpoint, key and rewards are checked before the first stage spends anything.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path


from rlhf.cli import hydra_main
from rlhf.config import Config, ConfigError
from rlhf.config.store import register_configs
from rlhf.run.ledger import LEDGER_FILE, atomic_write_text
from rlhf.validation import validate

register_configs()

STAGE_MARKER = "STAGE_COMPLETE"
SUMMARY_FILE = "summary.json"


@dataclass(frozen=True)
class ChainSummary:
    """The cost of the whole chain (USD) and the serving comparison from the GRPO stage."""

    stage_usd: dict[str, float]  # stage -> its ledger's total cost
    total_usd: float
    teacher_usd: float  # of which paid to the teacher API
    teacher_tokens_scored: int  # by an open teacher on our engines (on-policy distillation)
    teacher_engine_hours: float
    serving_usd_per_m: float | None
    closed_api_usd_per_m: float | None
    ratio: float | None  # closed API price / serving cost of the tuned model


def stage_done(stage_dir: Path) -> bool:
    return (stage_dir / STAGE_MARKER).is_file()


def mark_done(stage_dir: Path, outputs: dict[str, str]) -> None:
    """Written last: a stage folder without it is resumed, never trusted."""
    atomic_write_text(stage_dir / STAGE_MARKER, json.dumps(outputs, indent=1) + "\n")


def summarise(run_dir: Path, stages: tuple[str, ...] = ("collect", "sft", "grpo")) -> ChainSummary:
    """Sum of the stage ledgers' costs; the serving figures come from the GRPO stage's ledger."""
    costs, totals = {}, {}
    for stage in stages:
        path = run_dir / stage / LEDGER_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path}: the {stage} stage wrote no ledger")
        ledger = json.loads(path.read_text(encoding="utf-8"))
        costs[stage], totals[stage] = ledger["cost"], ledger["totals"]
    grpo = costs["grpo"]
    return ChainSummary(
        stage_usd={s: c["total_usd"] for s, c in costs.items()},
        total_usd=sum(c["total_usd"] for c in costs.values()),
        teacher_usd=sum(c["teacher_usd"] for c in costs.values()),
        teacher_tokens_scored=sum(t.get("teacher_tokens_scored", 0) for t in totals.values()),
        teacher_engine_hours=sum(t.get("teacher_engine_hours", 0.0) for t in totals.values()),
        serving_usd_per_m=grpo["serving_usd_per_m"],
        closed_api_usd_per_m=grpo["closed_api_usd_per_m"],
        ratio=grpo["ratio"],
    )


def format_chain_summary(s: ChainSummary) -> str:
    stages = ", ".join(f"{k} ${v:.4f}" for k, v in s.stage_usd.items())
    lines = [f"chain cost         ${s.total_usd:.4f} ({stages}; teacher API ${s.teacher_usd:.4f})"]
    if s.teacher_engine_hours:
        lines.append(f"open teacher       {s.teacher_tokens_scored:,} tokens scored; "
                     f"{s.teacher_engine_hours:.4f} engine-hours")
    if s.serving_usd_per_m is not None:
        lines.append(f"serving cost       ${s.serving_usd_per_m:.4f} per 1M output tokens (tuned model)")
    if s.closed_api_usd_per_m is not None:
        lines.append(f"closed API         ${s.closed_api_usd_per_m:.4f} per 1M output tokens")
    if s.ratio is not None:
        lines.append(f"ratio              closed API / tuned model = {s.ratio:.1f}x")
    return "\n".join(lines)


def distils(cfg: Config) -> bool:
    """Whether the chain has an on-policy distillation stage (an open teacher, algo.distill_coef > 0)."""
    return cfg.algo.distill_coef > 0


def stage_configs(cfg: Config, run_dir: Path) -> tuple[Config, Config | None, Config]:
    """The SFT, on-policy distillation (None without one) and GRPO stages' configs: new objects, the
    composed one is left as it is."""
    sft_dir, opd_dir, grpo_dir = run_dir / "sft", run_dir / "opd", run_dir / "grpo"
    sft_cfg = replace(
        cfg,
        sft=replace(cfg.sft, data_path=str(run_dir / "collect" / cfg.teacher.output_file)),
        trainer=replace(cfg.trainer, output_dir=str(sft_dir), resume=True, export_at_end=True),
    )
    opd_cfg = None
    if distils(cfg):
        opd_cfg = replace(
            cfg,
            model=replace(cfg.model, name_or_path=str(sft_dir / "export")),
            trainer=replace(cfg.trainer, output_dir=str(opd_dir), resume=True, export_at_end=True),
        )
    grpo_cfg = replace(
        cfg,
        model=replace(cfg.model, name_or_path=str((opd_dir if opd_cfg else sft_dir) / "export")),
        algo=replace(cfg.algo, distill_coef=0.0),
        trainer=replace(cfg.trainer, output_dir=str(grpo_dir), resume=True),
    )
    return sft_cfg, opd_cfg, grpo_cfg


def compare_stage_config(cfg: Config, run_dir: Path) -> Config | None:
    """The verdict's config: the start model and the final export (labels "start", "tuned" unless
    compare.labels names two) in ``run_dir``/compare; None when no closed model is configured."""
    c = cfg.compare
    if not (c.base_url and c.model):
        return None
    labels = list(c.labels) if len(c.labels) == 2 else ["start", "tuned"]
    return replace(
        cfg,
        compare=replace(c, models=[cfg.model.name_or_path, str(run_dir / "grpo" / "export")], labels=labels),
        trainer=replace(cfg.trainer, output_dir=str(run_dir / "compare")),
    )


def check_compare_stage(compare_cfg: Config | None) -> None:
    """Before anything is spent: the closed endpoint, its key, the rewards, the start model (the
    export does not exist yet: rlhf.compare checks it when the stage runs)."""
    from rlhf.compare import check_compare

    if compare_cfg is not None:
        c = compare_cfg.compare
        check_compare(replace(compare_cfg, compare=replace(c, models=c.models[:1], labels=c.labels[:1])))


def run_compare_stage(compare_cfg: Config | None, stage_dir: Path):
    """The verdict as the chain's last stage; None (and a printed reason) when it is skipped."""
    from rlhf.compare import run_compare

    if compare_cfg is None:
        print("compare: skipped, no closed model to compare with (set compare.base_url and compare.model)",
              flush=True)
        return None
    if stage_done(stage_dir):
        print(f"compare: complete in {stage_dir}, skipped", flush=True)
        return None
    verdict = run_compare(compare_cfg)
    mark_done(stage_dir, {"report": str(stage_dir / "compare.md")})
    return verdict


def run_chain(cfg: Config) -> ChainSummary:
    """Run the stages not yet complete, in order; returns (and writes) the chain's cost summary."""
    from rlhf.distill.collect import collect_run
    from rlhf.distill.sft import EXPORT_DIR, check_config, run_sft
    from rlhf.train import train

    run_dir = Path(cfg.trainer.output_dir)
    sft_cfg, opd_cfg, grpo_cfg = stage_configs(cfg, run_dir)
    # Every stage's settings are checked before the first one spends anything.
    check_config(sft_cfg)
    if opd_cfg is not None:
        validate(opd_cfg)
    validate(grpo_cfg)
    if not cfg.trainer.export_at_end:
        raise ConfigError("trainer.export_at_end=false: the chain hands each stage's export to the next")
    compare_cfg = compare_stage_config(cfg, run_dir)
    check_compare_stage(compare_cfg)

    collect_dir = run_dir / "collect"
    if stage_done(collect_dir):
        print(f"collect: complete in {collect_dir}, skipped", flush=True)
    else:
        result = collect_run(cfg.teacher, cfg.ledger, collect_dir, cfg.trainer, cfg.model.cache_dir)
        mark_done(collect_dir, {"dataset": str(result.dataset_path)})

    sft_dir = Path(sft_cfg.trainer.output_dir)
    if stage_done(sft_dir):
        print(f"sft: complete in {sft_dir}, skipped", flush=True)
    else:
        run_sft(sft_cfg)
        mark_done(sft_dir, {"export": str(sft_dir / EXPORT_DIR)})

    stages = ("collect", "sft", "grpo")
    for name, stage_cfg in (("opd", opd_cfg), ("grpo", grpo_cfg)):
        if stage_cfg is None:
            continue
        stage_dir = Path(stage_cfg.trainer.output_dir)
        if stage_done(stage_dir):
            print(f"{name}: complete in {stage_dir}, skipped", flush=True)
        else:
            train(stage_cfg)
            mark_done(stage_dir, {"export": str(stage_dir / "export"), "base": stage_cfg.model.name_or_path})
    if opd_cfg is not None:
        stages = ("collect", "sft", "opd", "grpo")

    summary = summarise(run_dir, stages)
    atomic_write_text(run_dir / SUMMARY_FILE, json.dumps(asdict(summary), indent=2) + "\n")
    print(format_chain_summary(summary), flush=True)
    run_compare_stage(compare_cfg, run_dir / "compare")
    return summary


main = hydra_main(run_chain)


if __name__ == "__main__":
    main()
