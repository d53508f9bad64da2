"""Typed data that crosses module and Ray actor boundaries.

Conventions used everywhere:
- A *sequence* is prompt tokens followed by completion tokens, right-padded to a common length L.
- Per-token tensors are aligned with ``input_ids``: ``logprobs[b, t]`` is log p(input_ids[b, t] |
  input_ids[b, :t]) and position 0 holds 0. ``response_mask[b, t]`` is 1 where input_ids[b, t] is a
  completion token the policy chose, 0 on prompt tokens, padding and observation tokens (the
  tokens an environment appended between model turns; ``Completion.token_mask``).
- Completions of one prompt are contiguous: group g owns rows g*n .. g*n+n-1.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class SamplingSettings:
    """What the rollout engine samples with (maps onto vllm.SamplingParams)."""

    n: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1: disabled
    max_new_tokens: int = 64
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    # A JSON schema (as JSON text) every completion must match, enforced by vLLM's structured outputs
    # (a judge's response_format); None: free text. Never set for training rollouts: the learner
    # scores the unconstrained distribution.
    json_schema: str | None = None


@dataclass
class Segment:
    """An earlier training sample of an agent episode whose history was rewritten between calls
    (rollouts/gateway/): its own prompt and sampled tokens, trained with the episode's advantage."""

    prompt_ids: list[int]
    completion_ids: list[int]
    logprobs: list[float]  # sampler's on model tokens, 0.0 on appended (masked) tokens
    token_mask: list[int] | None = None  # as Completion.token_mask


@dataclass
class Completion:
    """One sampled completion of one prompt."""

    prompt_index: int  # index of its prompt in the request
    prompt_ids: list[int]
    completion_ids: list[int]
    logprobs: list[float]  # sampler's log-prob of each completion token, len == len(completion_ids)
    finish_reason: str  # "stop" (EOS or stop string) or "length" (hit max_new_tokens)
    text: str  # decoded completion
    # Learner updates applied to the weights that sampled it (trainer.max_staleness; -1: unknown).
    policy_version: int = -1
    # Per completion token: 1 where the policy chose it, 0 on an environment's observation tokens
    # (multi-turn rollouts, rollouts/env/); None: every token is the policy's (single turn).
    token_mask: list[int] | None = None
    # The teacher's log-prob of each completion token (on-policy distillation, rollouts/opd_teacher.py),
    # len == len(completion_ids); None: not scored by a teacher.
    teacher_logprobs: list[float] | None = None
    # An agent episode's earlier segments (history rewritten between its calls: rollouts/gateway/);
    # this completion is its last. Each is one more training row sharing this row's advantage.
    segments: list[Segment] = field(default_factory=list)

    def __post_init__(self) -> None:
        # From JSON (a checkpoint's pending batches) they arrive as dicts.
        self.segments = [s if isinstance(s, Segment) else Segment(**s) for s in self.segments]

    @property
    def sampled_tokens(self) -> int:
        """Tokens the engines sampled for it, its earlier segments' included (observations excluded)."""
        own = len(self.completion_ids) if self.token_mask is None else sum(self.token_mask)
        return own + sum(len(s.completion_ids) if s.token_mask is None else sum(s.token_mask) for s in self.segments)


@dataclass
class RolloutBatch:
    """Completions for a list of prompts, grouped: prompt i's n samples are rows i*n .. i*n+n-1."""

    completions: list[Completion]
    n: int
    generate_s: float = 0.0  # wall time of the generation call
    per_engine_s: list[float] = field(default_factory=list)

    @property
    def num_prompts(self) -> int:
        return len(self.completions) // self.n if self.n else 0

    @property
    def num_output_tokens(self) -> int:
        """Tokens the engines sampled (observation tokens of multi-turn completions excluded)."""
        return sum(c.sampled_tokens for c in self.completions)


@dataclass
class Scores:
    """Rewards of completions in rollout order (group g: rows g*n .. g*n+n-1): the weighted total,
    None where a weighted reward failed (rewards/runner.py's weighted_total), and every reward
    function's own values, weight 0 included. Crosses the producer's thread and checkpoints."""

    total: list[float | None]
    per_fn: dict[str, list[float | None]] = field(default_factory=dict)

    def rows(self, start: int, stop: int) -> Scores:
        """Completions start .. stop - 1 (a group: g*n, g*n + n)."""
        return Scores(self.total[start:stop], {k: v[start:stop] for k, v in self.per_fn.items()})

    @classmethod
    def concat(cls, parts: list[Scores]) -> Scores:
        """The parts one after another; they score with the same functions."""
        names = list(parts[0].per_fn) if parts else []
        for i, p in enumerate(parts):
            if list(p.per_fn) != names:
                raise ValueError(f"scores part {i} has the reward functions {list(p.per_fn)}, part 0 has {names}")
        return cls([t for p in parts for t in p.total], {k: [v for p in parts for v in p.per_fn[k]] for k in names})


