"""The learner as a group of Ray actors, one DeepSpeed rank each, and the sending half of weight sync.

The group splits every batch evenly across ranks, fans calls out, and waits with a deadline: a rank
that dies or stalls raises ``LearnerError`` naming the rank and the stage instead of hanging the run.

Weight sync: every rank takes part in gathering full parameters (ZeRO-3 gathers are collective);
rank 0 sends them over the transport of ``learner.sync_transport`` (rlhf/learner/sync.py:
files in /dev/shm on one node, or a broadcast group that reaches any node), and a probe sequence
scored by the learner and by every engine must agree within the tolerance.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch

from rlhf import faults
from rlhf.config import AlgoConfig, LearnerConfig, LoraConfig
from rlhf.console import log_file
from rlhf.learner.packing import PassPlan, plan_passes
from rlhf.learner.rank import LearnerRank
from rlhf.learner.rank_metrics import reduce_metrics
from rlhf.learner.rendezvous import RendezvousPoint
from rlhf.learner.settings import check_sampling, check_settings
from rlhf.learner.sync import Engines
from rlhf.learner.waiting import wait_named
from rlhf.types import SamplingSettings, SyncReport, TrainBatch

if TYPE_CHECKING:  # Ray is imported where it is used
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy


class LearnerError(RuntimeError):
    """A learner rank died, failed or stalled; the message names the rank and the stage."""


class WeightSyncError(RuntimeError):
    """After a sync, an engine's probe log-probs differ from the learner's by more than the tolerance."""


def wait_ranks(stage: str, refs: list, timeout_s: float) -> list[Any]:
    """Results of one call per rank, in rank order, within ``timeout_s`` seconds; the first rank to
    fail or die is named as soon as it does, else the ranks still running at the deadline."""
    return wait_named(stage, [(f"learner rank {r}", ref, timeout_s) for r, ref in enumerate(refs)], LearnerError)


class LearnerGroup:
    """``cfg.num_ranks`` LearnerRank actors forming one DeepSpeed data-parallel group."""

    def __init__(
        self,
        cfg: LearnerConfig,
        algo: AlgoConfig,
        model_path: str,
        dtype: str,
        trust_remote_code: bool,
        total_updates: int,
        logs: Path | None = None,
        placement: Sequence[PlacementGroupSchedulingStrategy] | None = None,
        lora: LoraConfig | None = None,
        objective: str = "grpo",
        sampling: SamplingSettings = SamplingSettings(),
    ) -> None:
        """``logs``: a folder where rank r writes its output, learner-rank-r.log (None: Ray's worker output).
        ``placement``: one scheduling strategy per rank (rlhf/cluster/placement.py's ``Placement.learner``);
        None: Ray places the ranks wherever their resources are free. ``lora``: model.lora (None or
        rank 0: full fine-tuning; rlhf/learner/lora.py). ``objective``: what every ``train_step`` minimises,
        a name in rlhf/algo/objectives.py: "grpo" (the algo config's policy objective) or "sft"
        (completion-token cross-entropy; metrics: loss, grad_norm, lr, tokens/s, learner/step_s,
        skipped). ``sampling``: what the engines sample with (rollout.*): log-probs are scored under
        its temperature, top-k and top-p, the distribution the tokens were drawn from."""
        from rlhf.learner.lora import check_lora, sync_mode

        check_settings(cfg, algo, dtype, total_updates, objective)
        check_sampling(sampling)
        if lora is not None:
            check_lora(lora)
        if placement is not None and len(placement) != cfg.num_ranks:
            raise ValueError(f"placement has {len(placement)} slots for learner.num_ranks={cfg.num_ranks}")
        self.cfg, self.algo, self.model_path, self.dtype = cfg, algo, model_path, dtype
        self.lora = lora if lora is not None and lora.rank > 0 else None
        self.lora_sync = sync_mode(self.lora, dtype)  # "merged", "adapter", or None (no LoRA)
        self._warned_rounding = False
        self.trust_remote_code = trust_remote_code
        # What every rank is started with, again on a restart.
        self.total_updates, self.logs, self.objective, self.sampling = total_updates, logs, objective, sampling
        self.placement = placement
        self._start_ranks()

    def _start_ranks(self) -> None:
        import ray

        cfg, placement = self.cfg, self.placement
        # Ray's CPU counts are bookkeeping, not pinning: fractional requests let ranks and engines
        # share one machine and take turns; each rank sets its own thread count.
        actor = ray.remote(LearnerRank)
        options = dict(
            num_cpus=cfg.num_cpus_per_rank,
            num_gpus=cfg.num_gpus_per_rank,
            max_concurrency=1,
            runtime_env={"env_vars": {"OMP_NUM_THREADS": str(cfg.num_threads), **faults.env()}},
        )
        where = [{} if placement is None else {"scheduling_strategy": placement[r]} for r in range(cfg.num_ranks)]
        self.ranks = [
            actor.options(**options, **where[r]).remote(r, cfg.num_ranks, cfg, self.algo, self.model_path, self.dtype,
                                                        self.trust_remote_code, self.total_updates,
                                                        log_file(self.logs, f"learner-rank-{r}"), self.lora,
                                                        self.objective, self.sampling)
            for r in range(cfg.num_ranks)
        ]
        try:
            # Two phases: rank 0 chooses the point on its own node, then every rank joins there.
            self.rendezvous: RendezvousPoint = wait_ranks("rendezvous", [self.ranks[0].rendezvous_point.remote()],
                                                          cfg.timeout_s)[0]
            self._call("start-up", "start", None, self.rendezvous)
        except BaseException:
            self.shutdown()
            raise

    def restart(self) -> None:
        """Replace every rank by a fresh one in the same placement slot, holding the start weights
        (a checkpoint loads after): ZeRO's shards cannot be rebuilt from the surviving ranks. The
        old ranks are killed and gone first, so that their bundles are free; the weight transport
        is left (best effort: rank 0 may be dead) and the next ``connect`` forms a new one."""
        from rlhf.cluster.actors import kill_and_wait

        still = kill_and_wait(self.ranks)
        try:
            self._close_transport()
        except Exception as e:  # noqa: BLE001 - the old group is abandoned either way
            print(f"warning: leaving the old weight group failed ({type(e).__name__}: {e}); a new one is formed",
                  flush=True)
        if still:
            raise LearnerError(f"restart: learner rank(s) {still} still answer 30 s after being killed; their "
                               "placement slots are not free")
        self._start_ranks()

    # ----------------------------------------------------------------------------- fan-out
    def _call(self, stage: str, method: str, per_rank_args: list[tuple] | None = None, *args: Any) -> list[Any]:
        refs = [
            getattr(a, method).remote(*(per_rank_args[r] if per_rank_args else args))
            for r, a in enumerate(self.ranks)
        ]
        return wait_ranks(stage, refs, self.cfg.timeout_s)

    def _shards(self, batch: TrainBatch) -> tuple[list[TrainBatch], PassPlan]:
        """Each rank's rows, and the passes every rank runs on them (rlhf/learner/packing.py)."""
        rows = batch.size // len(self.ranks)
        shards = [batch.select(slice(r * rows, (r + 1) * rows)) for r in range(len(self.ranks))]
        cfg = self.cfg
        return shards, plan_passes(shards, cfg.micro_batch_size, cfg.max_tokens_per_micro_batch, cfg.share_prompt)

    # ----------------------------------------------------------------------------- training
    def train_step(self, batch: TrainBatch) -> dict[str, float]:
        """One optimizer update on a mini-batch, on the group's objective; returns the reduced metrics.

        Metrics (the "grpo" objective's; "sft"'s are in ``__init__``): loss, policy_loss, kl (when ref log-probs are given), entropy, clip_frac/low,
        clip_frac/high, ratio/{mean,max,min}, grad_norm, lr (of this update), tokens/s (attention
        tokens of the mini-batch / wall time), learner/step_s (the slowest rank's seconds inside
        its train_step), skipped (1 when a non-finite loss or gradient on any rank dropped the
        update). How the ranks' combine: rlhf/learner/rank_metrics.py.
        """
        from rlhf.algo import normalisers

        world = len(self.ranks)
        if batch.size % world:
            raise ValueError(
                f"train_step: the mini-batch has {batch.size} rows, not divisible by learner.num_ranks={world}"
            )
        total_tokens, total_seqs = normalisers(batch.response_mask, batch.sample_weight)
        if not (total_tokens > 0 and total_seqs > 0):
            raise ValueError(
                f"train_step: the mini-batch has {total_tokens:g} weighted response tokens in "
                f"{total_seqs:g} weighted sequences; nothing to learn from"
            )
        start = time.perf_counter()
        shards, plan = self._shards(batch)
        results = self._call("train_step", "train_step",
                             [(s, total_tokens, total_seqs, plan) for s in shards])
        wall = time.perf_counter() - start
        return reduce_metrics(results, wall)

    def compute_logprobs(self, batch: TrainBatch) -> torch.Tensor:
        """[B, L] policy log-probs of the completion tokens (no grad), rows spread over the ranks,
        of the distribution the engines sample from (rollout.temperature/top_k/top_p)."""
        return self._score("compute_logprobs", batch, False)

    def compute_old_logprobs(self, batch: TrainBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """``compute_logprobs``' [B, L] and, from the same forward pass, the raw ones (temperature 1,
        untruncated) that on-policy distillation compares with the teacher's."""
        both = self._score("compute_old_logprobs", batch, False)  # [B, 2, L]
        return both[:, 0], both[:, 1]

    def compute_ref_logprobs(self, batch: TrainBatch) -> torch.Tensor:
        """[B, L] reference-model log-probs of the completion tokens; needs algo.kl_coef > 0."""
        if self.algo.kl_coef <= 0:
            raise RuntimeError(f"no reference model: algo.kl_coef={self.algo.kl_coef} (loaded only when > 0)")
        return self._score("compute_ref_logprobs", batch, False)

    def _score(self, method: str, batch: TrainBatch, raw: bool) -> torch.Tensor:
        return self._score_finish(method, self._score_start(method, batch, raw), batch.size)

    def _score_start(self, method: str, batch: TrainBatch, raw: bool) -> list:
        # Every rank must run the same number of forwards (ZeRO-3 gathers are collective), so the
        # rows are padded with copies of the last row up to a multiple of the rank count.
        world = len(self.ranks)
        B = batch.size
        padded = math.ceil(B / world) * world
        index = torch.cat([torch.arange(B), torch.full((padded - B,), B - 1, dtype=torch.long)])
        shards, plan = self._shards(batch.select(index))
        extra = (raw,) if method == "compute_logprobs" else ()
        return [getattr(a, method).remote(s, *extra, plan=plan) for a, s in zip(self.ranks, shards)]

    def _score_finish(self, stage: str, refs: list, rows: int) -> torch.Tensor:
        return torch.cat(wait_ranks(stage, refs, self.cfg.timeout_s))[:rows]

    # ----------------------------------------------------------------------------- weight sync
    def _probe_start(self, probe_ids: list[int]) -> list:
        if len(probe_ids) < 2:
            raise ValueError(f"probe_ids has {len(probe_ids)} tokens; the probe needs at least 2")
        ids = torch.tensor([probe_ids], dtype=torch.long)
        ones = torch.ones_like(ids)
        probe = TrainBatch(input_ids=ids, attention_mask=ones, response_mask=ones.float(),
                           advantages=torch.zeros(1))
        # Raw logits at temperature 1: engines report raw log-probs for the probe.
        return self._score_start("compute_logprobs", probe, True)

    def probe_logprobs(self, probe_ids: list[int]) -> list[float]:
        """The learner's log-probs of ``probe_ids`` at temperature 1 (engines report raw log-probs)."""
        return self._score_finish("probe", self._probe_start(probe_ids), 1)[0].tolist()

    def check_probe(self, engines: Engines, probe_ids: list[int], tolerance: float,
                    learner_probe: list | None = None) -> float:
        """Max |engine - learner| probe log-prob gap over engines and positions 1..L-1; raises
        WeightSyncError above ``tolerance`` (rollout.probe_tolerance, or probe_tolerance_bf16 for a
        bf16 model: RolloutConfig.probe_tolerance_for), naming that key. ``learner_probe``: the
        learner's half, already started (``_probe_start``)."""
        refs = learner_probe if learner_probe is not None else self._probe_start(probe_ids)
        theirs_all = engines.probe(probe_ids)
        mine = self._score_finish("probe", refs, 1)[0].tolist()
        gap = 0.0
        for e, theirs in enumerate(theirs_all):
            if len(theirs) != len(mine):
                raise WeightSyncError(
                    f"engine {e} returned {len(theirs)} probe log-probs for {len(mine)} probe tokens"
                )
            g = max(abs(a - b) for a, b in zip(theirs[1:], mine[1:]))
            if not math.isfinite(g) or g > tolerance:
                key = "rollout.probe_tolerance" + ("" if self.dtype == "float32" else "_bf16")
                raise WeightSyncError(
                    f"engine {e}: probe log-prob gap {g:.3g} exceeds {key}={tolerance:g} "
                    "(the engine's weights differ from the learner's)"
                )
            gap = max(gap, g)
        return gap

    def nodes(self) -> list:
        """The node each rank runs on (NodeInfo), in rank order."""
        return self._call("node", "node")

    def connect(self, engines: Engines, shared_dir: Path | None = None) -> str:
        """Choose the weight transport (learner.sync_transport, auto resolved by where rank 0 and
        the engines run) and, for broadcast, form the group; returns its name. Called at start-up,
        so a files transport across nodes is refused before the first step; sync_weights calls it
        if nobody did. Once per group. With model.lora.sync=adapter the transport is the adapter
        folder: in learner.sync_dir when every engine is on rank 0's node, else in ``shared_dir``
        (the run folder, which train.py checks all nodes see)."""
        from rlhf.learner.sync import AdapterTransport, BroadcastTransport, FileTransport, choose_transport

        if getattr(self, "_transport", None) is None:  # set here, so the constructor need not know
            rank0 = self._call("node", "node")[0]
            nodes = engines.nodes()
            if self.lora_sync == "adapter":
                self._transport = AdapterTransport(self.ranks, self.cfg, self._adapter_root(rank0, nodes, shared_dir))
                return self._transport.name
            name = choose_transport(self.cfg.sync_transport, rank0, nodes, self.cfg.backend)
            self._transport = (FileTransport(self.ranks, self.cfg) if name == "files"
                               else BroadcastTransport(self.ranks, self.cfg, engines))
        return self._transport.name

    def reconnect(self, engines: Engines, shared_dir: Path | None = None) -> str:
        """Form the weight transport again, after an engine was replaced: a broadcast group's members
        are fixed when it forms, and the replacement was not one of them."""
        self._close_transport()
        return self.connect(engines, shared_dir)

    def _close_transport(self) -> None:
        """Leave the weight transport, if one was formed; the next ``connect`` forms a new one."""
        transport, self._transport = getattr(self, "_transport", None), None
        if transport is not None:
            transport.close()

    def _adapter_root(self, rank0, nodes: list, shared_dir: Path | None) -> Path:
        if all(n.node_id == rank0.node_id for n in nodes):
            return Path(self.cfg.sync_dir)
        if shared_dir is None:
            raise WeightSyncError(
                "model.lora.sync=adapter with rollout engines on other nodes than learner rank 0: the adapter "
                "needs a folder every node sees, and none was given (the run folder, in a training run)"
            )
        return Path(shared_dir) / "adapters"

    def sync_weights(self, engines: Engines, probe_ids: list[int], tolerance: float) -> SyncReport:
        """Send the current policy weights to every engine, then check them with the probe."""
        self.connect(engines)
        start = time.perf_counter()
        # The learner's half of the probe is queued first (the weights it scores are the ones about
        # to be sent) and is ready by the time the engines have loaded.
        learner_probe = self._probe_start(probe_ids)
        sent = self._transport.send(engines)
        gap = self.check_probe(engines, probe_ids, tolerance, learner_probe)
        # Adapter sync merges nothing, so nothing rounds away: the metric is absent (None), not 0.
        lost = self._merge_lost() if self.lora_sync == "merged" else None
        return SyncReport(seconds=time.perf_counter() - start, num_bytes=sent.num_bytes, probe_gap=gap,
                          gather_s=sent.gather_s, load_s=sent.load_s, transport=self._transport.name,
                          lora_delta_lost=lost)

    def _merge_lost(self) -> float | None:
        """LoRA: the share of the adapters' delta the merged sync rounds away (rlhf/learner/lora.py);
        the probe cannot see it (the adapters move the probe by less than a bf16 tolerance), so the
        first sync that loses more than ``LOST_WARNING`` of it says so, by name."""
        from rlhf.learner.lora import LOST_WARNING, rounding_warning

        lost = self._call("merge_rounding", "merge_rounding")[0].lost_share
        if lost is not None and lost > LOST_WARNING and not self._warned_rounding:
            self._warned_rounding = True
            print(f"warning: {rounding_warning(lost, self.dtype)}", flush=True)
        return lost

    # ----------------------------------------------------------------------------- persistence
    def save(self, ckpt_root: str | Path, step: int, client_state: dict, keep_last: int = 2) -> Path:
        """Atomic checkpoint ``<ckpt_root>/step-<step>`` (see rlhf/learner/checkpoint.py); returns its path."""
        from rlhf.learner.checkpoint import save_checkpoint

        def write(tmp: Path) -> list:
            return self._call("save_checkpoint", "save_checkpoint", None, str(tmp))  # RankFiles per rank

        return save_checkpoint(Path(ckpt_root), step, write, client_state, keep_last)

    def load(self, ckpt_dir: str | Path) -> dict:
        """Restore model, optimizer and schedule on every rank; returns the run's client state."""
        from rlhf.learner.checkpoint import open_checkpoint

        state = open_checkpoint(Path(ckpt_dir))  # manifest and pickles checked before any is unpickled
        self._call("load_checkpoint", "load_checkpoint", None, str(ckpt_dir))
        return state

    def export(self, out_dir: str | Path, tokenizer_path: str | None = None) -> Path:
        """An HF folder (safetensors, config, tokenizer, generation config) of the current policy."""
        from rlhf.learner.export import publish_hf_folder

        def write(tmp: Path) -> None:
            self._call("export", "export_hf", None, str(tmp))

        return publish_hf_folder(Path(out_dir), write, self.model_path, tokenizer_path or self.model_path,
                                 self.dtype, self.trust_remote_code)

    # ----------------------------------------------------------------------------- inspection
    def full_state(self) -> dict[str, torch.Tensor]:
        """Full fp32 parameters by HF name (for tests and benchmarks)."""
        return self._call("full_state", "full_state")[0]

    def raw_state(self) -> dict[str, torch.Tensor]:
        """Full fp32 parameters under the module's own names (with LoRA: peft's; for tests)."""
        return self._call("raw_state", "raw_state")[0]

    def optimizer_states(self) -> list[dict[str, torch.Tensor]]:
        """Each rank's optimizer state tensors (for tests)."""
        return self._call("optimizer_state", "optimizer_state")

    def shutdown(self) -> None:
        import ray

        self._close_transport()
        for a in getattr(self, "ranks", []):
            ray.kill(a, no_restart=True)
        self.ranks = []
