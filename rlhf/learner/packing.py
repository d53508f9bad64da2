"""How a rank's rows become forward passes (pure tensor code, no model): micro-batches cut by a
token budget, and rows that share a prompt computing that prompt once.

Token budget. ``plan_micro_batches`` orders rows so that rows of one prompt are adjacent and long
rows go together, then closes a micro-batch before it would exceed ``max_rows`` rows or
``max_tokens`` computed positions (padding included: a pass computes every position of its
padded [rows, length] block). A single row longer than the budget runs alone. Ranks of one
learner must run alike (``PassPlan``), so ``LearnerGroup`` takes the largest count over the
ranks' plans and ``split_to`` splits the biggest micro-batches of the others until theirs match.

Padding. Each pass is a right-padded block with a 2D padding mask. Neither attention path skips
padded positions: transformers' SDPA attention on CPU, and on GPU (SDPA's memory-efficient kernel
with a mask), computes them and masks the scores. So padding is kept small by construction
instead: rows sorted by length and cut by the budget, and the shared prompt computed once rather
than padded into every row. (Padding-free packing needs flash-attention's variable-length kernels,
which do not exist on CPU.)

Shared prompts. The n samples of a group repeat one prompt. A shared micro-batch runs two passes:
the prefix pass computes each distinct prompt, minus its last token, once and keeps its KV cache;
the suffix pass runs every row's last prompt token and completion with position ids continuing
the prompt's, attending to its prompt's cached keys and values (``prefix_of``: an index_select of
the cache). The last prompt token moves to the suffix because its logits predict the first
completion token of each row. The index_select's backward sums the rows' gradients into the one
prefix pass, so log-probs and gradients equal the unshared path's up to float summation order
(tests/test_shared_prompt.py), as in Prefix Grouper (arXiv:2506.05433).

Sliding-window attention breaks this layout, so it is refused (``sliding_windows``; rlhf/validation.py
``check_model``). A sliding layer's cache keeps only the last window - 1 positions of the prefix
block, which is right-padded to the longest prompt: rows with shorter prompts lose their own keys
(and the mask measures the window in cache slots, not positions). Measured on a tiny Mistral with
a 4-token window: the rows of the longest prompt match the whole-row forward to 5e-8, the others
are off by ~0.2 in log-prob (tests/test_shared_prompt.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from rlhf.types import TrainBatch


@dataclass(frozen=True)
class MicroBatch:
    """One micro-batch: what the model runs and how its logits line up with the rows.

    The forward returns logits [B, S, V] aligned with ``view``, a TrainBatch whose per-token fields
    are the rows' positions ``cols`` [B, S] (``view.attention_mask`` marks real ones): the losses
    read ``view``; ``cols`` writes scored log-probs back to the rows' own positions.
    """

    rows: Tensor  # [B] rows of the rank's batch
    view: TrainBatch
    cols: Tensor  # [B, S] long
    input_ids: Tensor  # [B, T] what the (suffix) pass runs
    attention_mask: Tensor  # [B, T], or [B, Q + T] over the cached prefix and the suffix
    keep_from: int = 0  # logits of positions keep_from.. are returned (an unshared pass only)
    prefix_ids: Tensor | None = None  # [G, Q] distinct prompts minus their last token; None: unshared
    prefix_mask: Tensor | None = None  # [G, Q]
    prefix_of: Tensor | None = None  # [B] the prefix row each row attends to
    position_ids: Tensor | None = None  # [B, T] positions of the suffix pass

    @property
    def shared(self) -> bool:
        return self.prefix_ids is not None

    def computed_tokens(self) -> int:
        """Positions the passes compute, padding included."""
        n = self.input_ids.numel()
        return n + (self.prefix_ids.numel() if self.prefix_ids is not None else 0)


def prompt_lengths(batch: TrainBatch) -> Tensor:
    """[B]: the position of each row's first completion token (its whole length if it has none)."""
    has = batch.response_mask > 0
    lengths = batch.attention_mask.sum(dim=1)
    return torch.where(has.any(dim=1), has.float().argmax(dim=1), lengths)


def prompt_groups(batch: TrainBatch) -> list[list[int]]:
    """Rows that share an identical prompt, in order of first appearance."""
    plen = prompt_lengths(batch)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i in range(batch.size):
        groups.setdefault(tuple(batch.input_ids[i, : int(plen[i])].tolist()), []).append(i)
    return list(groups.values())


