"""One rollout engine: a vLLM engine hosted by a Ray actor (``ray.remote(RolloutEngine)``).

It samples completions of token-id prompts, receives new weights without a restart, from files or
from learner rank 0's broadcast (the worker side is ``rollouts.sync``), scores probe
sequences so the learner can check a sync, and sleeps/wakes where vLLM supports it (GPU). vLLM is imported inside the actor only, after
the actor's environment (``engine_env_vars``) is in place: vLLM reads its CPU settings at import.
"""

from __future__ import annotations

import gc
import logging
import os
import time
from pathlib import Path

from rlhf import faults
from rlhf.cluster.node import NodeInfo, SharedPath, this_node, unseen
from rlhf.config import EngineConfig, RolloutConfig
from rlhf.console import redirect_output
from rlhf.types import BroadcastGroup, Completion, RolloutBatch, SamplingSettings
from rollouts.requests import probe_params, to_sampling_params, validate_request

log = logging.getLogger(__name__)

WORKER_EXTENSION = "rollouts.sync.WeightSyncExtension"
_GiB = 1 << 30


def bound_cores(bind: str) -> list[int]:
    """The cores named by ``rollout.cpu_threads_bind``: "all", or vLLM's list syntax ("0-3,6";
    "|" separates tensor-parallel ranks' lists)."""
    if bind == "all":
        return list(range(os.cpu_count() or 1))
    cores: list[int] = []
    try:
        for part in bind.replace("|", ",").split(","):
            lo, _, hi = part.strip().partition("-")
            cores.extend(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise ValueError(
            f"rollout.cpu_threads_bind={bind!r}: expected 'all' or core ids like '0-3' or '0,2,4-7'"
        ) from None
    if not cores:
        raise ValueError(f"rollout.cpu_threads_bind={bind!r} names no cores")
    return cores


def engine_env_vars(cfg: EngineConfig) -> dict[str, str]:
    """Environment for an engine actor, set before vLLM is imported there.

    On CPU vLLM reserves a core for itself by default and computes on the rest (one of two here);
    reserving none and binding its OpenMP threads to every core doubles throughput. vLLM applies
    the bind only to the worker processes it spawns itself; with ``rollout.reproducible`` the engine
    core runs in the actor's process, where Ray's OMP_NUM_THREADS=1 would leave torch one thread
    (0.6x the throughput measured on 2 cores), so CPU engines set the thread count themselves.
    The variables are ignored by CUDA vLLM, and GPU engines keep Ray's single host thread.
    """
    cores = bound_cores(cfg.cpu_threads_bind)
    bind = cfg.cpu_threads_bind if cfg.cpu_threads_bind != "all" else f"0-{len(cores) - 1}"
    env = {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "VLLM_CPU_OMP_THREADS_BIND": bind}
    if cfg.num_gpus_per_engine == 0:
        env["OMP_NUM_THREADS"] = str(len(cores))
    if cfg.reproducible:
        # A separate engine-core process starts scheduling while requests still arrive, so the
        # batches (and which row draws which sampling noise) depend on timing.
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    return env


def llm_kwargs(
    cfg: EngineConfig, model_path: str, dtype: str, trust_remote_code: bool = False, engine_index: int = 0
) -> dict:
    """vllm.LLM arguments from the rollout config (shared with scripts/bench_rollout.py)."""
    return dict(
        model=model_path,
        dtype=dtype,
        trust_remote_code=trust_remote_code,
        max_model_len=cfg.max_model_len,
        # A byte budget works on CPU and GPU; VLLM_CPU_KVCACHE_SPACE takes whole GiB only.
        kv_cache_memory_bytes=None if cfg.kv_cache_gb is None else int(cfg.kv_cache_gb * _GiB),
        gpu_memory_utilization=cfg.gpu_memory_utilization,
        enforce_eager=cfg.enforce_eager,
        enable_prefix_caching=cfg.enable_prefix_caching,
        tensor_parallel_size=cfg.tensor_parallel_size,
        # Inside a placement group vLLM would pick its Ray executor and demand one bundle per GPU;
        # our engine's bundle holds all its GPUs, which its local worker processes share (rlhf/cluster/placement.py).
        distributed_executor_backend="mp" if cfg.tensor_parallel_size > 1 else None,
        # Distinct seeds so data-parallel engines do not draw the same random stream.
        seed=cfg.seed + engine_index,
        # Only the policy's sampled log-probs are read; a teacher's engines score prompts (always raw).
        logprobs_mode=cfg.logprobs_mode if isinstance(cfg, RolloutConfig) else "processed_logprobs",
        # Weights from safetensors only: "auto" would fall back to pickled .bin/.pt files.
        load_format="safetensors",
    )


def lora_kwargs(lora_rank: int) -> dict:
    """vllm.LLM arguments that serve one LoRA adapter of rank up to ``lora_rank``; none for 0."""
    if lora_rank == 0:
        return {}
    from rlhf.learner.lora import VLLM_LORA_RANKS

    if lora_rank not in VLLM_LORA_RANKS:
        raise ValueError(f"lora_rank={lora_rank} is not one of vLLM's max_lora_rank values {VLLM_LORA_RANKS}")
    # One adapter at a time: the policy's current one (the previous version is removed first).
    return dict(enable_lora=True, max_lora_rank=lora_rank, max_loras=1, max_cpu_loras=1)


def derive_seed(*parts: int) -> int:
    """A 32-bit seed mixed from integers, e.g. (rollout.seed, step, draw) or (seed, engine index)."""
    import numpy as np

    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def shutdown_llm(llm) -> None:
    """Stop a vllm.LLM's engine processes now; leaving it to interpreter exit aborts (code 134)."""
    llm.llm_engine.engine_core.shutdown()


class RolloutEngine:
    """Owns one ``vllm.LLM``. Methods are the actor's RPC surface; arguments are plain data."""

    def __init__(
        self,
        cfg: EngineConfig,
        model_path: str,
        dtype: str = "float32",
        trust_remote_code: bool = False,
        engine_index: int = 0,
        log_path: str | None = None,
        lora_rank: int = 0,
    ) -> None:
        """``log_path``: this engine's log file (vLLM's processes inherit it); None: output goes where
        Ray sends worker output (the driver's terminal by default). ``lora_rank`` > 0: serve the
        learner's LoRA adapter (model.lora.sync=adapter) up to that rank (``load_adapter``)."""
        if log_path is not None:  # first, so vLLM's import-time output lands in the file too
            redirect_output(log_path)
        from vllm import LLM
        from vllm.platforms import current_platform

        self.cfg = cfg
        self.engine_index = engine_index
        # vLLM refuses enable_sleep_mode where it has none (CPU); sleep() then reports False.
        # (a teacher's engines, an EngineConfig, never sleep: they score between the policy's phases)
        self.sleep_supported = (isinstance(cfg, RolloutConfig) and cfg.sleep_between_steps
                                and current_platform.is_sleep_mode_available())
        self.llm = LLM(
            **llm_kwargs(cfg, model_path, dtype, trust_remote_code, engine_index),
            enable_sleep_mode=self.sleep_supported,
            worker_extension_cls=WORKER_EXTENSION,
            **lora_kwargs(lora_rank),
        )
        # The adapter every generate and score call uses once the learner sent one; None: base model.
        self.lora_rank, self.lora_request, self.adapter_versions = lora_rank, None, 0

    def ready(self) -> int:
        """Returns the engine index once the engine is built (the actor's constructor has run)."""
        return self.engine_index

    def node(self) -> NodeInfo:
        """The node this engine's actor runs on (placement checks, node-aware weight transport)."""
        return this_node()

    def can_see(self, paths: list[SharedPath]) -> list[str]:
        """What this engine's node cannot see of the run's shared paths (rlhf/cluster/storage.py); empty: all."""
        return unseen(paths)

    def generate(
        self, prompt_ids: list[list[int]], sampling: SamplingSettings, seed: int | None = None
    ) -> RolloutBatch:
        """Sample ``sampling.n`` completions per prompt; prompt i owns rows i*n .. i*n+n-1.

        With ``seed``, the worker's generators are reset first, so the samples depend only on the
        seed, the weights and the prompts (not on what the engine generated before).
        """
        validate_request(prompt_ids, sampling, self.cfg.max_model_len)
        faults.stall("engine_stall")  # tests only: a hung generate, for the group's deadline
        prompts = [{"prompt_token_ids": ids} for ids in prompt_ids]
        if seed is not None:
            self.llm.collective_rpc("reseed", args=(derive_seed(seed, self.engine_index),))
        start = time.perf_counter()
        outputs = self.llm.generate(prompts, to_sampling_params(sampling), use_tqdm=False,
                                    lora_request=self.lora_request)
        seconds = time.perf_counter() - start
        completions = []
        for i, (ids, out) in enumerate(zip(prompt_ids, outputs, strict=True)):
            if len(out.outputs) != sampling.n:
                raise RuntimeError(
                    f"engine {self.engine_index}: prompt {i} got {len(out.outputs)} samples, "
                    f"asked for {sampling.n}"
                )
            for sample in out.outputs:
                completions.append(_completion(i, ids, sample, self.engine_index))
        return RolloutBatch(completions=completions, n=sampling.n, generate_s=seconds, per_engine_s=[seconds])

    def load_weights(self, paths: list[str]) -> float:
        """Load the tensors in these safetensors files into the running model; returns seconds."""
        for path in paths:
            if not Path(path).is_file():
                raise FileNotFoundError(f"engine {self.engine_index}: weight file {path} does not exist")
        start = time.perf_counter()
        loaded = self.llm.collective_rpc("load_weights_from_files", args=(list(paths),))
        if not all(loaded):  # one count per worker; 0 means the files held no tensors
            raise ValueError(f"engine {self.engine_index}: weight files {paths} hold no tensors")
        self._after_reload()
        return time.perf_counter() - start

    def load_adapter(self, path: str) -> float:
        """Serve the PEFT adapter folder ``path`` (model.lora.sync=adapter) in every later generate and
        score call, in place of the one before; returns seconds. The adapter is loaded now (the
        learner deletes the folder afterwards), under a fresh id: vLLM caches adapters by id, and
        would otherwise keep serving the old one."""
        from vllm.lora.request import LoRARequest

        from rlhf.learner.lora import adapter_load_error

        if self.lora_rank == 0:
            raise RuntimeError(f"engine {self.engine_index}: load_adapter on an engine started without LoRA")
        start = time.perf_counter()
        self.adapter_versions += 1
        new = LoRARequest(f"policy-{self.adapter_versions}", self.adapter_versions, path)
        if self.lora_request is not None:  # max_loras=1: the old one leaves first
            self.llm.llm_engine.remove_lora(self.lora_request.lora_int_id)
            self.lora_request = None
        try:
            self.llm.llm_engine.add_lora(new)
        except Exception as err:  # vLLM's own refusal (layers it cannot adapt, a bad folder), named
            raise adapter_load_error(err, self.engine_index, path) from err
        self.lora_request = new
        self._after_reload()
        return time.perf_counter() - start

    def _after_reload(self) -> None:
        # KV blocks computed with the old weights must not be served from the prefix cache.
        if not self.llm.reset_prefix_cache():
            raise RuntimeError(f"engine {self.engine_index}: prefix cache not reset (requests running)")

    def join_weight_group(self, group: BroadcastGroup, first_rank: int, layout: list) -> list[int]:
        """Every worker of this engine joins learner rank 0's broadcast group (the broadcast weight
        transport, rollouts/sync.py) as ranks first_rank, first_rank + 1, ...; ``layout``:
        the bucket layout as plain lists (rlhf/sync_wire.py). Returns the workers' group ranks."""
        fields = [group.backend, group.addr, group.port, group.world_size, group.workers_per_engine]
        args = (fields, first_rank, this_node().ip, layout, self.cfg.timeout_s)
        return self.llm.collective_rpc("join_weight_group", timeout=self.cfg.timeout_s, args=args)

    def receive_weights(self) -> float:
        """Receive learner rank 0's broadcast into the running model; returns seconds."""
        start = time.perf_counter()
        loaded = self.llm.collective_rpc("receive_weights_broadcast", timeout=self.cfg.timeout_s)
        if not all(loaded):
            raise ValueError(f"engine {self.engine_index}: the weight broadcast held no tensors")
        self._after_reload()
        return time.perf_counter() - start

    def leave_weight_group(self) -> None:
        self.llm.collective_rpc("leave_weight_group", timeout=self.cfg.timeout_s)

    def probe_logprobs(self, token_ids: list[int]) -> list[float]:
        """log p(token_t | tokens before t) for every t, element 0 = 0.0 (rlhf.types' convention)."""
        if len(token_ids) < 2:
            raise ValueError(f"probe token_ids has {len(token_ids)} tokens; need at least 2")
        return [0.0] + self.score_tokens([token_ids], [1])[0]

    def score_tokens(self, sequences: list[list[int]], starts: list[int]) -> list[list[float]]:
        """log p(seq[t] | seq[:t]) for t = starts[i] .. len(seq) - 1 of every sequence, at temperature
        1, in one batched prefill (vLLM's prompt log-probs): how a teacher scores a student's tokens."""
        if len(starts) != len(sequences):
            raise ValueError(f"{len(starts)} starts for {len(sequences)} sequences")
        for i, (seq, start) in enumerate(zip(sequences, starts)):
            if not 1 <= start <= len(seq):
                raise ValueError(f"sequence {i}: start {start} is outside 1..{len(seq)} (position 0 has no prefix)")
        validate_request(sequences, SamplingSettings(n=1, max_new_tokens=1), self.cfg.max_model_len)
        outs = self.llm.generate([{"prompt_token_ids": s} for s in sequences], probe_params(), use_tqdm=False,
                                 lora_request=self.lora_request)
        # prompt_logprobs[0] is None (the first token has no prefix); entry t maps token -> Logprob.
        return [[out.prompt_logprobs[t][seq[t]].logprob for t in range(start, len(seq))]
                for seq, start, out in zip(sequences, starts, outs, strict=True)]

    def sleep(self) -> bool:
        """Release KV cache (and weights, level 2) between generation phases. False: unsupported."""
        if not self.sleep_supported:
            log.info("engine %d: sleep mode unsupported (CPU) or off; stays awake", self.engine_index)
            return False
        self.llm.sleep(level=self.cfg.sleep_level)
        return True

    def wake_up(self) -> bool:
        """Regain the memory released by sleep(). False: sleep mode unsupported or disabled."""
        if not self.sleep_supported:
            return False
        self.llm.wake_up()
        self.llm.reset_prefix_cache()
        return True

    def shutdown(self) -> None:
        """Stop the engine processes now (safe to call twice)."""
        llm = self.__dict__.pop("llm", None)
        if llm is not None:
            shutdown_llm(llm)
            del llm
            gc.collect()


def _completion(prompt_index: int, prompt_ids: list[int], sample, engine_index: int) -> Completion:
    """Our Completion from one vLLM CompletionOutput."""
    if sample.finish_reason not in ("stop", "length"):
        raise RuntimeError(
            f"engine {engine_index}: prompt {prompt_index} finished with {sample.finish_reason!r}"
        )
    token_ids = list(sample.token_ids)
    # logprobs=0: each position's dict holds exactly the sampled token's entry.
    logprobs = [step[tok].logprob for tok, step in zip(token_ids, sample.logprobs, strict=True)]
    return Completion(
        prompt_index=prompt_index,
        prompt_ids=list(prompt_ids),
        completion_ids=token_ids,
        logprobs=logprobs,
        finish_reason=sample.finish_reason,
        text=sample.text,
    )
