"""Collect a teacher dataset for SFT: ``python scripts/collect_teacher.py teacher=api teacher.model=...``

    export OPENAI_API_KEY=...        # the variable named by teacher.api_key_env
    python scripts/collect_teacher.py teacher=api teacher.model=gpt-4o-mini \
        teacher.path=prompts.jsonl teacher.filter_reward=math_answer output_dir=runs/teacher

Writes <output_dir>/teacher.jsonl (the dataset), teacher_cache.jsonl (rerun the same command to
resume without paying twice) and ledger.json (tokens bought and what they cost), then prints the
ledger's summary. Groups: conf/teacher/*.yaml (api, vllm_local, jsonl) and conf/ledger/*.yaml.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from rlhf.config.store import register_configs
from rlhf.distill.collect import collect_run

register_configs()
ConfigStore.instance().store(name="collect_teacher", node={
    "defaults": [{"teacher": "api"}, {"ledger": "default"}, "_self_"],
    "output_dir": "runs/teacher-${now:%Y%m%d-%H%M%S}",
    "hydra": {"run": {"dir": "${output_dir}"}, "job": {"chdir": False}},
})


@hydra.main(version_base=None, config_path="../conf", config_name="collect_teacher")
def main(cfg: DictConfig) -> None:
    teacher = OmegaConf.to_object(cfg.teacher)  # raises on a missing ??? value, naming the key
    collect_run(teacher, OmegaConf.to_object(cfg.ledger), Path(cfg.output_dir))


if __name__ == "__main__":
    main()
