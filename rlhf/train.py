"""GRPO training, top to bottom: ``python -m rlhf.train [hydra overrides]``.

Each step: draw prompts -> generate n samples per prompt (vLLM engines in Ray actors) -> score them
with the reward functions -> group-relative advantages -> reference log-probs (only when
algo.kl_coef > 0) -> learner updates (DeepSpeed ZeRO ranks in Ray actors) -> weight sync into the
engines, checked with a probe -> metrics -> periodic evaluation and checkpoint. At the end: a final
evaluation, checkpoint, HF export and plots of the run (reward.png, timeline.png).

With an environment (``env.name``, rollouts/env/) a rollout is several turns, the model's and the
environment's, one batched generate per turn (rlhf/experience/episodes.py); its observation tokens are masked
out of the loss. Without one it is the same loop run for one turn. With an agent (``agent.name`` or
``agent.command``) the application makes the episodes instead, calling the policy through an
OpenAI-compatible gateway in front of the engines (rlhf/experience/agents.py, rollouts/gateway/).

With a teacher (on-policy distillation, algo.distill_coef > 0) an open model on engines of its own
(rollouts/opd_teacher.py) scores every sampled token after the rewards, and each token's advantage
gains distill_coef x -(log π_student - log π_teacher), both raw (temperature 1, untruncated,
whatever the sampling temperature and top-k/top-p) (rlhf/algo/distill.py); with no task reward
that is the whole signal.

A step's batch (draw, generate, score, dynamic sampling's refills, the teacher's scoring) is the
producer's: rlhf/experience/producer.py's collect_step, run by its RolloutProducer in a thread of
its own; every reward rule is rlhf/experience/scoring.py's. With trainer.max_staleness = k > 0 the
producer works k steps ahead: the engines sample step s + k while the learner trains step s, and
the sync waits for that batch to finish. The learner measures, on every
step, how far the sampler's log-probs are from its own (mismatch/*: a warning above
algo.max_mismatch_kl, a named error after algo.max_mismatch_kl_steps such steps in a row;
rlhf/run/mismatch.py) and corrects for the gap with algo.rollout_correction.

How this departs from paper GRPO (DeepSeekMath, Shao et al. 2024), each a config choice:
1. One optimizer update per generated batch by default (algo.mini_batches_per_step=1,
   epochs_per_step=1), so the importance ratio is exactly 1 and the clipped objective is the plain
   policy gradient. With more updates per batch, old log-probs are recomputed by the learner before
   the first update rather than taken from vLLM's sampler (the two differ by kernel numerics, and
   by the policy's age with max_staleness > 0); that gap is algo.rollout_correction's to correct.
2. No KL penalty by default (algo.kl_coef=0, as in DAPO and Dr.GRPO), so no reference model is
   loaded. When on, the KL term (k3 by default) is added to the loss, as in the paper.
3. The advantage estimator and the loss aggregation are registry choices (conf/algo/*.yaml): the
   default `grpo` normalises by the group std and averages tokens per sequence as the paper does;
   `dapo` uses token_mean and clip-higher, `dr_grpo` drops the std and the length normalisation.
4. A completion whose reward failed (None) is left out of its group's statistics and carries no
   loss weight, instead of counting as reward 0.
5. Optional DAPO dynamic sampling (algo.dynamic_sampling): groups whose rewards are all equal carry
   no signal and are replaced by groups from freshly drawn prompts, a bounded number of times.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import ExitStack
from pathlib import Path

from omegaconf import OmegaConf

from rlhf.algo import compute_advantages
from rlhf.algo.grpo import MAX_METRICS, MIN_METRICS
from rlhf.cli import hydra_main
from rlhf.cluster.placement import plan_placement, reachable_nodes, record_placement, reserve
from rlhf.cluster.startup import check_storage, model_folder, prepare, start_ray
from rlhf.config import Config
from rlhf.config.batches import total_updates
from rlhf.config.store import register_configs
from rlhf.console import component_logs
from rlhf.experience.agents import AgentRuntime, agent_configured
from rlhf.experience.batching import build_train_batch, mini_batches, rewards_matrix
from rlhf.experience.episodes import EnvRuntime, env_items
from rlhf.experience.heldout import evaluate
from rlhf.experience.producer import Collected, RolloutProducer, collect_step, regenerate_note
from rlhf.experience.prompts import PromptDataset
from rlhf.experience.scoring import reward_column_names, reward_metrics
from rlhf.learner import LearnerError, LearnerGroup
from rlhf.learner.checkpoint import latest_complete
from rlhf.learner.lora import serving_rank, sync_mode
from rlhf.learner.sync import choose_transport
from rlhf.models import check_model_family, peek_model_path
from rlhf.plan import count_params, describe, estimate_memory
from rlhf.run.ledger import CostLedger
from rlhf.run.metrics import MetricsLogger, progress_line, read_metrics
from rlhf.run.mismatch import MismatchError, MismatchWatch, check_mismatch  # noqa: F401 (MismatchError: API)
from rlhf.run.plot import plot_run, plot_timeline
from rlhf.run.rng import rng_state, seed_everything, set_rng_state
from rlhf.run.timeline import Timeline, read_timeline
from rlhf.types import RolloutBatch
from rlhf.validation import check_model, eval_reward, teacher_engines, validate
from rewards.runner import RewardRunner
from rollouts.group import EngineGroup
from rollouts.opd_teacher import TeacherEngines, check_same_tokenizer
from rollouts.requests import sampling_from_config

register_configs()


def print_plan(cfg: Config) -> None:
    batches = validate(cfg)
    path = peek_model_path(cfg.model.name_or_path, cfg.model.cache_dir)
    memory = None
    if path is not None:
        from transformers import AutoConfig

        # The model's own rules too, so that a plan that prints is a run that starts.
        check_model(cfg, AutoConfig.from_pretrained(path, trust_remote_code=cfg.model.trust_remote_code), path)
        memory = estimate_memory(cfg, count_params(path, cfg.model.trust_remote_code))
    # Placement per node only where a cluster is already up (RAY_ADDRESS): plan mode starts no Ray.
    print(describe(cfg, batches, memory, reachable_nodes(cfg.trainer.ray_address or os.environ.get("RAY_ADDRESS"))))
    if memory is None:
        print(f"(model {cfg.model.name_or_path} is not prepared yet: no memory estimate)")


def combine_updates(updates: list[dict[str, float]]) -> dict[str, float]:
    """A step's metrics from its optimizer updates: extremes by max / min, the rest averaged."""
    out = {}
    for k in updates[0]:
        values = [u[k] for u in updates]
        out[k] = max(values) if k in MAX_METRICS else min(values) if k in MIN_METRICS else sum(values) / len(values)
    return out


