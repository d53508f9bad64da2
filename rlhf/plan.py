"""``plan=true``: the derived batch arithmetic, actor placement and a memory estimate, without weights."""

from __future__ import annotations

from dataclasses import dataclass

from rlhf.cluster.placement import NodeResources, PlacementPlan, first_fit, plan_placement
from rlhf.config import Config
from rlhf.config.batches import BatchPlan, total_updates
from rlhf.learner.ds_config import zero_stage

_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class MemoryEstimate:
    """Per learner rank and per engine, in GiB. Activations are not included (they depend on lengths)."""

    num_params: int
    policy_gib: float
    grads_gib: float
    optimizer_gib: float
    reference_gib: float
    kv_cache_gib: float

    @property
    def learner_rank_gib(self) -> float:
        return self.policy_gib + self.grads_gib + self.optimizer_gib + self.reference_gib


def count_params(model_path: str, trust_remote_code: bool) -> int:
    """Parameter count from the model's config alone: the model is built on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return sum(p.numel() for p in model.parameters())


def _zero(cfg: Config) -> str:
    """The requested ZeRO stage, and the one that runs where they differ (ds_config.zero_stage)."""
    runs = zero_stage(cfg.learner, cfg.model.dtype)
    if runs == cfg.learner.zero_stage:
        return f"ZeRO-{runs}"
    return f"ZeRO-{cfg.learner.zero_stage} (run without ZeRO: one fp32 rank has nothing to partition)"


def estimate_memory(cfg: Config, num_params: int) -> MemoryEstimate:
    """Textbook ZeRO arithmetic: stage 1 shards optimizer state, 2 also grads, 3 also params."""
    gib = 1024**3
    R, stage = cfg.learner.num_ranks, cfg.learner.zero_stage
    weight_bytes = _BYTES[cfg.model.dtype]
    # AdamW keeps two fp32 moments; with 16-bit weights it also keeps an fp32 master copy.
    opt_bytes = 8 + (4 if weight_bytes < 4 else 0)
    shard = lambda applies: R if applies else 1  # noqa: E731
    policy = num_params * weight_bytes / shard(stage >= 3)
    grads = num_params * weight_bytes / shard(stage >= 2)
    optim = 0.0 if cfg.learner.offload_optimizer else num_params * opt_bytes / shard(stage >= 1)
    ref = num_params * weight_bytes / shard(stage >= 3) if cfg.algo.kl_coef > 0 else 0.0
    return MemoryEstimate(
        num_params=num_params,
        policy_gib=policy / gib,
        grads_gib=grads / gib,
        optimizer_gib=optim / gib,
        reference_gib=ref / gib,
        kv_cache_gib=cfg.rollout.kv_cache_gb,
    )


def placement_lines(plan: PlacementPlan, nodes: list[NodeResources] | None) -> list[str]:
    """The bundles asked per group and their totals; with ``nodes``, where they would go on what
    the nodes have free now (first fit: Ray's scheduler makes its own choice)."""
    res = lambda b: ", ".join(f"{r} {v:g}" for r, v in b.resources().items())  # noqa: E731
    lines = [f"  placement group {g.name} ({g.strategy}): " + "; ".join(f"[{i}] {res(b)}" for i, b in enumerate(g.bundles))
             for g in plan.groups]
    lines.append("  asked in all: " + ", ".join(f"{r} {v:g}" for r, v in plan.totals().items()))
    if nodes is None:
        return lines + ["  (no Ray cluster reachable: set RAY_ADDRESS to see how the bundles map onto its nodes)"]
    fit = first_fit(plan, nodes)
    if fit is None:
        return lines + [f"  does NOT fit the {len(nodes)} node(s)' free resources now: "
                        + "; ".join(f"{n.ip} ({n.node_id[:12]}) CPU {n.available['CPU']:g} GPU {n.available['GPU']:g}"
                                    for n in nodes)]
    for k, n in enumerate(nodes):
        here = [f"{g}[{i}]" for (g, i), at in fit.items() if at == k]
        lines.append(f"  node {n.ip} ({n.node_id[:12]}, free CPU {n.available['CPU']:g} GPU "
                     f"{n.available['GPU']:g}): {', '.join(here) or '-'}")
    return lines


def _rollouts(cfg: Config) -> str:
    k = cfg.trainer.max_staleness
    when = "generated before each step's update" if k == 0 else f"generated up to {k} step(s) ahead"
    return f"{when}; correction {cfg.algo.rollout_correction}, max mismatch KL {cfg.algo.max_mismatch_kl}"


def describe(cfg: Config, batches: BatchPlan, memory: MemoryEstimate | None,
             nodes: list[NodeResources] | None = None) -> str:
    """``nodes``: the Ray cluster's nodes when one is reachable (placement per node), else None."""
    lines = [
        "Batch arithmetic",
        f"  prompts/step {batches.prompts_per_step} x samples/prompt {batches.samples_per_prompt}"
        f" = {batches.samples_per_step} samples/step",
        f"  {batches.mini_batches_per_step} optimizer update(s)/step of {batches.samples_per_mini_batch}"
        f" samples, x{cfg.algo.epochs_per_step} epoch(s)",
        f"  per rank: {batches.samples_per_rank} samples = {batches.grad_accum_steps} micro-batch(es)"
        f" of {batches.micro_batch_size}",
        f"  {total_updates(cfg)} optimizer updates in {cfg.trainer.steps} steps (the learning-rate schedule's length)",
        f"  rollouts: {_rollouts(cfg)}",
        "Placement",
        f"  {cfg.trainer.placement}: {cfg.rollout.num_engines} vLLM engine actor(s)"
        f" (tp={cfg.rollout.tensor_parallel_size}), {cfg.learner.num_ranks} DeepSpeed {_zero(cfg)}"
        f" rank actor(s) ({cfg.learner.backend}, {cfg.model.dtype})",
        f"  reference model: {'yes' if cfg.algo.kl_coef > 0 else 'no (algo.kl_coef=0)'}",
        *placement_lines(plan_placement(cfg.trainer.placement, cfg.learner, cfg.rollout), nodes),
    ]
    if memory is not None:
        lines += [
            f"Memory estimate (model of {memory.num_params / 1e6:.1f}M parameters, activations excluded)",
            f"  per learner rank: policy {memory.policy_gib:.2f} + grads {memory.grads_gib:.2f}"
            f" + optimizer {memory.optimizer_gib:.2f} + reference {memory.reference_gib:.2f}"
            f" = {memory.learner_rank_gib:.2f} GiB",
            f"  per engine: KV cache {memory.kv_cache_gib:.2f} GiB + weights"
            f" {memory.num_params * _BYTES[cfg.model.dtype] / 1024**3:.2f} GiB",
        ]
    return "\n".join(lines)
