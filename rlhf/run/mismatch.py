"""The sampler/learner mismatch limit: algo.max_mismatch_kl held for algo.max_mismatch_kl_steps.

Every step the learner measures mismatch/kl_k3, the per-token KL from the engines' sampler to its own
pre-update policy (rlhf/algo/correction.py). One step above the limit is a warning with the figures:
bf16 kernels, or a stale batch after a large update, can cross it once with nothing broken. The run
stops when kl_k3 exceeds the limit on ``max_mismatch_kl_steps`` consecutive steps; a step at or under
it ends the streak. The streak is saved in every checkpoint, so a resumed run stops where an
uninterrupted one would.

The KL comes from the same forward pass as the step's update, so the stopping step's update is
already applied in the learner's memory; it is never synced to the engines, saved or exported,
because the run stops first. The streak's earlier updates were kept (and may be in a checkpoint):
the error names the last checkpoint from before the streak.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from rlhf.config.schema import AlgoConfig
from rlhf.learner.checkpoint import complete_checkpoints


class MismatchError(RuntimeError):
    """The engines' sampler and the learner disagreed on the policy beyond algo.max_mismatch_kl for
    algo.max_mismatch_kl_steps consecutive steps."""


@dataclass(frozen=True)
class MismatchWatch:
    """The run's record of steps above the limit (saved in checkpoints as ``mismatch``)."""

    # (step, kl_k3) of the consecutive steps above the limit that end at the last step seen.
    streak: tuple[tuple[int, float], ...] = ()
    # Steps above the limit in the whole run (a resumed run counts on from its checkpoint).
    violations: int = 0

    def after(self, step: int, kl: float | None, max_kl: float | None) -> MismatchWatch:
        """The record once ``step`` measured ``kl`` (None: not measured, or no limit: unchanged)."""
        if max_kl is None or kl is None:
            return self
        if kl <= max_kl:  # NaN is not <= anything: it counts as a violation
            return replace(self, streak=())
        return MismatchWatch(self.streak + ((step, kl),), self.violations + 1)

    def metrics(self) -> dict[str, float]:
        return {"mismatch/kl_violations": float(self.violations), "mismatch/kl_streak": float(len(self.streak))}

    def to_json(self) -> dict:
        return {"streak": [list(s) for s in self.streak], "violations": self.violations}

    @classmethod
    def from_json(cls, d: dict | None) -> MismatchWatch:
        """None: a checkpoint written before the watch was saved; it starts with no streak."""
        if d is None:
            return cls()
        return cls(tuple((int(step), float(kl)) for step, kl in d["streak"]), int(d["violations"]))


def check_mismatch(step: int, metrics: dict[str, float], watch: MismatchWatch, algo: AlgoConfig,
                   ckpt_dir: Path) -> MismatchWatch:
    """The watch after ``step``. Adds mismatch/kl_violations and mismatch/kl_streak to ``metrics``
    (with a limit set), prints a warning for a step above the limit and raises MismatchError when
    that makes ``algo.max_mismatch_kl_steps`` in a row."""
    if algo.max_mismatch_kl is None:
        return watch
    watch = watch.after(step, metrics.get("mismatch/kl_k3"), algo.max_mismatch_kl)
    metrics.update(watch.metrics())
    if not watch.streak or watch.streak[-1][0] != step:
        return watch
    if len(watch.streak) >= algo.max_mismatch_kl_steps:
        raise MismatchError(stop_message(step, metrics, watch, algo, ckpt_dir))
    print(f"warning: {figures(step, metrics, algo.max_mismatch_kl)} ({len(watch.streak)} of "
          f"algo.max_mismatch_kl_steps={algo.max_mismatch_kl_steps} consecutive steps stop the run)", flush=True)
    return watch


def figures(step: int, metrics: dict[str, float], max_kl: float) -> str:
    return (
        f"step {step}: mismatch/kl_k3={metrics['mismatch/kl_k3']:.3g} (sampler vs learner, per token) exceeds "
        f"algo.max_mismatch_kl={max_kl:g}; |log ratio| mean {metrics['mismatch/abs_logprob_diff_mean']:.3g}, "
        f"max {metrics['mismatch/abs_logprob_diff_max']:.3g}, "
        f"{metrics['mismatch/ratio_out_of_range_frac']:.1%} of tokens with a ratio outside [0.5, 2]"
    )


def what_to_change(staleness: float, correction: str) -> str:
    """The likely causes, each with the keys to look at, by whether the batch was stale."""
    in_step = ("check that the engines sample the policy the learner trains: the weight sync (sync/probe_gap), "
               "model.dtype (bf16 kernels differ between vLLM and the learner), rollout.temperature, "
               "rollout.top_k/top_p and rollout.logprobs_mode")
    if correction == "none":
        in_step += "; a gap that is only numerics is what a rollout_correction (e.g. rollout_correction=tis) is for"
    if staleness > 0:
        return (f"The batch is {staleness:g} update(s) old: the policy may have moved further in that many "
                "updates than a correction can bridge (lower learner.lr or trainer.max_staleness), or "
                f"{in_step}")
    return f"The batch is not stale, so {in_step}"


def stop_message(step: int, metrics: dict[str, float], watch: MismatchWatch, algo: AlgoConfig,
                 ckpt_dir: Path) -> str:
    first = watch.streak[0][0]
    kls = ", ".join(f"{kl:.3g}" for _, kl in watch.streak)
    before = [path for s, path in complete_checkpoints(ckpt_dir) if s < first]
    ckpt = (f"The last checkpoint from before step {first} is {before[-1]}" if before else
            f"No checkpoint from before step {first} is kept in {ckpt_dir} (trainer.save_every, trainer.keep_last)")
    return (
        f"{figures(step, metrics, algo.max_mismatch_kl)}, for {len(watch.streak)} consecutive steps "
        f"({first}-{step}: {kls}; algo.max_mismatch_kl_steps={algo.max_mismatch_kl_steps}). "
        f"{what_to_change(metrics.get('async/staleness', 0.0), algo.rollout_correction)}. "
        f"If this gap is expected (measured on a healthy run of this setup), raise algo.max_mismatch_kl or "
        f"algo.max_mismatch_kl_steps. Step {step}'s update was not synced or saved. {ckpt}"
    )
