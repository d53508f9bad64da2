"""From scored rollouts to the learner's padded TrainBatch (pure functions, no model); the reward
functions' inputs are rlhf/experience/scoring.py's."""

from __future__ import annotations

import math

import torch

from rlhf.types import Completion, RolloutBatch, TrainBatch


def rewards_matrix(total: list[float | None], n: int) -> torch.Tensor:
    """Flat per-completion rewards (None for a failed reward) as [G, n] with NaN for None."""
    if len(total) % n:
        raise ValueError(f"{len(total)} rewards do not split into groups of n={n}")
    values = [math.nan if r is None else float(r) for r in total]
    return torch.tensor(values, dtype=torch.float32).view(-1, n)


def pad_sequences(
    seqs: list[list[int]], prompt_lens: list[int], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[B, L] right-padded input_ids, attention_mask and response_mask (1 from each row's
    ``prompt_lens[i]`` to its end) of token sequences."""
    B, L = len(seqs), max(len(s) for s in seqs)
    input_ids = torch.full((B, L), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, L), dtype=torch.long)
    response_mask = torch.zeros((B, L), dtype=torch.float32)
    for i, (s, p) in enumerate(zip(seqs, prompt_lens, strict=True)):
        input_ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        attention_mask[i, : len(s)] = 1
        response_mask[i, p : len(s)] = 1.0
    return input_ids, attention_mask, response_mask


def build_train_batch(
    rollouts: RolloutBatch, advantages: torch.Tensor, rewards: torch.Tensor, pad_id: int, row_multiple: int = 1
) -> TrainBatch:
    """Pad prompt+completion sequences to one length; rows follow the rollout order. A completion's
    ``token_mask`` (multi-turn) zeroes response_mask and sampler log-probs on observation tokens.
    Teacher log-probs (on-policy distillation) are placed like the sampler's: every completion
    carries them, or none does.

    An agent episode's earlier ``segments`` (its history was rewritten between calls) are rows of
    their own just before it, each with its advantage and weight (step-wise: one reward for the
    whole episode). Then, only when segments made the row count uneven, rows of weight 0 (copies of
    the shortest row) pad it to a multiple of ``row_multiple`` (mini-batches x learner ranks).

    advantages, rewards: [G, n] (rewards NaN where the reward failed: such rows get weight 0).
    """
    completions = rollouts.completions
    if advantages.numel() != len(completions):
        raise ValueError(f"{advantages.numel()} advantages for {len(completions)} completions")
    if any(c.segments for c in completions):
        if any(c.teacher_logprobs is not None for c in completions):
            raise ValueError("agent episodes with several segments cannot be scored by a teacher (algo.distill_coef)")
        completions, owner = _segment_rows(completions)
        advantages, rewards = advantages.reshape(-1)[owner], rewards.reshape(-1)[owner]
        if pad := -len(completions) % row_multiple:
            shortest = min(range(len(completions)), key=lambda i: len(completions[i].completion_ids))
            completions = completions + [completions[shortest]] * pad
            advantages = torch.cat([advantages, torch.zeros(pad)])
            rewards = torch.cat([rewards, torch.full((pad,), math.nan)])
    input_ids, attention_mask, response_mask = pad_sequences(
        [c.prompt_ids + c.completion_ids for c in completions], [len(c.prompt_ids) for c in completions], pad_id
    )
    sampler = torch.zeros(input_ids.shape, dtype=torch.float32)
    scored = [c.teacher_logprobs is not None for c in completions]
    if any(scored) and not all(scored):
        raise ValueError(f"completion {scored.index(False)} has no teacher log-probs, but others do")
    teacher = torch.zeros(input_ids.shape, dtype=torch.float32) if all(scored) else None
    for i, c in enumerate(completions):
        if len(c.logprobs) != len(c.completion_ids):
            raise ValueError(
                f"completion {i} has {len(c.logprobs)} sampler log-probs for {len(c.completion_ids)} tokens"
            )
        p = len(c.prompt_ids)
        sampler[i, p : p + len(c.completion_ids)] = torch.tensor(c.logprobs, dtype=torch.float32)
        if teacher is not None:
            if len(c.teacher_logprobs) != len(c.completion_ids):
                raise ValueError(f"completion {i} has {len(c.teacher_logprobs)} teacher log-probs for "
                                 f"{len(c.completion_ids)} tokens")
            teacher[i, p : p + len(c.completion_ids)] = torch.tensor(c.teacher_logprobs, dtype=torch.float32)
        if c.token_mask is not None:  # observation tokens (multi-turn) carry no loss
            if len(c.token_mask) != len(c.completion_ids):
                raise ValueError(f"completion {i} has a token_mask of {len(c.token_mask)} for "
                                 f"{len(c.completion_ids)} tokens")
            if not c.token_mask or c.token_mask[0] != 1:
                # The learner takes the prompt to end before the first loss token (packing.py).
                raise ValueError(f"completion {i}: its first token must be the model's (token_mask[0] == 1)")
            mask = torch.tensor(c.token_mask, dtype=torch.float32)
            response_mask[i, p : p + len(c.completion_ids)] = mask
            sampler[i, p : p + len(c.completion_ids)] *= mask
            if teacher is not None:
                teacher[i, p : p + len(c.completion_ids)] *= mask
    return TrainBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        response_mask=response_mask,
        advantages=advantages.reshape(-1).to(torch.float32),
        sampler_logprobs=sampler,
        teacher_logprobs=teacher,
        sample_weight=(~torch.isnan(rewards.reshape(-1))).to(torch.float32),
    )


def _segment_rows(completions: list[Completion]) -> tuple[list[Completion], torch.Tensor]:
    """Each completion's earlier segments as completions of their own, just before it, and for
    every row the index of the completion (episode) it belongs to."""
    rows: list[Completion] = []
    owner: list[int] = []
    for i, c in enumerate(completions):
        for s in c.segments:
            rows.append(Completion(prompt_index=c.prompt_index, prompt_ids=s.prompt_ids, completion_ids=s.completion_ids,
                                   logprobs=s.logprobs, finish_reason="stop", text="", policy_version=c.policy_version,
                                   token_mask=s.token_mask))
            owner.append(i)
        rows.append(c)
        owner.append(i)
    return rows, torch.tensor(owner, dtype=torch.long)


def mini_batches(batch: TrainBatch, count: int, seed: int) -> list[TrainBatch]:
    """Split a step's batch into ``count`` equal mini-batches after a seeded shuffle of rows.

    Shuffling mixes groups across mini-batches so each optimizer update sees many prompts.
    """
    if batch.size % count:
        raise ValueError(f"batch of {batch.size} rows does not split into {count} mini-batches")
    if count == 1:
        return [batch]
    order = torch.randperm(batch.size, generator=torch.Generator().manual_seed(seed))
    size = batch.size // count
    return [batch.select(order[i * size : (i + 1) * size]) for i in range(count)]