@dataclass
class TrainBatch:
    """Padded tensors for one learner update. Shapes: B sequences, L tokens."""

    input_ids: torch.Tensor  # [B, L] long, right-padded
    attention_mask: torch.Tensor  # [B, L] long, 1 on real tokens
    response_mask: torch.Tensor  # [B, L] float, 1 on completion tokens
    advantages: torch.Tensor  # [B] float, one per sequence (broadcast over its tokens)
    old_logprobs: torch.Tensor | None = None  # [B, L] behaviour policy log-probs (None: on-policy)
    ref_logprobs: torch.Tensor | None = None  # [B, L] reference model log-probs (None: no KL)
    # [B, L] the sampler's (vLLM's processed) log-probs of the completion tokens, 0 elsewhere;
    # None: not measured or corrected (rlhf/algo/correction.py).
    sampler_logprobs: torch.Tensor | None = None
    # [B, L] the teacher's log-probs of the completion tokens, 0 elsewhere (on-policy distillation,
    # rlhf/algo/distill.py); None: no teacher.
    teacher_logprobs: torch.Tensor | None = None
    # [B, L] the pre-update policy's raw log-probs (temperature 1, untruncated, like the teacher's)
    # from the old-logprob pass: the student's side of on-policy distillation; None: the update's own.
    old_raw_logprobs: torch.Tensor | None = None
    # Per-sequence loss weight: 0 drops a sequence (e.g. its reward was None). [B] float.
    sample_weight: torch.Tensor | None = None

    @property
    def size(self) -> int:
        return self.input_ids.shape[0]

    def select(self, rows: slice | torch.Tensor) -> "TrainBatch":
        """Rows of this batch (a slice or an index tensor), same fields."""
        return self._apply(lambda t: t[rows], lambda t: t[rows])

    def narrow(self, length: int) -> "TrainBatch":
        """The first ``length`` positions of every per-token field (drops right padding)."""
        return self._apply(lambda t: t[:, :length], lambda t: t)

    def tail(self, start: int) -> "TrainBatch":
        """Positions ``start..`` of every per-token field (drops a prompt prefix no loss reads)."""
        return self._apply(lambda t: t[:, start:], lambda t: t)

    def map_tokens(self, fn) -> "TrainBatch":
        """``fn`` applied to every per-token field ([B, L] -> [B, L']); per-sequence fields kept."""
        return self._apply(fn, lambda t: t)

    def to(self, device: torch.device) -> "TrainBatch":
        """Every field on ``device``."""
        return self._apply(lambda t: t.to(device), lambda t: t.to(device))

    def loss_start(self) -> int:
        """First position whose logits any loss reads: the one predicting the earliest completion
        token (0 when a row has no completion token at all)."""
        has = self.response_mask > 0
        if not bool(has.any(dim=1).all()):
            return 0
        return max(int(has.float().argmax(dim=1).min()) - 1, 0)

    def _apply(self, per_token, per_seq) -> "TrainBatch":
        def maybe(fn, t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else fn(t)

        return TrainBatch(
            input_ids=per_token(self.input_ids),
            attention_mask=per_token(self.attention_mask),
            response_mask=per_token(self.response_mask),
            advantages=per_seq(self.advantages),
            old_logprobs=maybe(per_token, self.old_logprobs),
            ref_logprobs=maybe(per_token, self.ref_logprobs),
            sampler_logprobs=maybe(per_token, self.sampler_logprobs),
            teacher_logprobs=maybe(per_token, self.teacher_logprobs),
            old_raw_logprobs=maybe(per_token, self.old_raw_logprobs),
            sample_weight=maybe(per_seq, self.sample_weight),
        )


@dataclass
class SyncReport:
    """Outcome of one learner -> engines weight sync."""

    seconds: float  # total wall time: gather + send + load + probe
    num_bytes: int
    probe_gap: float  # max |engine probe log-prob - learner probe log-prob| over engines and tokens
    gather_s: float = 0.0  # files: gather + write; broadcast: gather + send + load (they overlap)
    load_s: float = 0.0  # files: the engines' reload; broadcast: the slowest engine's receive + reload
    transport: str = "files"  # "files", "broadcast" (learner.sync_transport, resolved) or "adapter" (LoRA)
    # LoRA: share of the adapters' changed elements that the merged weights round back to the base
    # weight (rlhf/learner/lora.py MergeRounding); None without LoRA, before the adapters move, or
    # with model.lora.sync=adapter (nothing is merged).
    lora_delta_lost: float | None = None

    @property
    def gb_per_s(self) -> float:
        return self.num_bytes / 1e9 / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class TensorSlot:
    """One weight's place in a flat broadcast bucket (rlhf/sync_wire.py)."""

    name: str  # HF name
    shape: tuple[int, ...]
    dtype: str  # torch dtype name: "float32", "bfloat16", ...
    offset: int  # bytes from the bucket's start

    @property
    def nbytes(self) -> int:
        import math

        return math.prod(self.shape) * getattr(torch, self.dtype).itemsize


@dataclass(frozen=True)
class WeightBucket:
    """The layout of one flat bucket: every slot, and the buffer's size in bytes (padding included)."""

    slots: tuple[TensorSlot, ...]
    nbytes: int


@dataclass(frozen=True)
class BroadcastGroup:
    """Where the weight broadcast group meets: learner rank 0 (group rank 0) hosts the store at
    addr:port on its node; engine e's worker w is group rank 1 + e * workers_per_engine + w."""

    backend: str  # "gloo" (CPU) or "nccl" (GPU): learner.backend
    addr: str  # learner rank 0's node address
    port: int
    world_size: int  # 1 + every engine worker
    workers_per_engine: int = 1  # names group ranks in errors (member)

    def member(self, rank: int) -> str:
        """Who group rank ``rank`` is, for errors."""
        if rank == 0:
            return "learner rank 0"
        e, w = divmod(rank - 1, self.workers_per_engine)
        return f"rollout engine {e} (worker {w}, group rank {rank})"


@dataclass(frozen=True)
class WeightEntry:
    """One tensor of the model as the engines and transformers name it (rlhf/learner/weights.py).

    ``params``: the parameters to gather before reading it (under ZeRO-3 they are whole only while
    gathered); the first one gives the shape and dtype. ``compute``: None when the tensor is
    ``params[0]`` itself, else how to build it from the gathered parameters (LoRA: the base weight
    merged with its adapter, rlhf/learner/lora.py).
    """

    name: str
    params: tuple[torch.nn.Parameter, ...]
    compute: Callable[[], torch.Tensor] | None = None
