"""One DeepSpeed rank of the learner: the policy engine, the optional frozen reference, their RPCs.

``LearnerRank`` is a plain class. ``rlhf/learner/group.py`` runs one per rank as a Ray actor; the
GPU check (scripts/gpu_check.sh) runs the same class under torchrun. Every public method that
touches parameters is collective: all ranks must call it, with the same number of micro-batches.

Gradient bookkeeping. The objective (rlhf/algo/objectives.py) divides by token/sequence counts of the
WHOLE mini-batch, so the mini-batch loss is the plain SUM of micro-batch losses over all ranks.
DeepSpeed instead assumes means: ``engine.backward`` divides by gradient_accumulation_steps and
the data-parallel reduction averages over ranks. We therefore mark the accumulation boundary
ourselves, call ``backward(loss * world_size, scale_wrt_gas=False)``, and check the result
against a plain single-process torch step in tests/test_learner.py.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import time
from datetime import timedelta
from pathlib import Path

import torch

from rlhf import faults
from rlhf.cluster.node import NodeInfo, RankFiles, SharedPath
from rlhf.config import AlgoConfig, LearnerConfig, LoraConfig
from rlhf.console import redirect_output
from rlhf.learner.packing import MicroBatch, PassPlan, micro_batches
from rlhf.learner.rank_metrics import RankMetrics
from rlhf.learner.rendezvous import RendezvousPoint
from rlhf.types import SamplingSettings, TrainBatch

DS_TAG = "deepspeed"  # sub-folder of a checkpoint holding DeepSpeed's own files


def torch_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load_hf_model(model_path: str, dtype: str, trust_remote_code: bool) -> torch.nn.Module:
    """The causal LM from an HF folder: safetensors only (no pickled weights are ever read)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        model_path, dtype=torch_dtype(dtype), trust_remote_code=trust_remote_code, use_safetensors=True
    )
    model.config.use_cache = False  # training and scoring never reuse a KV cache
    return model