PROBE_TEXT = "Weight sync probe: 12 + 7 = 19. The engines must score this exactly as the learner does."


def start_groups(cfg: Config, model_path: str, teacher_path: str | None,
                 stack: ExitStack) -> tuple[EngineGroup, LearnerGroup, TeacherEngines | None]:
    """Reserve the placement groups (failing fast if the cluster cannot hold them), then start the
    engine and learner actors, and the teacher's engines when there is one, in them concurrently
    (each takes tens of seconds on CPU)."""
    logs = component_logs(cfg.trainer)
    placement = reserve(plan_placement(cfg.trainer.placement, cfg.learner, cfg.rollout, teacher_engines(cfg)),
                        cfg.trainer.placement_timeout_s)
    stack.callback(placement.remove)  # after the groups' shutdown, registered below (LIFO)
    # Weights as files across nodes cannot work: refused here, before any actor starts (connect()
    # checks again once the actors run, on the nodes they actually report).
    rank_nodes, engine_nodes = placement.slot_nodes()
    adapter = sync_mode(cfg.model.lora, cfg.model.dtype) == "adapter"
    if not adapter:  # an adapter travels as a folder: sync_dir on one node, else the shared run folder
        choose_transport(cfg.learner.sync_transport, rank_nodes[0], engine_nodes)
    with ThreadPoolExecutor(max_workers=3) as pool:
        futures = [
            pool.submit(EngineGroup, cfg.rollout, model_path, cfg.model.dtype, cfg.model.trust_remote_code, logs,
                        placement=placement.engines, lora_rank=serving_rank(cfg.model.lora) if adapter else 0),
            pool.submit(LearnerGroup, cfg.learner, cfg.algo, model_path, cfg.model.dtype,
                        cfg.model.trust_remote_code, total_updates=total_updates(cfg), logs=logs,
                        placement=placement.learner, lora=cfg.model.lora,
                        sampling=sampling_from_config(cfg.rollout)),
        ]
        if teacher_path is not None:
            futures.append(pool.submit(TeacherEngines.start, cfg.teacher, teacher_path, logs, placement.teachers))
        wait(futures)
    for future in futures:  # shut down whichever started, even if another failed
        if future.exception() is None:
            stack.callback(future.result().shutdown)
    engines, learner = futures[0].result(), futures[1].result()
    return engines, learner, futures[2].result() if teacher_path is not None else None