def _cost(prompts: dict[int, int], lengths: list[int], plens: list[int], share: bool) -> int:
    """Padded positions of a micro-batch: [rows, longest] unshared; shared, the distinct prompts'
    [G, longest prompt - 1] plus the rows' [B, longest completion + 1]."""
    if not share:
        return len(lengths) * max(lengths)
    suffix = max(n - p + 1 for n, p in zip(lengths, plens))
    return len(prompts) * max(p - 1 for p in prompts.values()) + len(lengths) * suffix


def plan_micro_batches(batch: TrainBatch, max_rows: int, max_tokens: int = 0, share: bool = False) -> list[Tensor]:
    """Row indices of each micro-batch: at most ``max_rows`` rows and, where ``max_tokens`` > 0,
    at most that many computed positions (``_cost``; a longer single row runs alone).

    Unshared, rows are sorted by length (longest first); shared, groups of one prompt stay
    adjacent, the groups with the longest rows first, so a group lands in one micro-batch
    whenever the budget allows.
    """
    if max_rows < 1:
        raise ValueError(f"max_rows={max_rows} must be >= 1")
    lengths = batch.attention_mask.sum(dim=1).tolist()
    plens = prompt_lengths(batch).tolist()
    if share:
        groups = prompt_groups(batch)
        for g in groups:
            g.sort(key=lambda i: -lengths[i])
        groups.sort(key=lambda g: -lengths[g[0]])
        order = [i for g in groups for i in g]
        key_of = {i: k for k, g in enumerate(groups) for i in g}
    else:
        order = sorted(range(batch.size), key=lambda i: -lengths[i])
        key_of = {i: i for i in order}
    plans: list[list[int]] = []
    current: list[int] = []
    for i in order:
        trial = current + [i]
        prompts = {key_of[j]: plens[j] for j in trial}
        cost = _cost(prompts, [lengths[j] for j in trial], [plens[j] for j in trial], share)
        over = max_tokens > 0 and cost > max_tokens
        if current and (len(trial) > max_rows or over):
            plans.append(current)
            trial = [i]
        current = trial
    if current:
        plans.append(current)
    return [torch.tensor(p, dtype=torch.long) for p in plans]


def split_to(plans: list[Tensor], count: int) -> list[Tensor]:
    """``plans`` split until there are ``count`` micro-batches: the one with most rows is halved
    each time (ties: the first). Raises when there are fewer rows than ``count``."""
    plans = list(plans)
    if count < len(plans):
        raise ValueError(f"cannot merge {len(plans)} micro-batches into {count}")
    while len(plans) < count:
        k = max(range(len(plans)), key=lambda j: (len(plans[j]), -j))
        if len(plans[k]) < 2:
            raise ValueError(f"{sum(len(p) for p in plans)} rows cannot make {count} micro-batches")
        half = (len(plans[k]) + 1) // 2
        plans[k : k + 1] = [plans[k][:half], plans[k][half:]]
    return plans


def unshared(batch: TrainBatch, rows: Tensor) -> MicroBatch:
    """The plain pass: rows cut to their longest, logits from the first position any loss reads."""
    mb = batch.select(rows)
    mb = mb.narrow(int(mb.attention_mask.sum(dim=1).max()))
    start = mb.loss_start()
    width = mb.input_ids.shape[1] - start
    cols = (start + torch.arange(width)).expand(len(rows), width)
    return MicroBatch(rows, mb.tail(start), cols, mb.input_ids, mb.attention_mask, keep_from=start)


def shared(batch: TrainBatch, rows: Tensor) -> MicroBatch:
    """The two-pass layout of the module docstring; every row's prompt must have >= 2 tokens."""
    mb = batch.select(rows)
    plens = prompt_lengths(mb)
    if int(plens.min()) < 2:
        raise ValueError("a shared-prompt pass needs prompts of at least 2 tokens")
    lengths = mb.attention_mask.sum(dim=1)
    groups = prompt_groups(mb)
    prefix_of = torch.empty(len(rows), dtype=torch.long)
    q = max(int(plens[g[0]]) - 1 for g in groups)
    prefix_ids = torch.zeros(len(groups), q, dtype=torch.long)
    prefix_mask = torch.zeros(len(groups), q, dtype=torch.long)
    for k, g in enumerate(groups):
        n = int(plens[g[0]]) - 1
        prefix_ids[k, :n] = mb.input_ids[g[0], :n]
        prefix_mask[k, :n] = 1
        prefix_of[g] = k
    width = int((lengths - plens).max()) + 1
    cols = (plens - 1)[:, None] + torch.arange(width)  # also the suffix's position ids
    valid = torch.arange(width)[None, :] < (lengths - plens + 1)[:, None]
    safe = cols.clamp(max=mb.input_ids.shape[1] - 1)

    def gather(t: Tensor) -> Tensor:  # the rows' own positions; 0 where a row has ended
        return torch.where(valid, t.gather(1, safe), torch.zeros((), dtype=t.dtype))

    view = mb.map_tokens(gather)
    return MicroBatch(
        rows, view, cols, view.input_ids,
        torch.cat([prefix_mask[prefix_of], valid.long()], dim=1),
        prefix_ids=prefix_ids, prefix_mask=prefix_mask, prefix_of=prefix_of, position_ids=cols,
    )