class LearnerRank:
    """Rank ``rank`` of ``world_size``, started in two phases: the constructor only records its
    settings; rank 0's ``rendezvous_point`` chooses where the group meets (its own node), and
    ``start(point)`` on every rank joins the process group there and builds the DeepSpeed engines."""

    def __init__(
        self,
        rank: int,
        world_size: int,
        cfg: LearnerConfig,
        algo: AlgoConfig,
        model_path: str,
        dtype: str,
        trust_remote_code: bool,
        total_updates: int,
        log_path: str | None = None,
        lora: LoraConfig | None = None,
        objective: str = "grpo",
        sampling: SamplingSettings = SamplingSettings(),
    ) -> None:
        """``lora``: model.lora (None or rank 0: full fine-tuning). ``objective``: the name of what
        ``train_step`` minimises (rlhf/algo/objectives.py). ``sampling``: what the engines sample
        with (rollout.*); log-probs are scored under its temperature, top-k and top-p."""
        if log_path is not None:  # this rank's log file; first, so DeepSpeed's import output lands there
            redirect_output(log_path)
        from rlhf.algo.objectives import OBJECTIVES
        from rlhf.learner.lora import check_lora
        from rlhf.learner.settings import check_sampling, check_settings

        check_settings(cfg, algo, dtype, total_updates, objective)
        self.objective = OBJECTIVES.get(objective)
        check_sampling(sampling)
        self.sampling = sampling
        self.lora = lora if lora is not None and lora.rank > 0 else None
        if self.lora is not None:
            check_lora(self.lora)
        self.rank, self.world_size, self.cfg, self.algo = rank, world_size, cfg, algo
        self._build = (model_path, dtype, trust_remote_code, total_updates)
        self._listener = None

    def rendezvous_point(self) -> RendezvousPoint:
        """Rank 0: where the ranks meet, on this rank's node (learner.master_addr overrides the
        address, learner.master_port the port); the port is bound and held until ``start``."""
        from rlhf.cluster.node import this_node
        from rlhf.learner.rendezvous import open_listener

        if self.rank != 0:
            raise RuntimeError(f"learner rank {self.rank} asked for the rendezvous point; rank 0 chooses it")
        addr = self.cfg.master_addr or this_node().ip
        self._listener = open_listener(addr, self.cfg.master_port)
        return RendezvousPoint(addr, self._listener.getsockname()[1])

    def start(self, point: RendezvousPoint) -> int:
        """Join the process group at ``point`` and build the engines; returns the rank."""
        import deepspeed
        from deepspeed.accelerator import get_accelerator

        from rlhf.learner.ds_config import optimizer_clips, policy_config, reference_config
        from rlhf.learner.optim import build_adamw, lr_factor
        from rlhf.learner.rendezvous import init_process_group

        cfg, algo = self.cfg, self.algo
        rank, world_size = self.rank, self.world_size
        model_path, dtype, trust_remote_code, total_updates = self._build
        os.environ.update(
            MASTER_ADDR=point.addr,
            MASTER_PORT=str(point.port),
            RANK=str(rank),
            WORLD_SIZE=str(world_size),
            LOCAL_RANK=os.environ.get("LOCAL_RANK", "0"),  # Ray gives each GPU actor its own device 0
        )
        # Ray sets OMP_NUM_THREADS=1 inside actors; the rank's compute threads are configured here.
        torch.set_num_threads(cfg.num_threads)
        # Our own store first, listening on the point's address only; DeepSpeed then finds the group ready.
        listener, self._listener = self._listener, None
        init_process_group(cfg.backend, point, rank, world_size, timedelta(seconds=cfg.timeout_s), listener)
        deepspeed.init_distributed(dist_backend=cfg.backend, timeout=timedelta(seconds=cfg.timeout_s))
        accel = get_accelerator()
        if accel.device_name() != "cpu":
            accel.set_device(int(os.environ["LOCAL_RANK"]))
            self.device = torch.device(accel.device_name(), int(os.environ["LOCAL_RANK"]))
        else:
            self.device = torch.device("cpu")

        model = load_hf_model(model_path, dtype, trust_remote_code)
        self.keeps_logits = "logits_to_keep" in inspect.signature(model.forward).parameters
        if cfg.gradient_checkpointing:
            # Non-reentrant checkpointing works with ZeRO-3's parameter hooks and frozen inputs.
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if self.lora is not None:  # adapters only require grad: the optimizer holds their state alone
            from rlhf.learner.lora import wrap

            model = wrap(model, self.lora, model_path)
        optimizer = build_adamw(model, cfg, fused=self.device.type == "cuda", checked=optimizer_clips(cfg, dtype))
        schedule = lr_factor(cfg.lr_schedule, cfg.warmup_steps, total_updates)
        self.engine, *_ = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            # A callable: DeepSpeed builds the scheduler on the optimizer it actually steps.
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule),
            config=policy_config(cfg, dtype, cfg.micro_batch_size),
        )
        self.ref_engine = None
        if algo.kl_coef > 0:
            ref = load_hf_model(model_path, dtype, trust_remote_code).eval().requires_grad_(False)
            self.ref_engine, *_ = deepspeed.initialize(
                model=ref, config=reference_config(cfg, dtype, cfg.micro_batch_size)
            )
        if cfg.share_prompt:
            self._check_shared_prompt(model_path, dtype)
        return rank

    @torch.no_grad()
    def _check_shared_prompt(self, model_path: str, dtype: str) -> None:
        """The two-pass layout must score what the plain pass scores on this model (a model whose
        attention ignores position_ids, the cache, or slides a window over it would not): ragged
        prompts and completions (packing.startup_probe), before any step. Collective under
        ZeRO-3 like every forward."""
        from rlhf.algo import token_logprobs
        from rlhf.learner.packing import layout, startup_probe

        probe = startup_probe(self.engine.module.config.vocab_size)
        self.engine.eval()
        got = []
        for share in (False, True):  # one micro-batch each, whatever the budget: the probe is 3 rows
            mb = layout(probe, torch.arange(probe.size), share)
            lp = token_logprobs(self._logits(self.engine, mb), mb.view.input_ids.to(self.device)).float().cpu()
            out, real = torch.zeros(probe.input_ids.shape), mb.view.response_mask > 0
            out[mb.rows[:, None].expand_as(mb.cols)[real], mb.cols[real]] = lp[real]  # the rows' own positions
            got.append(out)
        gap = float((got[0] - got[1]).abs().max())
        if not gap <= (1e-4 if dtype == "float32" else 5e-2):
            raise RuntimeError(
                f"learner.share_prompt=true: {model_path} scores a prompt-cached completion differently "
                f"from the plain forward (max |log-prob gap| {gap:.3g}); set learner.share_prompt=false"
            )

    # ----------------------------------------------------------------------------- log-probs
    def _logits(self, engine, mb: MicroBatch) -> torch.Tensor:
        """[B, S, V] logits aligned with ``mb.view`` (rlhf/learner/packing.py).

        Unshared: where the model takes ``logits_to_keep`` the output head runs on the positions a
        loss reads only (a prompt prefix costs neither the vocabulary projection nor its backward,
        ~15% of a step on SmolLM2). Shared: the prefix pass keeps its KV cache (and one position's
        logits), the cache is gathered per row, the suffix pass attends to it.
        """
        dev = self.device
        ids, mask = mb.input_ids.to(dev), mb.attention_mask.to(dev)
        if not mb.shared:
            if mb.keep_from and self.keeps_logits:
                return engine(input_ids=ids, attention_mask=mask, logits_to_keep=ids.shape[1] - mb.keep_from).logits
            return engine(input_ids=ids, attention_mask=mask).logits[:, mb.keep_from:]
        one = {"logits_to_keep": 1} if self.keeps_logits else {}
        cache = engine(input_ids=mb.prefix_ids.to(dev), attention_mask=mb.prefix_mask.to(dev),
                       use_cache=True, **one).past_key_values
        cache.reorder_cache(mb.prefix_of.to(dev))  # index_select: backward sums the rows' gradients
        return engine(input_ids=ids, attention_mask=mask, position_ids=mb.position_ids.to(dev),
                      past_key_values=cache, use_cache=True).logits

    def _micro_batches(self, batch: TrainBatch, plan: PassPlan | None) -> list[MicroBatch]:
        cfg = self.cfg
        return micro_batches(batch, cfg.micro_batch_size, cfg.max_tokens_per_micro_batch, cfg.share_prompt, plan)

    def _sampling(self, raw: bool = False) -> dict:
        """How log-probs are taken: the engines' sampling distribution (temperature, top-k, top-p),
        or ``raw`` logits at temperature 1 (the weight-sync probe, which vLLM scores raw)."""
        if raw:
            return {"temperature": 1.0}
        s = self.sampling
        return {"temperature": s.temperature, "top_k": s.top_k, "top_p": s.top_p}

    def _score(self, engine, batch: TrainBatch, sampling: dict, plan: PassPlan | None) -> torch.Tensor:
        return self._score_as(engine, batch, (sampling,), plan)[0]

    @torch.no_grad()
    def _score_as(self, engine, batch: TrainBatch, samplings: tuple[dict, ...],
                  plan: PassPlan | None) -> list[torch.Tensor]:
        """[B, L] log-probs under each of ``samplings``, all from one forward pass per micro-batch."""
        from rlhf.algo import token_logprobs

        engine.eval()
        outs = [torch.zeros(batch.input_ids.shape, dtype=torch.float32) for _ in samplings]
        for mb in self._micro_batches(batch, plan):
            logits, ids = self._logits(engine, mb), mb.view.input_ids.to(self.device)
            real = mb.view.attention_mask > 0  # positions before the view's hold 0, as position 0 does
            where = mb.rows[:, None].expand_as(mb.cols)[real], mb.cols[real]
            for out, sampling in zip(outs, samplings):
                out[where] = token_logprobs(logits, ids, **sampling).float().cpu()[real]
        return outs

    def compute_logprobs(self, batch: TrainBatch, raw: bool = False, plan: PassPlan | None = None) -> torch.Tensor:
        """[B, L] log-probs of ``batch``'s completion tokens under the current policy (no grad), of
        the distribution the engines sample from (``raw``: logits at temperature 1, the probe's).

        Prompt positions hold 0 (position 0 always does). ``plan``: the passes every rank runs,
        from LearnerGroup (rlhf/learner/packing.py); None: this batch's own.
        """
        return self._score(self.engine, batch, self._sampling(raw), plan)

    def compute_old_logprobs(self, batch: TrainBatch, plan: PassPlan | None = None) -> torch.Tensor:
        """[B, 2, L] from one forward pass: ``compute_logprobs``' (the importance ratio's) in [:, 0],
        the raw ones (temperature 1, untruncated: what on-policy distillation compares with the
        teacher's) in [:, 1]; rows first, so LearnerGroup concatenates the ranks' rows."""
        return torch.stack(self._score_as(self.engine, batch, (self._sampling(), self._sampling(raw=True)), plan), dim=1)

    def compute_ref_logprobs(self, batch: TrainBatch, plan: PassPlan | None = None) -> torch.Tensor:
        """[B, L] completion-token log-probs under the frozen reference model (built only when
        algo.kl_coef > 0); positions, distribution and ``plan`` as in ``compute_logprobs``."""
        if self.ref_engine is None:
            raise RuntimeError(f"no reference model: algo.kl_coef={self.algo.kl_coef} (it is loaded only when > 0)")
        return self._score(self.ref_engine, batch, self._sampling(), plan)

    # ----------------------------------------------------------------------------- training
    def train_step(self, batch: TrainBatch, total_tokens: float, total_seqs: float,
                   plan: PassPlan | None = None) -> RankMetrics:
        """One optimizer update from this rank's rows of a mini-batch, on the rank's objective
        (rlhf/algo/objectives.py).

        ``total_tokens`` / ``total_seqs`` are ``rlhf.algo.normalisers`` of the whole mini-batch (all
        ranks); ``plan`` the passes every rank runs (as in ``compute_logprobs``). A non-finite loss
        on any rank, or a non-finite gradient, skips the update on every rank (metric ``skipped`` =
        1): the last backward is multiplied by NaN everywhere so that DeepSpeed's own overflow check
        drops the gradients and the step identically on all ranks.
        With dropout in the model (``model.lora.dropout`` > 0), no ``old_logprobs`` and an objective
        that reads them, the pre-update log-probs come from a scoring pass without dropout
        (``has_dropout``), not from this update's noisy forward.
        Returns this rank's metrics; ``LearnerGroup`` combines the ranks' (``reduce_metrics``).
        """
        import torch.distributed as dist

        faults.stall("learner_stall")  # tests only: a rank that never answers
        step_start = time.perf_counter()
        lr = float(self.engine.get_lr()[0])  # the rate this update uses (the schedule steps after it)
        if self.objective.reads_pre_update and batch.old_logprobs is None and has_dropout(self.engine.module):
            # The objective would take this update's own forward, with dropout noise, as the
            # pre-update log-probs: the mismatch metrics, correction weights and distillation
            # advantage must see the policy the engines sample (no dropout), so score it first.
            if batch.teacher_logprobs is None:
                batch = dataclasses.replace(batch, old_logprobs=self._score(self.engine, batch, self._sampling(), plan))
            else:  # distillation's raw log-probs from the same pass
                old, raw = self._score_as(self.engine, batch, (self._sampling(), self._sampling(raw=True)), plan)
                batch = dataclasses.replace(batch, old_logprobs=old, old_raw_logprobs=raw)
        self.engine.train()
        micros = self._micro_batches(batch, plan)
        if not micros:
            raise ValueError(f"learner rank {self.rank} got an empty batch for train_step")
        records: list[tuple[dict[str, torch.Tensor], torch.Tensor]] = []
        bad = torch.zeros(1, device=self.device)  # 1 once this rank saw a non-finite loss
        for i, micro in enumerate(micros):
            last = i == len(micros) - 1
            self.engine.set_gradient_accumulation_boundary(last)
            logits = self._logits(self.engine, micro)
            mb = micro.view.to(self.device)  # every loss reads completion positions only
            loss, metrics = self.objective.loss(logits, mb, self.algo, self.sampling,
                                                total_tokens=total_tokens, total_seqs=total_seqs)
            if faults.active("nonfinite_loss", self.engine.global_steps + 1):  # tests only
                loss = loss * float("nan")
            bad = torch.maximum(bad, (~torch.isfinite(loss.detach())).float())
            if last:
                dist.all_reduce(bad)  # SUM over ranks: > 0 when any rank saw a non-finite loss
                # A constant factor (no grad through the flag): 1, or NaN to poison every gradient.
                loss = loss * torch.where(bad > 0, float("nan"), 1.0)[0]
            self.engine.backward(loss * self.world_size, scale_wrt_gas=False)
            records.append(({"loss": loss.detach(), **metrics}, _kept_tokens(mb)))
        self.engine.step()
        skipped = not self.engine.was_step_applied()
        grad_norm = self.engine.get_global_grad_norm()
        # Metrics leave the device only now, so no micro-batch waits on a host copy.
        return RankMetrics.from_micro_batches(
            [({k: float(v) for k, v in metrics.items()}, float(kept)) for metrics, kept in records],
            tokens=float(batch.attention_mask.sum()),
            seconds=time.perf_counter() - step_start,  # after the host copies: every kernel has run
            grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
            lr=lr,
            skipped=skipped,
        )

    # ----------------------------------------------------------------------------- weights out
    def write_weights(self, out_dir: str, include_tied_head: bool = True) -> tuple[list[str], int, float]:
        """Gather full parameters (collective under ZeRO-3) and write safetensors buckets from rank 0.

        Returns (paths, bytes, seconds); other ranks return ([], 0, seconds).
        """
        from rlhf.learner.weights import full_parameter_buckets, write_buckets

        start = time.perf_counter()
        buckets = full_parameter_buckets(
            self.engine.module, self.rank, self.cfg.sync_bucket_mb * 2**20, include_tied_head
        )
        paths, nbytes = write_buckets(buckets, Path(out_dir))
        return paths, nbytes, time.perf_counter() - start

    def merge_rounding(self):
        """LoRA: how much of the adapters' delta the merged weights round away (a MergeRounding of
        rlhf/learner/lora.py; None on ranks other than 0). Collective under ZeRO-3."""
        from rlhf.learner.lora import model_merge_rounding

        return model_merge_rounding(self.engine.module, self.rank)

    def export_hf(self, out_dir: str) -> int:
        """Write HF weight shards of the current policy into ``out_dir`` (rank 0); returns bytes.
        With LoRA they are the merged weights, and the PEFT adapter goes to ``<out_dir>/adapter``."""
        from rlhf.learner.lora import ADAPTER_DIR
        from rlhf.learner.weights import full_parameter_buckets, write_hf_weights

        nbytes = self._write_adapter(Path(out_dir) / ADAPTER_DIR) if self.lora is not None else 0
        buckets = full_parameter_buckets(
            self.engine.module, self.rank, self.cfg.sync_bucket_mb * 2**20, include_tied_head=False
        )
        if self.rank != 0:
            for _ in buckets:  # take part in the ZeRO-3 gathers
                pass
            return 0
        return nbytes + write_hf_weights(buckets, Path(out_dir))

    def write_adapter(self, out_dir: str) -> tuple[int, float]:
        """LoRA, adapter sync: the PEFT adapter folder (the export's) written by rank 0 into ``out_dir``
        for the engines' LoRA serving. Returns (bytes, seconds); other ranks (0, seconds). Collective
        under ZeRO-3."""
        start = time.perf_counter()
        nbytes = self._write_adapter(Path(out_dir))
        return nbytes, time.perf_counter() - start

    def _write_adapter(self, out_dir: Path) -> int:
        from rlhf.learner.lora import is_adapter, write_adapter
        from rlhf.learner.weights import gathered_parameters

        if self.lora is None:
            raise RuntimeError("write_adapter: this learner trains no LoRA adapter (model.lora.rank=0)")
        adapters = gathered_parameters(self.engine.module, self.rank, is_adapter)  # collective under ZeRO-3
        return write_adapter(self.engine.module, adapters, out_dir) if self.rank == 0 else 0

    # ----------------------------------------------------------------------------- checkpoints
    def save_checkpoint(self, ckpt_dir: str) -> RankFiles:
        """DeepSpeed's model, optimizer and LR-scheduler state into ``<ckpt_dir>/deepspeed``.

        Run state (step, RNG, data position, config) is written by rlhf/learner/checkpoint.py as JSON,
        never through DeepSpeed's pickled ``client_state``.
        """
        self.engine.save_checkpoint(ckpt_dir, tag=DS_TAG, client_state={}, save_latest=False)
        return self.shard_files(ckpt_dir)

    def shard_files(self, ckpt_dir: str) -> RankFiles:
        """This rank's part of a checkpoint as its node sees it: DeepSpeed names each rank's ZeRO
        partitions ``*zero_pp_rank_<r>_*``; rank 0 also writes the shared model states."""
        from rlhf.cluster.node import files_where, this_node

        def mine(name: str) -> bool:
            shared = self.rank == 0 and name.startswith("mp_rank_")
            return name.endswith(".pt") and (f"zero_pp_rank_{self.rank}_" in name or shared)

        return RankFiles(self.rank, this_node(), files_where(Path(ckpt_dir), mine))

    def load_checkpoint(self, ckpt_dir: str) -> None:
        from rlhf.learner.checkpoint import has_zero_partitions

        zero_files = has_zero_partitions(Path(ckpt_dir) / DS_TAG)
        if zero_files != (self.engine.zero_optimization_stage() > 0):
            # One fp32 rank runs without ZeRO (ds_config.zero_stage): the two layouts do not load
            # into each other, and DeepSpeed would fail on the optimizer state with no names.
            saved, runs = ("with", "without") if zero_files else ("without", "with")
            raise ValueError(
                f"{ckpt_dir} was saved {saved} ZeRO optimizer partitions, but this learner runs {runs} ZeRO "
                f"(learner.zero_stage={self.cfg.zero_stage}, learner.num_ranks={self.cfg.num_ranks}, "
                "model.dtype): resume with the learner settings that saved it"
            )
        path, _ = self.engine.load_checkpoint(
            ckpt_dir, tag=DS_TAG, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint under {ckpt_dir}/{DS_TAG}")

    # ----------------------------------------------------------------------------- inspection
    def full_state(self) -> dict[str, torch.Tensor]:
        """Every full parameter as a CPU fp32 tensor (rank 0; collective under ZeRO-3). For tests."""
        from rlhf.learner.weights import full_parameter_buckets

        out: dict[str, torch.Tensor] = {}
        for bucket in full_parameter_buckets(self.engine.module, self.rank, 2**62, False, torch.float32, copy=True):
            out.update(bucket)
        return out

    def raw_state(self) -> dict[str, torch.Tensor]:
        """Every parameter under the module's own names (with LoRA: peft's, base_layer weights and
        lora_A/lora_B apart), CPU fp32, rank 0; collective under ZeRO-3. For tests."""
        from rlhf.learner.weights import gathered_parameters

        return {k: v.float() for k, v in gathered_parameters(self.engine.module, self.rank, lambda _: True).items()}

    def optimizer_state(self) -> dict[str, torch.Tensor]:
        """This rank's fp32 master partitions and their AdamW state (step, exp_avg, exp_avg_sq); without
        ZeRO, every parameter and its state. For tests."""
        zero = self.engine.optimizer
        if self.engine.zero_optimization_stage() == 0:  # the torch optimizer, on the parameters themselves
            inner, masters = zero, [p for group in zero.param_groups for p in group["params"]]
        else:
            # ZeRO-3 keeps its flat fp32 partitions here (and empties the inner optimizer's
            # param_groups between steps); ZeRO-1/2 keep them in single_partition_of_fp32_groups.
            inner = zero.optimizer
            masters = getattr(zero, "fp32_partitioned_groups_flat", None) or zero.single_partition_of_fp32_groups
        out = {}
        for i, flat in enumerate(masters):
            out[f"{i}.master"] = flat.detach().float().cpu().clone()
            for k, v in inner.state.get(flat, {}).items():
                if torch.is_tensor(v):
                    out[f"{i}.{k}"] = v.detach().float().cpu().clone()
        return out

    def node(self) -> NodeInfo:
        """The node this rank runs on (placement checks, node-aware weight transport)."""
        from rlhf.cluster.node import this_node

        return this_node()

    def can_see(self, paths: list[SharedPath]) -> list[str]:
        """What this rank's node cannot see of the run's shared paths (rlhf/cluster/storage.py); empty: all."""
        from rlhf.cluster.node import unseen

        return unseen(paths)

    # ----------------------------------------------------------------------------- weight broadcast
    def open_weight_group(self) -> tuple[str, int, list]:
        """Prepare this rank's part of the broadcast transport (rlhf/learner/sync_broadcast.py).

        Rank 0 listens on its node's address, on a free port; returns (address, port, bucket layout
        as plain lists). Other ranks return ("", 0, []).
        """
        from rlhf.cluster.node import this_node
        from rlhf.learner.sync_broadcast import WeightSender
        from rlhf.sync_wire import to_wire

        ip = this_node().ip
        self._sender = WeightSender(self.engine.module, self.rank, self.cfg.backend,
                                    self.cfg.sync_bucket_mb * 2**20, self.cfg.timeout_s, ip)
        if self.rank != 0:
            return "", 0, []
        return ip, self._sender.port, to_wire(self._sender.layout)

    def join_weight_group(self, group) -> None:
        """Rank 0 joins the group (returns once every engine worker has); a no-op elsewhere."""
        self._sender.join(group)

    def broadcast_weights(self) -> tuple[int, float]:
        """Gather (collective under ZeRO-3) and broadcast from rank 0; returns (bytes sent, seconds)."""
        start = time.perf_counter()
        return self._sender.send(), time.perf_counter() - start

    def leave_weight_group(self) -> None:
        sender = self.__dict__.pop("_sender", None)
        if sender is not None:
            sender.close()

    def close(self) -> None:
        import torch.distributed as dist

        self.leave_weight_group()
        if dist.is_initialized():
            dist.destroy_process_group()


def has_dropout(model: torch.nn.Module) -> bool:
    """Whether a training forward of ``model`` is noisy: a dropout layer with p > 0 (peft's LoRA
    dropout is one), or attention dropout in the model's config."""
    layers = any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules())
    config = getattr(model, "config", None)
    return layers or float(getattr(config, "attention_dropout", 0.0) or 0.0) > 0


def _kept_tokens(mb: TrainBatch) -> torch.Tensor:
    mask = mb.response_mask
    if mb.sample_weight is not None:
        mask = mask * mb.sample_weight[:, None]
    return mask.sum()
