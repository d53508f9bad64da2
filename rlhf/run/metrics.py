"""Where metrics go: a JSONL file, TensorBoard, wandb when installed and asked for, and a progress line."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any


class MetricsLogger:
    """Appends one JSON object per step to ``metrics.jsonl`` and mirrors scalars to TensorBoard."""

    def __init__(self, run_dir: Path, tensorboard: bool = True, wandb_project: str | None = None,
                 config: dict[str, Any] | None = None, resume: bool = False):
        self.path = run_dir / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a" if resume else "w", encoding="utf-8")
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(run_dir / "tensorboard"))
        self._wandb = None
        if wandb_project:
            try:
                import wandb
            except ImportError:
                print(f"trainer.wandb_project={wandb_project!r} but wandb is not installed; skipping it")
            else:
                self._wandb = wandb.init(project=wandb_project, config=config, dir=str(run_dir))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        clean = {k: _jsonable(v) for k, v in metrics.items()}
        self._file.write(json.dumps({"step": step, "time": time.time(), **clean}) + "\n")
        self._file.flush()
        for key, value in clean.items():
            if self._tb is not None and isinstance(value, (int, float)) and value is not None:
                self._tb.add_scalar(key, value, step)
        if self._tb is not None:
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(clean, step=step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN; None reads as "not available"
    return value


def read_metrics(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def progress_line(step: int, total: int, metrics: dict[str, float], started: float) -> str:
    """One human line per step: step/total, reward, accuracy, reverse KL when distilling, tokens/s,
    phase times, ETA."""
    elapsed = time.time() - started
    eta = elapsed / max(step, 1) * (total - step)
    phases = " ".join(
        f"{k.split('/')[1]}={metrics[k]:.1f}s" for k in sorted(metrics) if k.startswith("timing/")
    )
    acc = metrics.get("reward/accuracy")
    acc_txt = f" acc={acc:.3f}" if acc is not None else ""
    # Distilling: the reverse KL to the teacher is the number to watch (pure mode's reward is 0).
    kl = metrics.get("distill/reverse_kl")
    kl_txt = f" reverse_kl={kl:.4f}" if kl is not None else ""
    return (
        f"step {step}/{total} reward={metrics.get('reward/mean', float('nan')):.3f}{acc_txt}{kl_txt} "
        f"tok/s={metrics.get('throughput/tokens_per_s', 0):.0f} {phases} "
        f"elapsed={elapsed / 60:.1f}m eta={eta / 60:.1f}m"
    )
