"""A data-parallel group of rollout engines (Ray actors) behind one call per operation.

Prompts are split into contiguous, near-equal chunks, one per engine; each engine samples its
chunk and the group stitches the results back in the original prompt order, n rows per prompt.
Every wait has a timeout. An engine that dies or stalls past it is replaced and its share of the
call made again (``cfg.max_engine_restarts`` times in the group's life); past that bound the call
fails with the engine's index in the error.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import ray
from ray.exceptions import GetTimeoutError, RayActorError
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from rlhf import faults
from rlhf.cluster.actors import kill_and_wait
from rlhf.cluster.node import NodeInfo
from rlhf.config import EngineConfig
from rlhf.console import log_file
from rlhf.types import BroadcastGroup, RolloutBatch, SamplingSettings
from rollouts.engine import RolloutEngine, engine_env_vars
from rollouts.requests import validate_request


def split_evenly(num_items: int, num_parts: int) -> list[range]:
    """Contiguous index ranges, sizes differing by at most one: 10 over 3 -> 0-3, 4-6, 7-9."""
    base, extra = divmod(num_items, num_parts)
    bounds = [0]
    for part in range(num_parts):
        bounds.append(bounds[-1] + base + (1 if part < extra else 0))
    return [range(bounds[p], bounds[p + 1]) for p in range(num_parts)]


class EngineDied(RuntimeError):
    """An engine's actor died during a call (the message names the engine and the call)."""


class EngineStalled(TimeoutError):
    """An engine's call ran past its timeout_s (the message names the engine, the call and the key)."""


@dataclass(frozen=True)
class EngineRestart:
    """A lost engine replaced: its index, the call it was lost in, and the wall seconds from noticing
    the loss to its share of the call answered again (replacement start, weights, the work redone)."""

    engine: int
    call: str
    seconds: float