def prepare_teacher(cfg: Config, tokenizer, student_path: str, samples: list[str]) -> str | None:
    """The open teacher's model folder when the run distils from one, after checking that its
    tokenizer is the student's (before any engine starts); None without a teacher."""
    if teacher_engines(cfg) is None:
        return None
    from transformers import AutoTokenizer

    path = model_folder(cfg.teacher.model, cfg.model.cache_dir)
    theirs = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.teacher.trust_remote_code)
    check_same_tokenizer(tokenizer, theirs, student_path, path, samples)
    return path


def restore_engine_weights(cfg: Config, learner: LearnerGroup, engines: EngineGroup, run_dir: Path,
                           probe_ids: list[int], teacher_nodes: list) -> None:
    """A replaced engine starts from the model on disk; the learner sends it the weights the other
    engines hold: in a synchronous run its own (synced at the end of every step), which the probe
    checks. placement.json is written again: the replacement may run on another node."""
    if cfg.trainer.max_staleness > 0:
        raise RuntimeError(
            f"with trainer.max_staleness={cfg.trainer.max_staleness} the weights that sampled this batch "
            "are no longer the learner's, so a replaced engine cannot get them (engine restarts need "
            "trainer.max_staleness=0)")
    transport = learner.reconnect(engines, shared_dir=run_dir)
    learner.sync_weights(engines, probe_ids, cfg.rollout.probe_tolerance_for(cfg.model.dtype))
    record_placement(run_dir, cfg.trainer.placement, learner.nodes(), engines.nodes(), transport, teacher_nodes)


def fault_metrics(engines: EngineGroup, learner_lost: list[float]) -> dict[str, float]:
    """The run's engine and learner restarts so far, and the wall seconds they cost (rollouts/group.py's
    EngineRestart; ``learner_lost``: each learner restart's, from the first redone step's start to the
    resumed one's)."""
    return {"faults/engine_restarts": float(len(engines.restarts)),
            "faults/engine_seconds_lost": sum(r.seconds for r in engines.restarts),
            "faults/learner_restarts": float(len(learner_lost)), "faults/learner_seconds_lost": sum(learner_lost)}


def record_judge(ledger: CostLedger, rewards: RewardRunner) -> None:
    """A judge reward's paid requests and tokens so far into the ledger (its own line and price)."""
    used = rewards.api_usage()
    ledger.set_judge_usage(used.requests, used.prompt_tokens, used.completion_tokens)


def resume(ckpt: Path | None, at_start: dict | None, learner: LearnerGroup, engines: EngineGroup,
           data: PromptDataset, run_dir: Path, probe_ids: list[int], tolerance: float
           ) -> tuple[int, list[Collected], MismatchWatch]:
    """Put the run back where checkpoint ``ckpt`` left it, or where it began when ``ckpt`` is None
    (``at_start``: the client state a checkpoint holds, taken before the first step): the learner's
    model, optimizer and schedule, the data position, the RNG, the batches generated ahead and the
    streak of mismatched steps; then the engines get the learner's weights. Returns the step to go
    on after, those batches and that streak. Both trainer.resume=true and a learner restart."""
    state = learner.load(ckpt) if ckpt is not None else at_start
    data.load_state_dict(state["data"])
    set_rng_state(state["rng"])
    learner.connect(engines, shared_dir=run_dir)  # a restarted group forms its weight transport again
    learner.sync_weights(engines, probe_ids, tolerance)
    return (state["step"], [Collected.from_json(b) for b in state.get("pending", [])],
            MismatchWatch.from_json(state.get("mismatch")))


