"""The run's picture: training reward and held-out accuracy over steps, as a PNG."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def last_per_step(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per step, the last one logged, in step order."""
    return sorted({m["step"]: m for m in records}.values(), key=lambda m: m["step"])


def plot_run(metrics: list[dict[str, Any]], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    # A step redone after a resume or a learner restart is logged again: its last record counts.
    train = last_per_step([m for m in metrics if m.get("reward/mean") is not None])
    evals = last_per_step([m for m in metrics if m.get("eval/accuracy") is not None])
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    if train:
        ax.plot([m["step"] for m in train], [m["reward/mean"] for m in train], "o-", label="train reward (mean)")
    if evals:
        steps = [m["step"] for m in evals]
        acc = [m["eval/accuracy"] for m in evals]
        err = [m.get("eval/accuracy_stderr") or 0.0 for m in evals]
        ax.errorbar(steps, acc, yerr=err, fmt="s--", capsize=3, label="held-out accuracy")
    ax.set_xlabel("step")
    ax.set_ylabel("reward / accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    ax.set_title("GRPO training")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def plot_timeline(spans: list[dict[str, Any]], out: Path) -> Path:
    """One row per phase (generate, score, train, sync, eval, save), a bar per span, seconds from
    the first span: with trainer.max_staleness > 0 the generate bars overlap the train bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    phases = ["generate", "score", "train", "sync", "eval", "save"]
    t0 = min((s["start"] for s in spans), default=0.0)
    fig, ax = plt.subplots(figsize=(9, 3), dpi=120)
    for row, phase in enumerate(phases):
        bars = [(s["start"] - t0, s["end"] - s["start"]) for s in spans if s["phase"] == phase]
        ax.broken_barh(bars, (row - 0.4, 0.8), color=f"C{row}", edgecolor="white", linewidth=0.5)
        for s in spans:
            if s["phase"] == phase and phase in ("generate", "train"):
                ax.text(s["start"] - t0, row, str(s["step"]), va="center", fontsize=6)
    ax.set_yticks(range(len(phases)), phases)
    ax.set_xlabel("seconds since the first span")
    ax.grid(axis="x", alpha=0.3)
    ax.set_title("run timeline (numbers: the step a batch is for)")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def plot_verdict(points: list[tuple[str, float, float, float]], out: Path, closed_label: str,
                 machine: str = "") -> Path:
    """Quality (± stderr) against cost per 1M output tokens on a log axis, one point per model:
    (label, usd_per_m, quality, stderr); the first point is the closed model. ``machine`` (the
    hardware the open models' costs were measured on) goes under the title."""
    import math

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for i, (label, cost, quality, stderr) in enumerate(points):
        if not (cost > 0 and math.isfinite(quality)):
            continue  # no point to draw: nothing measured or nothing scored
        ax.errorbar([cost], [quality], yerr=[stderr if math.isfinite(stderr) else 0.0], fmt="D" if i == 0 else "o",
                    capsize=4, color=f"C{i}", label=label)
        ax.annotate(label, (cost, quality), textcoords="offset points", xytext=(6, 6), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("USD per 1M output tokens (log)")
    ax.set_ylabel("quality (mean reward ± stderr)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="best", fontsize=8)
    ax.set_title(f"open models vs {closed_label}" + (f"\n{machine}" if machine else ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out