def sliding_windows(config) -> list[int]:
    """The window of every sliding-window attention layer an HF config declares (empty: none).

    Mistral-style configs slide every layer (``sliding_window``, no ``layer_types``); Gemma 2/3,
    gpt-oss and Qwen2 name each layer in ``layer_types`` ("sliding_attention" slides).
    """
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    window = getattr(config, "sliding_window", None)
    if not window:
        return []
    types = getattr(config, "layer_types", None)
    if types is None:
        return [int(window)] * int(config.num_hidden_layers)
    return [int(window) for t in types if t == "sliding_attention"]


def startup_probe(vocab: int) -> TrainBatch:
    """The learner's start-up check of the shared layout (rlhf/learner/rank.py): ragged prompts
    (12 and 7 tokens) and ragged completions (3, 2 and 3 tokens), 15 tokens at most. A 12-token
    prompt is longer than any window a short-context test model declares (4, 16), so a layout
    that mishandles a window fails here; rows stay within 16 tokens, so a model whose window
    covers every sequence (which ``check_model`` lets share) passes."""
    g = torch.Generator().manual_seed(0)
    long, short = torch.randint(0, vocab, (12,), generator=g), torch.randint(0, vocab, (7,), generator=g)
    rows = [(long, 3), (long, 2), (short, 3)]
    ids = torch.zeros(3, 15, dtype=torch.long)
    mask = torch.zeros_like(ids)
    response = torch.zeros(ids.shape)
    for i, (prompt, n) in enumerate(rows):
        p = len(prompt)
        ids[i, :p] = prompt
        ids[i, p : p + n] = torch.randint(0, vocab, (n,), generator=g)
        mask[i, : p + n] = 1
        response[i, p : p + n] = 1.0
    return TrainBatch(input_ids=ids, attention_mask=mask, response_mask=response, advantages=torch.zeros(3))


@dataclass(frozen=True)
class PassPlan:
    """What every rank runs in one learner call: ``count`` micro-batches, all two-pass (``share``)
    or all plain. Ranks must agree on both: ZeRO-3 gathers parameters inside every forward, and
    ZeRO-2 reduces gradient buckets in the order backward produces them, which follows the graph."""

    count: int
    share: bool


def plan_passes(shards: list[TrainBatch], max_rows: int, max_tokens: int, share: bool) -> PassPlan:
    """The plan for ranks holding ``shards``: the most micro-batches any rank's own plan needs, and
    sharing where it is on and every prompt has >= 2 tokens (one leaves nothing to cache)."""
    share = share and all(int(prompt_lengths(s).min()) >= 2 for s in shards if s.size)
    return PassPlan(max(len(plan_micro_batches(s, max_rows, max_tokens, share)) for s in shards), share)


def layout(batch: TrainBatch, rows: Tensor, share: bool) -> MicroBatch:
    """The two-pass layout where ``share``, the plain one otherwise (a two-pass micro-batch whose
    prompts all differ costs what the plain one does, and keeps the ranks' graphs alike)."""
    return shared(batch, rows) if share else unshared(batch, rows)


def micro_batches(batch: TrainBatch, max_rows: int, max_tokens: int = 0, share: bool = False,
                  plan: PassPlan | None = None) -> list[MicroBatch]:
    """The rank's micro-batches: planned, split up to the group's ``plan`` (None: this batch's
    own), laid out."""
    if plan is None:
        plan = plan_passes([batch], max_rows, max_tokens, share)
    plans = split_to(plan_micro_batches(batch, max_rows, max_tokens, plan.share), plan.count)
    return [layout(batch, rows, plan.share) for rows in plans]