def train(cfg: Config) -> Path:
    batches = validate(cfg)  # every config error surfaces here, before anything loads
    seed_everything(cfg.trainer.seed)  # before prepare, as ever: building a built-in model reseeds torch
    start = prepare(cfg)  # absolute paths: another node (or a `ray job submit` copy) shares no working directory
    cfg, model_path, run_dir = start.cfg, start.model_path, start.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)

    # Data and rewards first: a bad column or reward spec fails before any engine starts.
    from transformers import AutoConfig, AutoTokenizer

    hf_config = AutoConfig.from_pretrained(model_path, trust_remote_code=cfg.model.trust_remote_code)
    check_model_family(hf_config, model_path)  # a family vLLM or the learner lacks, by name
    check_model(cfg, hf_config, model_path)
    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=cfg.model.trust_remote_code)
    env = EnvRuntime(cfg.env, tokenizer, cfg.rollout.max_model_len)
    data = PromptDataset.from_config(cfg.data, tokenizer, split="train", tools=env.tools)
    env.check(env_items(data.eval_items(1))[0])  # a broken environment fails before any engine starts
    teacher_path = prepare_teacher(cfg, tokenizer, model_path,
                                   [tokenizer.decode(it.prompt_ids) for it in data.eval_items(4)])
    eval_items = []
    if cfg.trainer.eval_prompts > 0:
        eval_data = PromptDataset.from_config(cfg.data, tokenizer, split="eval", tools=env.tools)
        eval_items = eval_data.eval_items(cfg.trainer.eval_prompts)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    probe_ids = tokenizer(PROBE_TEXT)["input_ids"]
    tolerance = cfg.rollout.probe_tolerance_for(cfg.model.dtype)
    ckpt_dir = run_dir / "checkpoints"

    with ExitStack() as stack:
        # Checks its prices before start-up; a run that distils from a teacher is an "opd" run.
        ledger = CostLedger(run_dir, cfg.ledger, run_kind="opd" if cfg.algo.distill_coef > 0 else "grpo")
        # Ray before the rewards: a reward_model reward starts its actor when it is built.
        start_ray(cfg.trainer, component_logs(cfg.trainer))
        rewards = RewardRunner(cfg.reward, columns=reward_column_names(cfg.data), run_dir=run_dir)
        stack.callback(rewards.close)
        stack.callback(env.close)
        engines, learner, teacher = start_groups(cfg, model_path, teacher_path, stack)
        check_storage(run_dir, model_path, engines=engines, learner=learner)
        if teacher is not None:
            check_storage(run_dir, teacher_path, teacher=teacher)
            ledger.set_teacher_engines(teacher.num_engines)
        # Before the first step: files across nodes is refused here; broadcast forms its group.
        transport = learner.connect(engines, shared_dir=run_dir)
        record_placement(run_dir, cfg.trainer.placement, learner.nodes(), engines.nodes(), transport,
                         teacher.nodes() if teacher is not None else [])
        engines.restore = lambda: restore_engine_weights(cfg, learner, engines, run_dir, probe_ids,
                                                         teacher.nodes() if teacher is not None else [])

        start_step, pending, mismatch = 0, [], MismatchWatch()
        if cfg.trainer.resume and (last := latest_complete(ckpt_dir)) is not None:
            start_step, pending, mismatch = resume(last, None, learner, engines, data, run_dir, probe_ids, tolerance)
            print(f"resumed from {last} at step {start_step}")

        logger = MetricsLogger(run_dir, cfg.trainer.tensorboard, cfg.trainer.wandb_project,
                               OmegaConf.to_container(OmegaConf.structured(cfg)), resume=start_step > 0)
        stack.callback(logger.close)
        timeline = Timeline(run_dir)
        stack.callback(timeline.close)
        sampling = sampling_from_config(cfg.rollout)
        episodes_from = env  # the environment's turn loop (or single turn), or an agent through the gateway
        if agent_configured(cfg.agent):
            episodes_from = AgentRuntime.start(cfg, engines, tokenizer, sampling)
            stack.callback(episodes_from.close)  # before the engines shut down (LIFO)

        def run_eval(step: int) -> None:
            if not eval_items:
                return
            with timeline.span("eval", step, m := {}):
                result = evaluate(engines, eval_items, rewards, cfg.trainer.eval_samples,
                                  cfg.trainer.eval_temperature, cfg.rollout.max_new_tokens,
                                  reward=eval_reward(cfg), stop=tuple(cfg.rollout.stop), env=episodes_from)
            logger.log(step, {**result.metrics(), **m})
            print(f"eval @ step {step}: {result.describe()}", flush=True)

        def save(step: int, mismatch: MismatchWatch) -> None:
            # Batches generated ahead (max_staleness > 0), finished first: the data position below
            # is past them, and the weights that sampled them are gone.
            ahead_batches = [b.to_json() for b in producer.pending()]
            state = {
                "step": step,
                "data": data.state_dict(),
                "rng": rng_state(),
                "config": OmegaConf.to_container(OmegaConf.structured(cfg)),
                "pending": ahead_batches,
                "mismatch": mismatch.to_json(),  # a resumed run continues the streak of steps above the limit
            }
            with timeline.span("save", step):
                learner.save(ckpt_dir, step, state, keep_last=cfg.trainer.keep_last)

        if start_step == 0:
            run_eval(0)
        # The engines sample step s + k while the learner trains step s (k = 0: synchronous).
        ahead = cfg.trainer.max_staleness

        def start_producer(first_step: int, pending: list[Collected]) -> RolloutProducer:
            made = RolloutProducer(
                lambda step, version, prompts=None: collect_step(cfg, step, version, data, engines, rewards,
                                                                 episodes_from, sampling, timeline, teacher, prompts),
                first_step=first_step, last_step=cfg.trainer.steps,
            )
            stack.callback(made.close)
            # A saved batch more stale than this run's max_staleness admits is regenerated, not trained on.
            if regenerated := made.restore(pending, max_staleness=ahead):
                print(regenerate_note(regenerated, ahead), flush=True)
            return made

        # Where a learner restart goes back to before the first checkpoint: the start, as a checkpoint holds it.
        at_start = {"step": start_step, "data": data.state_dict(), "rng": rng_state(),
                    "pending": [b.to_json() for b in pending], "mismatch": mismatch.to_json()}
        producer = start_producer(start_step + 1, pending)
        started, nonfinite = time.time(), 0

        def run_step(step: int) -> None:
            nonlocal mismatch, nonfinite
            step_start = time.perf_counter()
            # The engines hold the weights after step - 1 updates (synced at the end of each step).
            producer.ask(upto_step=step + ahead, policy_version=step - 1)
            got = producer.take(step)
            metrics: dict[str, float] = dict(got.metrics)
            metrics.update(fault_metrics(engines, learner_lost))
            metrics["async/staleness"] = float(step - 1 - got.policy_version)
            metrics.update(reward_metrics(got.scores, got.completions, cfg.rollout.n))

            rewards_t = rewards_matrix(got.scores.total, cfg.rollout.n)  # [G, n], NaN where a reward failed
            advantages = compute_advantages(rewards_t, cfg.algo.advantage, eps=cfg.algo.eps)
            rollouts = RolloutBatch(completions=got.completions, n=cfg.rollout.n)
            # An agent episode's extra segments are extra rows: padded to split across mini-batches and ranks.
            batch = build_train_batch(rollouts, advantages, rewards_t, pad_id,
                                      row_multiple=batches.mini_batches_per_step * batches.num_ranks)
            # timing/train: the learner's whole share of the step (reference pass, old log-probs,
            # the engines' sleep and wake, the updates); timing/reference: its reference pass.
            with timeline.span("train", step, metrics):
                if cfg.algo.kl_coef > 0:
                    with timeline.span("reference", step, metrics):
                        batch.ref_logprobs = learner.compute_ref_logprobs(batch)
                if batches.mini_batches_per_step > 1 or cfg.algo.epochs_per_step > 1:
                    if batch.teacher_logprobs is not None:  # the raw ones are distillation's
                        batch.old_logprobs, batch.old_raw_logprobs = learner.compute_old_logprobs(batch)
                    else:
                        batch.old_logprobs = learner.compute_logprobs(batch)

                if not ahead:  # colocated: hand the KV-cache memory to the learner where vLLM can
                    engines.sleep()
                try:
                    updates = [
                        learner.train_step(mb)
                        for epoch in range(cfg.algo.epochs_per_step)
                        for mb in mini_batches(batch, batches.mini_batches_per_step,
                                               seed=cfg.trainer.seed + step * 1000 + epoch)
                    ]
                finally:  # awake for the resume's sync, too, when a learner rank was lost
                    if not ahead:
                        engines.wake_up()
            metrics.update(combine_updates(updates))
            nonfinite = nonfinite + 1 if any(u.get("skipped", 0) for u in updates) else 0
            if nonfinite >= cfg.trainer.max_nonfinite_steps:
                logger.log(step, metrics)
                raise RuntimeError(
                    f"{nonfinite} consecutive steps had a non-finite loss or gradient "
                    f"(trainer.max_nonfinite_steps={cfg.trainer.max_nonfinite_steps}); stopping with the "
                    f"last good checkpoint in {ckpt_dir}"
                )
            try:
                mismatch = check_mismatch(step, metrics, mismatch, cfg.algo, ckpt_dir)
            except MismatchError:
                logger.log(step, metrics)
                raise

            with timeline.span("wait_rollouts", step, metrics):
                producer.wait()  # the batch in flight was sampled by these weights: finish it first
            with timeline.span("sync", step, metrics):
                report = learner.sync_weights(engines, probe_ids, tolerance)
            metrics.update({"sync/probe_gap": report.probe_gap, "sync/gb_per_s": report.gb_per_s,
                            "sync/seconds": report.seconds,
                            "sync/broadcast": float(report.transport == "broadcast")})  # 0: files
            if report.lora_delta_lost is not None:  # LoRA, once the adapters have moved
                metrics["sync/lora_delta_lost"] = report.lora_delta_lost
            # Wall time: with max_staleness > 0, the batch's generate/score overlapped earlier steps.
            step_s = time.perf_counter() - step_start
            trained = int(batch.attention_mask.sum())
            metrics["throughput/step_s"] = step_s
            metrics["throughput/tokens_per_s"] = trained / step_s if step_s else 0.0
            # Every token generated this step is billed, including the groups dynamic sampling dropped.
            metrics["throughput/generated_tokens"] = float(got.generated_tokens)
            ledger.add_generated(got.generated_tokens, metrics["timing/generate"])
            if teacher is not None:
                ledger.add_teacher_scored(int(metrics["distill/teacher_tokens"]), metrics["timing/teacher"])
            ledger.add_trained(trained * cfg.algo.epochs_per_step)
            record_judge(ledger, rewards)
            logger.log(step, metrics)
            print(progress_line(step - start_step, cfg.trainer.steps - start_step, metrics, started), flush=True)

            if cfg.trainer.eval_every and step % cfg.trainer.eval_every == 0 and step < cfg.trainer.steps:
                run_eval(step)
            if cfg.trainer.save_every and step % cfg.trainer.save_every == 0 and step < cfg.trainer.steps:
                save(step, mismatch)

        learner_lost: list[float] = []  # the seconds each learner restart cost
        began: dict[int, float] = {}  # step -> when it last started

        def restart_learner(error: LearnerError) -> int:
            """ZeRO's state cannot be rebuilt from one rank: the whole learner group restarts and the
            run goes back to the last complete checkpoint (the start before the first); returns the
            step to go on from."""
            nonlocal producer, mismatch, nonfinite
            if len(learner_lost) == cfg.trainer.max_restarts:
                raise LearnerError(f"{error} (no learner restart left: trainer.max_restarts="
                                   f"{cfg.trainer.max_restarts}; the last complete checkpoint is in {ckpt_dir})"
                                   ) from error
            last = latest_complete(ckpt_dir)
            cause = str(error).splitlines()[0]  # Ray's account of a death runs on for lines
            print(f"learner restart {len(learner_lost) + 1} of {cfg.trainer.max_restarts} ({cause}): resuming from "
                  f"{last or 'the start (no checkpoint yet)'}", flush=True)
            producer.close(wait=True)  # its batch in flight draws prompts that the resume puts back
            learner.restart()
            resumed, pending, mismatch = resume(last, at_start, learner, engines, data, run_dir, probe_ids, tolerance)
            nonfinite = 0
            producer = start_producer(resumed + 1, pending)
            learner_lost.append(time.perf_counter() - began[resumed + 1])  # the failure and the redone work
            return resumed + 1

        step = start_step + 1
        while step <= cfg.trainer.steps:
            began[step] = time.perf_counter()
            try:
                run_step(step)
                step += 1
            except LearnerError as error:
                step = restart_learner(error)

        run_eval(cfg.trainer.steps)
        save(cfg.trainer.steps, mismatch)
        if cfg.trainer.export_at_end:
            learner.export(run_dir / "export", tokenizer_path=model_path)
        record_judge(ledger, rewards)  # the final evaluation's judge calls too
        print(ledger.close())
    plot_run(read_metrics(run_dir / "metrics.jsonl"), run_dir / "reward.png")
    plot_timeline(read_timeline(run_dir / "timeline.jsonl"), run_dir / "timeline.png")
    print(f"run folder: {run_dir}")
    return run_dir


def run(cfg: Config) -> Path | None:
    """``plan=true`` prints the plan and loads nothing; otherwise train."""
    return print_plan(cfg) if cfg.plan else train(cfg)


main = hydra_main(run)


if __name__ == "__main__":
    main()
