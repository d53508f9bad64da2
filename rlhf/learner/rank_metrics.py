"""How ``train_step`` metrics combine: over one rank's micro-batches, then over the ranks.

The objective (rlhf/algo/grpo.py) reports each micro-batch's SHARE of a whole-mini-batch
value, so shares add up; the ratio extremes combine by max / min. A rank returns one
``RankMetrics`` across the Ray boundary; ``reduce_metrics`` turns the ranks' into step metrics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from rlhf.algo.grpo import MAX_METRICS, MIN_METRICS


@dataclass(frozen=True)
class RankMetrics:
    """One rank's metrics of one optimizer update, grouped by how they combine over ranks."""

    sums: dict[str, float]  # shares of whole-mini-batch values (loss, policy_loss, kl, clip_frac/*, ...): add
    maxs: dict[str, float]  # ratio/max: the largest
    mins: dict[str, float]  # ratio/min: the smallest
    tokens: float  # attention tokens of this rank's rows: add (tokens/s)
    seconds: float  # wall time inside the rank's train_step: the slowest rank's is the step's
    # The same on every rank (a global norm, one schedule, one skip decision): rank 0's are kept.
    grad_norm: float  # before clipping; NaN when DeepSpeed reports none
    lr: float  # the rate this update used
    skipped: bool  # a non-finite loss or gradient on any rank dropped the update

    @classmethod
    def from_micro_batches(
        cls,
        records: list[tuple[dict[str, float], float]],
        *,
        tokens: float,
        seconds: float,
        grad_norm: float,
        lr: float,
        skipped: bool,
    ) -> RankMetrics:
        """Fold (metrics, kept tokens) of each micro-batch. The objective's token shares of a
        micro-batch with no kept tokens are 0/0 (NaN x share 0): they carry no weight and are
        left out, except the loss, which is always a finite share."""
        sums: dict[str, float] = {}
        maxs: dict[str, float] = {}
        mins: dict[str, float] = {}
        for metrics, kept in records:
            for k, x in metrics.items():
                if k in MAX_METRICS:
                    if kept > 0:
                        maxs[k] = max(maxs.get(k, -math.inf), x)
                elif k in MIN_METRICS:
                    if kept > 0:
                        mins[k] = min(mins.get(k, math.inf), x)
                elif kept > 0 or k == "loss":
                    sums[k] = sums.get(k, 0.0) + x
                else:
                    sums.setdefault(k, 0.0)  # the key exists whatever the micro-batches held
        return cls(sums, maxs, mins, tokens, seconds, grad_norm, lr, skipped)

    @classmethod
    def combine(cls, ranks: list[RankMetrics]) -> RankMetrics:
        """The whole group's metrics: sums and tokens add, extremes and seconds take the extreme,
        grad_norm / lr / skipped are rank 0's. Ranks that disagree on skipped or lr have taken
        different updates, which would leave their weights apart: that raises."""
        if not ranks:
            raise ValueError("RankMetrics.combine: no ranks")
        first = ranks[0]
        for r, m in enumerate(ranks[1:], start=1):
            # grad_norm is not compared: it is NaN (never equal to itself) on a skipped update.
            if m.skipped != first.skipped or m.lr != first.lr:
                raise RuntimeError(
                    f"learner rank {r} took a different update from rank 0 (skipped {m.skipped} vs "
                    f"{first.skipped}, lr {m.lr} vs {first.lr})"
                )
        sums: dict[str, float] = {}
        maxs: dict[str, float] = {}
        mins: dict[str, float] = {}
        for m in ranks:
            for k, v in m.sums.items():
                sums[k] = sums.get(k, 0.0) + v
            for k, v in m.maxs.items():
                maxs[k] = max(maxs.get(k, -math.inf), v)
            for k, v in m.mins.items():
                mins[k] = min(mins.get(k, math.inf), v)
        return cls(
            sums, maxs, mins,
            tokens=sum(m.tokens for m in ranks),
            seconds=max(m.seconds for m in ranks),
            grad_norm=first.grad_norm, lr=first.lr, skipped=first.skipped,
        )

    def step_metrics(self, wall_s: float) -> dict[str, float]:
        """Flat metrics of the update; ``wall_s``: the caller's wall time around it (tokens/s).

        ``learner/step_s`` is the slowest rank's time inside train_step; ``wall_s`` minus it is
        the cost of the Ray calls and the batch transfer. (Not ``timing/...``: the trainer sums
        those into its step time, which already holds this update under ``timing/train``.)
        """
        return {
            **self.sums, **self.maxs, **self.mins,
            "grad_norm": self.grad_norm,
            "lr": self.lr,
            "skipped": float(self.skipped),
            "tokens/s": self.tokens / wall_s if wall_s > 0 else 0.0,
            "learner/step_s": self.seconds,
        }


def reduce_metrics(results: list[RankMetrics], wall_s: float) -> dict[str, float]:
    """The step metrics of one update from every rank's ``RankMetrics``."""
    return RankMetrics.combine(results).step_metrics(wall_s)
