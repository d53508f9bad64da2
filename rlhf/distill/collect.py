"""A whole teacher collection run, whatever the teacher: an API or answers on file
(rlhf/distill/teacher_answers.py), or an open model on our own engines (rlhf/distill/engine_answers.py)."""

from __future__ import annotations

from pathlib import Path

from rlhf.config import LedgerConfig, TeacherConfig, TrainerConfig
from rlhf.distill.engine_answers import collect_with_engines
from rlhf.distill.teacher_answers import CollectResult, collect_from_config
from rlhf.run.ledger import CostLedger


def collect_run(cfg: TeacherConfig, ledger_cfg: LedgerConfig, run_dir: str | Path,
                trainer: TrainerConfig | None = None, model_cache: str | None = None) -> CollectResult:
    """A whole collection run in ``run_dir``: the filter reward loaded (and closed), bought tokens in
    the run's ledger.json, the ledger summary and the answer counts printed. ``source=engines``
    answers with an open model on our engines (rlhf/distill/engine_answers.py), started on the Ray
    of ``trainer`` (ray_address, ray_bind_host, ray_num_cpus)."""
    reward = None
    if cfg.filter_reward:
        from rewards.api import load_reward

        reward = load_reward(cfg.filter_reward)
    ledger = CostLedger(run_dir, ledger_cfg, "collect")
    try:
        fn = reward.batch_fn if reward else None
        if cfg.source == "engines":
            result = collect_with_engines(cfg, trainer or TrainerConfig(), run_dir, model_cache, fn, ledger)
        else:
            result = collect_from_config(cfg, run_dir, fn, ledger)
    finally:
        if reward is not None:
            reward.close()
        print(ledger.close())
    s = result.stats
    print(f"{s.kept} of {s.answers} answers kept -> {result.dataset_path} "
          f"({s.cache_hits} from cache, {s.paid} bought, {s.retries} retries, "
          f"{s.rejected} below teacher.min_reward, {s.unscored} unscored)")
    if s.missing_usage:
        print(f"warning: {s.missing_usage} responses carried no usage field; their tokens are not "
              "in the ledger")
    return result