class EngineGroup:
    """``cfg.num_engines`` RolloutEngine actors, started together; with ``logs`` (a folder), engine
    i writes its output to ``logs``/engine-i.log (a teacher's: teacher-engine-i.log) instead of
    Ray's worker log."""

    def __init__(
        self, cfg: EngineConfig, model_path: str, dtype: str, trust_remote_code: bool = False,
        logs: Path | None = None, placement: Sequence[PlacementGroupSchedulingStrategy] | None = None,
        role: str = "rollout", lora_rank: int = 0,
    ) -> None:
        """``placement``: one scheduling strategy per engine (rlhf/cluster/placement.py's ``Placement.engines``);
        None: Ray places the engines wherever their resources are free. ``role``: "rollout" (the
        policy's engines) or "teacher", in log names and errors. ``lora_rank`` > 0: the engines serve
        the learner's LoRA adapter up to that rank (``load_adapter``; model.lora.sync=adapter)."""
        if cfg.num_engines < 1:
            raise ValueError(f"rollout.num_engines={cfg.num_engines} must be >= 1")
        if placement is not None and len(placement) != cfg.num_engines:
            raise ValueError(f"placement has {len(placement)} slots for rollout.num_engines={cfg.num_engines}")
        self.cfg, self.role = cfg, role
        if cfg.max_engine_restarts < 0:
            raise ValueError(f"{self._key()}.max_engine_restarts={cfg.max_engine_restarts} must be >= 0")
        # After a restart: bring the replacement to the group's current weights (the trainer's sync).
        # None: the group serves the model it started from, which a replacement loads by itself.
        self.restore: Callable[[], None] | None = None
        self.restarts: list[EngineRestart] = []  # each replacement, once its lost work was redone
        self._replaced, self._weights_changed, self._restoring = 0, False, False
        log_prefix = "" if role == "rollout" else f"{role}-"
        actor_cls = ray.remote(RolloutEngine)
        # Ray's CPU counts are bookkeeping, not pinning: a fractional request lets engines and
        # learner ranks share one machine while they take turns.
        options = dict(
            num_cpus=cfg.num_cpus_per_engine,
            num_gpus=cfg.num_gpus_per_engine,
            runtime_env={"env_vars": {**engine_env_vars(cfg), **faults.env()}},
        )
        where = [{} if placement is None else {"scheduling_strategy": placement[i]} for i in range(cfg.num_engines)]
        # Engine i, built again the same way (same bundle, index, seed mixing and log) when it is replaced.
        self._start_engine = lambda i: actor_cls.options(**options, **where[i]).remote(
            cfg, model_path, dtype, trust_remote_code, i, log_file(logs, f"{log_prefix}engine-{i}"), lora_rank)
        self.engines = [self._start_engine(i) for i in range(cfg.num_engines)]
        # All actors were created above, so the engines start concurrently; now wait for them all.
        try:
            self._gather([e.ready.remote() for e in self.engines], "start")
        except BaseException:
            self.shutdown()
            raise

    def generate(
        self, prompt_ids: list[list[int]], sampling: SamplingSettings, seed: int | None = None
    ) -> RolloutBatch:
        """n completions per prompt, in prompt order: prompt i owns rows i*n .. i*n+n-1.

        ``seed``: reseed every engine first (each mixes in its index), making the batch reproducible.
        """
        validate_request(prompt_ids, sampling, self.cfg.max_model_len)
        chunks = [c for c in split_evenly(len(prompt_ids), len(self.engines)) if len(c)]
        start = time.perf_counter()
        # A replaced engine samples its chunk again with the same seed, mixed with the same index.
        parts: list[RolloutBatch] = self._run("generate", [
            lambda engine, chunk=chunk: engine.generate.remote([prompt_ids[i] for i in chunk], sampling, seed)
            for chunk in chunks])
        seconds = time.perf_counter() - start
        completions = []
        for chunk, part in zip(chunks, parts):
            for c in part.completions:
                c.prompt_index += chunk.start  # engine-local index -> index in this request
                completions.append(c)
        return RolloutBatch(
            completions=completions,
            n=sampling.n,
            generate_s=seconds,
            per_engine_s=[p.generate_s for p in parts],
        )

    def score(self, sequences: list[list[int]], starts: list[int]) -> list[list[float]]:
        """Each sequence's log-probs of its tokens from ``starts[i]`` on (``RolloutEngine.score_tokens``),
        in order; the sequences are split into contiguous chunks, one per engine."""
        if len(starts) != len(sequences):
            raise ValueError(f"{len(starts)} starts for {len(sequences)} sequences")
        validate_request(sequences, SamplingSettings(n=1, max_new_tokens=1), self.cfg.max_model_len)
        chunks = [c for c in split_evenly(len(sequences), len(self.engines)) if len(c)]
        parts = self._run("score", [
            lambda engine, chunk=chunk: engine.score_tokens.remote([sequences[i] for i in chunk],
                                                                   [starts[i] for i in chunk])
            for chunk in chunks])
        return [row for part in parts for row in part]

    def load_weights(self, paths: list[str]) -> list[float]:
        """Every engine loads the same weight files; seconds per engine."""
        self._weights_changed = True
        return self._gather([e.load_weights.remote(list(paths)) for e in self.engines], "load_weights")

    def load_adapter(self, path: str) -> list[float]:
        """Every engine serves the PEFT adapter in ``path`` from now on (all generate, score and probe
        calls); seconds per engine."""
        self._weights_changed = True
        return self._gather([e.load_adapter.remote(path) for e in self.engines], "load_adapter")

    @property
    def timeout_s(self) -> float:
        return self.cfg.timeout_s

    @property
    def num_engines(self) -> int:
        return len(self.engines)

    @property
    def workers_per_engine(self) -> int:
        """vLLM worker processes per engine, each a member of the weight broadcast group."""
        return self.cfg.tensor_parallel_size

    def nodes(self) -> list[NodeInfo]:
        """The node each engine runs on, in engine order."""
        return self._gather([e.node.remote() for e in self.engines], "node")

    def start_join_weight_group(self, group: BroadcastGroup, layout: list) -> list[ray.ObjectRef]:
        """Engine e's workers join as group ranks 1 + e * workers_per_engine + w; one ref per engine
        (the caller waits, together with learner rank 0's half)."""
        w = self.workers_per_engine
        return [e.join_weight_group.remote(group, 1 + i * w, layout) for i, e in enumerate(self.engines)]

    def start_receive_weights(self) -> list[ray.ObjectRef]:
        """Every engine starts receiving the next broadcast; one ref per engine (seconds each)."""
        self._weights_changed = True
        return [e.receive_weights.remote() for e in self.engines]

    def leave_weight_group(self) -> None:
        """Best effort, at shutdown: an engine that already died has no group left to leave."""
        refs = [e.leave_weight_group.remote() for e in self.engines]
        if refs:
            ray.wait(refs, num_returns=len(refs), timeout=60)

    def probe(self, token_ids: list[int]) -> list[list[float]]:
        """Each engine's probe log-probs of ``token_ids`` (one list per engine, element 0 = 0.0)."""
        return self._run("probe", [lambda e: e.probe_logprobs.remote(list(token_ids))] * len(self.engines))

    def sleep(self) -> list[bool]:
        """Release engine memory between generation phases; False where unsupported (CPU)."""
        return self._run("sleep", [lambda e: e.sleep.remote()] * len(self.engines))

    def wake_up(self) -> list[bool]:
        return self._run("wake_up", [lambda e: e.wake_up.remote()] * len(self.engines))

    def shutdown(self) -> None:
        """Stop every engine's vLLM processes, then the actors. Safe to call twice."""
        engines, self.engines = getattr(self, "engines", []), []
        refs = [engine.shutdown.remote() for engine in engines]
        # Best effort: an engine that already died has nothing left to stop.
        if refs:
            ray.wait(refs, num_returns=len(refs), timeout=60)
        kill_and_wait(engines)

    def _run(self, what: str, calls: list[Callable[[Any], ray.ObjectRef]]) -> list[Any]:
        """Engine i runs ``calls[i]`` (one per engine from the first); results in engine order. An
        engine that dies, or runs past cfg.timeout_s, is replaced and its call made again on the
        replacement, up to cfg.max_engine_restarts in the group's life; past that, the error names it."""
        refs = [call(engine) for call, engine in zip(calls, self.engines)]
        deadline = time.monotonic() + self.cfg.timeout_s
        results = []
        for index, call in enumerate(calls):
            noticed = None
            while True:
                try:
                    results.append(self._get(refs[index], index, what, deadline))
                    break
                except (EngineDied, EngineStalled) as lost:
                    noticed = noticed or time.perf_counter()
                    self._replace(index, lost)
                    refs[index], deadline = call(self.engines[index]), time.monotonic() + self.cfg.timeout_s
            if noticed is not None:  # the time lost: from noticing to the lost share answered again
                self.restarts.append(EngineRestart(index, what, time.perf_counter() - noticed))
                print(f"{self.role} engine {index} replaced; its {what} redone after "
                      f"{self.restarts[-1].seconds:.1f}s", flush=True)
        return results

    def _gather(self, refs: list[ray.ObjectRef], what: str) -> list[Any]:
        """ray.get each engine's result within cfg.timeout_s; errors name the engine index. No
        restarts: for calls whose loss the caller handles (start-up, weight loading)."""
        deadline = time.monotonic() + self.cfg.timeout_s
        return [self._get(ref, index, what, deadline) for index, ref in enumerate(refs)]

    def _get(self, ref: ray.ObjectRef, index: int, what: str, deadline: float) -> Any:
        try:
            return ray.get(ref, timeout=max(0.0, deadline - time.monotonic()))
        except RayActorError as err:
            raise EngineDied(f"{self.role} engine {index} died during {what}: {err}") from err
        except GetTimeoutError as err:
            raise EngineStalled(
                f"{self.role} engine {index}: {what} took longer than {self._key()}.timeout_s="
                f"{self.cfg.timeout_s}"
            ) from err

    def _replace(self, index: int, lost: EngineDied | EngineStalled) -> None:
        """Start a new engine ``index`` in the old one's place and bring it to the group's weights;
        raises ``lost``, annotated, past the bound or where the weights cannot be restored. Each
        replacement started counts against the bound, one that dies while starting too: a node's
        death is known to Ray only after its missed heartbeats, and until then Ray may place the
        replacement on that node again."""
        while True:
            self._start_replacement(index, lost)
            try:
                self._get(self.engines[index].ready.remote(), index, "restart",
                          time.monotonic() + self.cfg.timeout_s)
                break
            except EngineDied:  # died while starting: counted, and tried again while the bound allows
                continue
            except EngineStalled as err:
                # It starts once its bundle has room: where the bundle's node is gone, once Ray has
                # re-placed the bundle on a node with room.
                raise type(lost)(f"{lost}; its replacement did not start within {self._key()}.timeout_s="
                                 f"{self.cfg.timeout_s}: no node has room for it") from err
        if self._weights_changed:
            self._restoring = True
            try:
                self.restore()
            except Exception as err:
                raise type(lost)(f"{lost} (replaced, but its weights were not restored: {err})") from err
            finally:
                self._restoring = False

    def _start_replacement(self, index: int, lost: EngineDied | EngineStalled) -> None:
        key = f"{self._key()}.max_engine_restarts={self.cfg.max_engine_restarts}"
        if self._replaced >= self.cfg.max_engine_restarts:
            raise type(lost)(f"{lost} ({key}: {self._replaced} restarts used)") from lost.__cause__
        if self._restoring:  # lost again while restoring weights: no restart inside a restart
            raise type(lost)(f"{lost} (while restoring a replaced engine's weights)") from lost.__cause__
        if self._weights_changed and self.restore is None:
            raise type(lost)(f"{lost} (not replaced: the engines' weights changed since start-up and "
                             "this group has no way to restore them)") from lost.__cause__
        self._replaced += 1
        print(f"{lost}; restarting it ({self._replaced} of {key})", flush=True)
        kill_and_wait([self.engines[index]])
        self.engines[index] = self._start_engine(index)

    def _key(self) -> str:
        """The config section of this group's engines, for messages."""
        return "rollout" if self.role == "rollout" else f"{self.role}.engines"
