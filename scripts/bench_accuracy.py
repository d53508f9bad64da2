"""Time to accuracy: minutes from launch to 0.9 held-out accuracy on the single-digit addition task,
this framework against TRL's GRPOTrainer, same model, prompts, reward, hyper-parameters, evaluator.

Both sides get the demo's settings, read from the composed config (``+experiment=single_digit``, the
curve the README quotes): 16 prompts x 8 samples a step, up to 48 new tokens at temperature 1.0,
AdamW lr 2e-5 constant (no warm-up, no weight decay), gradient norm clipped to 1.0, group-std
advantages, PPO clip 0.2 (one update per batch, so the ratio is 1), per-sequence token mean then
mean over sequences, no KL, fp32 on CPU, micro-batches of 16. The prompts are those ``rlhf.experience.prompts``
serves the run, in the same order; the reward is the built-in ``math_answer`` (last number).
Held-out accuracy: the framework's evaluator for both (``rlhf.experience.heldout.evaluate``: the 32 held-out
single-digit additions x 4 samples at temperature 0.7, up to 48 tokens, correct when
``math_answer`` is 1), before training and after every ``--eval-every`` steps.

- ours: ``python -m rlhf.train +experiment=single_digit`` in a child process (Ray, a vLLM engine,
  a DeepSpeed learner, one fp32 rank and so without ZeRO, weight sync), ``trainer.eval_every=E``;
  its in-loop evaluations are read from ``metrics.jsonl`` while it runs (each line carries its
  wall ``time``).
- TRL: ``scripts/bench_support/trl_accuracy.py`` (GRPOTrainer, TRL installed with ``pip --no-deps``
  into a throw-away folder on the child's PYTHONPATH, never into the project venv): every E optimizer
  steps the policy is saved (safetensors) and evaluated by ``python -m rlhf.eval`` on a fresh vLLM
  engine while training waits.

Fairness. Each clock starts when its child process is launched (imports, Ray/engines/learner or
model and trainer set-up count) and runs to the end of the step an evaluation follows. Evaluation
time is excluded on both sides: ours subtracts each in-loop evaluation's ``timing/eval``, TRL
subtracts the save and the evaluation (the trainer is paused meanwhile, so the two never share the
cores). One correction against ours: our step-0 evaluation is the engine's first call and carries
its warm-up, which the first training step would otherwise pay, so that part (the step-0
evaluation's seconds beyond its tokens at the later evaluations' median seconds per token) stays
on our clock (``warmup_charged_s``). Neither side runs anything else while the other runs: ours first, then TRL. A side stops at
the first evaluation reaching ``--target``, after ``--steps`` steps, or at the first evaluation past
``--max-minutes`` of its clock.

What still differs (TRL allows no closer match): TRL samples with transformers ``generate`` (no
vLLM) and chat-templates the prompt itself (same template, same text); its advantage divides by
std + 1e-4 (ours std + 1e-6); the two sample different completions (different samplers and seeds),
so curves differ by sampling noise as well as speed: one run per side is one draw.

Writes the two curves (held-out accuracy vs minutes of training clock) to
``docs/figures/time_to_accuracy.png`` and ``.json`` (for another ``--model``, into the temporary
folder, which is then kept), and prints a table naming the CPU and the load average.

    .venv/bin/python scripts/bench_accuracy.py                          # the race, SmolLM2-135M-Instruct
    .venv/bin/python scripts/bench_accuracy.py --model tiny --steps 2   # quick check of the plumbing
    .venv/bin/python scripts/bench_accuracy.py --skip-trl --keep-tmp    # ours only; keep the run folder
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from bench_step import ALIASES, PYTHON, REPO, child_env, install_trl

TRL_ACCURACY = REPO / "scripts" / "bench_support" / "trl_accuracy.py"
REAL_MODEL = "smollm2-135m-instruct"
FIGURE = REPO / "docs" / "figures" / "time_to_accuracy.png"
EXPERIMENT = "+experiment=single_digit"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=REAL_MODEL,
                   help="built-in name (smollm2-135m-instruct, tiny-random-llama; 'tiny' for short) or HF folder")
    p.add_argument("--steps", type=int, default=30, help="GRPO steps per side at most")
    p.add_argument("--max-minutes", type=float, default=60.0,
                   help="training-clock minutes per side at most (checked at each evaluation)")
    p.add_argument("--eval-every", type=int, default=1, help="held-out evaluation every E steps, both sides")
    p.add_argument("--target", type=float, default=0.9, help="held-out accuracy to reach")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--trl-version", default="1.16.*")
    p.add_argument("--skip-trl", action="store_true")
    p.add_argument("--skip-ours", action="store_true")
    p.add_argument("--out", type=Path, default=None,
                   help=f"PNG path (JSON beside it); default {FIGURE.relative_to(REPO)} for {REAL_MODEL}, "
                        "else the temporary folder")
    p.add_argument("--keep-tmp", action="store_true", help="keep the temporary folder (logs, run folders)")
    p.add_argument("--verbose", action="store_true", help="echo the children's whole output")
    args = p.parse_args()
    if args.skip_trl and args.skip_ours:
        p.error("--skip-trl and --skip-ours together leave nothing to measure")
    if args.steps < 1 or args.eval_every < 1:
        p.error("--steps and --eval-every must be >= 1")
    args.model = ALIASES.get(args.model, args.model)
    return args


# ---------------------------------------------------------------------------------------------
# The machine and the demo's settings


def machine() -> dict:
    info = {"cores": os.cpu_count(), "cpu": "unknown", "avx512f": None}
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return info
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "Model name":
            info["cpu"] = value.strip()
        elif key.strip() == "Flags":
            info["avx512f"] = "avx512f" in value.split()
    return info


def load_average() -> float:
    return os.getloadavg()[0]


def compose(model_path: str, overrides: list[str]):
    """The typed config ``python -m rlhf.train`` would run with these overrides."""
    from hydra import compose as hydra_compose, initialize_config_dir

    from rlhf.cli import CONF_DIR
    from rlhf.config.store import register_configs, to_object

    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        dcfg = hydra_compose("config", overrides=[EXPERIMENT, f"model.name_or_path={model_path}", *overrides])
    return to_object(dcfg)


def check_matchable(cfg) -> list[str]:
    """Settings of ours that TRL's half below does not mirror: named, so a changed demo is not raced blind."""
    a, l, r, t = cfg.algo, cfg.learner, cfg.rollout, cfg.trainer
    want = {
        "algo.advantage": (a.advantage, "grpo"), "algo.policy_loss": (a.policy_loss, "ppo_clip"),
        "algo.loss_agg": (a.loss_agg, "seq_mean_token_mean"), "algo.kl_coef": (a.kl_coef, 0.0),
        "algo.clip_high": (a.clip_high, a.clip_low), "algo.mini_batches_per_step": (a.mini_batches_per_step, 1),
        "algo.epochs_per_step": (a.epochs_per_step, 1), "learner.lr_schedule": (l.lr_schedule, "constant"),
        "learner.warmup_steps": (l.warmup_steps, 0), "learner.weight_decay": (l.weight_decay, 0.0),
        "learner.grad_clip": (l.grad_clip, 1.0), "learner.betas": (list(l.betas), [0.9, 0.999]),
        "learner.micro_batch_size": (l.micro_batch_size, 16), "rollout.n": (r.n, 8),
        "rollout.top_p": (r.top_p, 1.0), "rollout.top_k": (r.top_k, -1), "model.dtype": (cfg.model.dtype, "float32"),
        "trainer.max_staleness": (t.max_staleness, 0),
    }
    return [f"{k}={have!r} (TRL's half assumes {need!r})" for k, (have, need) in want.items() if have != need]


def draw_prompts(cfg, model_path: str, steps: int) -> list[dict[str, str]]:
    """The prompts ``rlhf.train`` serves, step by step, in order: the run's data config, as it draws them."""
    import datasets
    from transformers import AutoTokenizer

    from rlhf.experience.prompts import PromptDataset

    datasets.disable_progress_bars()
    data = PromptDataset.from_config(cfg.data, AutoTokenizer.from_pretrained(model_path), split="train")
    items = [it for _ in range(steps) for it in data.next_batch(cfg.trainer.prompts_per_step)]
    return [{"prompt": it.raw_prompt, "answer": it.columns["answer"]} for it in items]


# ---------------------------------------------------------------------------------------------
# The two sides; each returns a list of points {step, train_s, wall_s, accuracy, accuracy_stderr, eval_s}


def reached(points: list[dict], target: float) -> dict | None:
    return next((p for p in points if p["accuracy"] is not None and p["accuracy"] >= target), None)


def pump(proc: subprocess.Popen, log_path: Path, tag: str, echo: tuple[str, ...], verbose: bool) -> threading.Thread:
    """Copy the child's output to its log (and the interesting lines to the terminal) in a thread."""

    def run():
        with open(log_path, "w", encoding="utf-8") as log:
            for line in proc.stdout:
                log.write(line)
                log.flush()
                if verbose or line.startswith(echo):
                    print(f"[{tag}] {line.rstrip()}", flush=True)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def stop_child(proc: subprocess.Popen, tag: str) -> None:
    """SIGINT (the trainer unwinds: engines, learner and Ray shut down), then SIGTERM, then SIGKILL its group."""
    for sig, grace in ((signal.SIGINT, 120), (signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        if proc.poll() is not None:
            return
        print(f"[{tag}] stopping the run ({sig.name})", flush=True)
        try:
            if sig == signal.SIGINT:
                proc.send_signal(sig)
            else:
                os.killpg(proc.pid, sig)  # the child was started in a session of its own
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            continue


def ours_points(metrics_path: Path, launch: float) -> tuple[list[dict], list[dict]]:
    """Evaluation points (training clock = since launch minus every evaluation so far) and step lines."""
    if not metrics_path.exists():
        return [], []
    lines = []
    for raw in metrics_path.read_text(encoding="utf-8").splitlines():
        try:
            lines.append(json.loads(raw))
        except json.JSONDecodeError:
            break  # a line being written
    evals = [m for m in lines if "eval/accuracy" in m]
    steps = [m for m in lines if "eval/accuracy" not in m and any(k.startswith("timing/") for k in m)]
    warmup = first_eval_warmup(evals)
    points, excluded = [], 0.0
    for i, m in enumerate(evals):
        eval_s = m.get("timing/eval") or 0.0
        excluded += eval_s - (warmup if i == 0 else 0.0)
        points.append({"step": m["step"], "train_s": m["time"] - launch - excluded, "wall_s": m["time"] - launch,
                       "accuracy": m["eval/accuracy"], "accuracy_stderr": m.get("eval/accuracy_stderr"),
                       "response_length": m.get("eval/response_length"), "eval_s": eval_s,
                       "warmup_charged_s": warmup if i == 0 else 0.0})
    return points, steps


def first_eval_warmup(evals: list[dict]) -> float:
    """Seconds of the engine's first-call warm-up inside our step-0 evaluation, kept on our clock.

    Without that evaluation the first training ``generate`` would pay it (TRL's evaluations run in
    processes of their own and warm nothing up for its training). Estimated as the step-0
    evaluation's time beyond what its tokens cost at the later evaluations' median seconds per token.
    """
    rates = [m["timing/eval"] / m["eval/response_length"] for m in evals[1:]
             if m.get("timing/eval") and m.get("eval/response_length")]
    first = evals[0] if evals else {}
    if not rates or not first.get("timing/eval") or not first.get("eval/response_length"):
        return 0.0
    rates.sort()
    expected = rates[len(rates) // 2] * first["eval/response_length"]
    return max(0.0, first["timing/eval"] - expected)


def race_ours(args, cfg_overrides: list[str], model_path: str, tmp: Path) -> dict:
    run_dir = tmp / "ours"
    cmd = [PYTHON, "-m", "rlhf.train", EXPERIMENT, f"model.name_or_path={model_path}", *cfg_overrides,
           f"trainer.output_dir={run_dir}"]
    print(f"[ours] {' '.join(cmd)}", flush=True)
    launch = time.time()
    proc = subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, bufsize=1, start_new_session=True)
    thread = pump(proc, tmp / "ours.log", "ours", ("step ", "eval", "config error", "Traceback"), args.verbose)
    hard_limit = 2 * args.max_minutes * 60 + 900  # wall seconds: a hung run is stopped all the same
    points, stopped, seen = [], None, 0
    try:
        while proc.poll() is None:
            time.sleep(2.0)
            points, _ = ours_points(run_dir / "metrics.jsonl", launch)
            for p in points[seen:]:
                print(f"[ours] eval @ step {p['step']}: {p['accuracy']:.3f} at {p['train_s'] / 60:.2f} min of "
                      f"training (eval {p['eval_s']:.0f} s, not counted)", flush=True)
            seen = len(points)
            if points and reached(points, args.target):
                stopped = f"reached {args.target}"
            elif points and points[-1]["train_s"] > args.max_minutes * 60:
                stopped = f"past {args.max_minutes:g} min"
            elif time.time() - launch > hard_limit:
                stopped = f"past the hard limit of {hard_limit / 60:.0f} min wall"
            if stopped:
                stop_child(proc, "ours")
                break
    finally:
        if proc.poll() is None:
            stop_child(proc, "ours")
    rc = proc.wait()
    thread.join(timeout=10)
    wall = time.time() - launch
    points, steps = ours_points(run_dir / "metrics.jsonl", launch)
    if rc != 0 and stopped is None:
        tail = (tmp / "ours.log").read_text(encoding="utf-8").splitlines()[-40:]
        raise SystemExit(f"[ours] exited with {rc} after {wall:.0f} s; last lines of {tmp / 'ours.log'}:\n"
                         + "\n".join(tail))
    if not points:
        raise SystemExit(f"[ours] no evaluation in {run_dir / 'metrics.jsonl'}")
    step_s = [m.get("throughput/step_s") for m in steps if m.get("throughput/step_s") is not None]
    return {"name": "ours (rlhf.train)", "points": points, "steps_run": len(steps),
            "mean_step_s": sum(step_s) / len(step_s) if step_s else None,
            "stopped": stopped or "finished its steps", "process_wall_s": wall}


def race_trl(args, cfg, model_path: str, tmp: Path) -> dict:
    prompts = tmp / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in draw_prompts(cfg, model_path, args.steps)))
    site = tmp / "trl"
    for note in install_trl(site, args.trl_version):
        print(f"[trl] {note}")
    version = importlib.metadata.Distribution.at(next(site.glob("trl-*.dist-info"))).version
    out = tmp / "trl_points.jsonl"
    work = tmp / "trl_out"
    cmd = [PYTHON, str(TRL_ACCURACY), "--model-path", model_path, "--prompts", str(prompts),
           "--prompts-per-step", str(cfg.trainer.prompts_per_step), "--steps", str(args.steps),
           "--max-new-tokens", str(cfg.rollout.max_new_tokens), "--temperature", str(cfg.rollout.temperature),
           "--lr", str(cfg.learner.lr), "--clip", str(cfg.algo.clip_low), "--seed", str(args.seed),
           "--eval-every", str(args.eval_every), "--target", str(args.target),
           "--max-minutes", str(args.max_minutes), "--work-dir", str(work), "--out", str(out),
           "--eval-overrides", f"trainer.seed={args.seed}"]
    pythonpath = os.pathsep.join(p for p in [str(site), str(REPO), os.environ.get("PYTHONPATH", "")] if p)
    print(f"[trl {version}] {' '.join(cmd)} --launch-time <now>", flush=True)
    launch = time.time()
    proc = subprocess.Popen([*cmd, "--launch-time", repr(launch)], cwd=REPO, env=child_env(PYTHONPATH=pythonpath),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                            start_new_session=True)
    thread = pump(proc, tmp / "trl.log", f"trl {version}", ("trl ", "Traceback"), args.verbose)
    try:
        rc = proc.wait(timeout=2 * args.max_minutes * 60 + 60 * args.steps + 900)
    except subprocess.TimeoutExpired:
        stop_child(proc, "trl")
        rc = proc.wait()
    finally:
        if proc.poll() is None:
            stop_child(proc, "trl")
    thread.join(timeout=10)
    wall = time.time() - launch
    points = [json.loads(line) for line in out.read_text().splitlines() if line.strip()] if out.exists() else []
    if rc != 0 or not points:
        tail = (tmp / "trl.log").read_text(encoding="utf-8").splitlines()[-40:]
        raise SystemExit(f"[trl] exited with {rc} after {wall:.0f} s ({len(points)} evaluations); last lines of "
                         f"{tmp / 'trl.log'}:\n" + "\n".join(tail))
    hit = reached(points, args.target)
    stopped = (f"reached {args.target}" if hit else f"past {args.max_minutes:g} min"
               if points[-1]["train_s"] > args.max_minutes * 60 else "finished its steps")
    trained = [p for p in points if p["step"] > 0]
    mean_step = None
    if len(trained) >= 2:
        mean_step = (trained[-1]["train_s"] - trained[0]["train_s"]) / (trained[-1]["step"] - trained[0]["step"])
    return {"name": f"TRL {version} GRPOTrainer", "points": points, "steps_run": points[-1]["step"],
            "mean_step_s": mean_step, "stopped": stopped, "process_wall_s": wall}


# ---------------------------------------------------------------------------------------------
# Report


def minutes_to(side: dict, target: float) -> tuple[float | None, float]:
    """(training minutes at the first evaluation reaching ``target`` or None, minutes at the last one)."""
    hit = reached(side["points"], target)
    return (hit["train_s"] / 60 if hit else None), side["points"][-1]["train_s"] / 60


def verdict(sides: list[dict], target: float) -> str:
    if len(sides) != 2:
        return ""
    ours, trl = sides
    (o, o_last), (t, t_last) = minutes_to(ours, target), minutes_to(trl, target)
    if o is not None and t is not None:
        ratio = t / o
        return f"ratio TRL / ours: {ratio:.2f}x ({'meets' if ratio >= 3 else 'misses'} the goal of >= 3x)"
    if o is not None:
        return f"ratio TRL / ours: > {t_last / o:.2f}x (TRL did not reach {target} in {t_last:.1f} min)"
    if t is not None:
        return f"ratio TRL / ours: < {t / o_last:.2f}x (ours did not reach {target} in {o_last:.1f} min)"
    return f"ratio TRL / ours: undefined (neither reached {target})"


def report(sides: list[dict], args, info: dict, load_start: float, load_end: float) -> None:
    cpu = f"{info['cpu']}, {info['cores']} cores, avx512f {'yes' if info['avx512f'] else 'no'}"
    print(f"\nTime to {args.target} held-out accuracy, single-digit addition, {args.model}; evaluation every "
          f"{args.eval_every} step(s), its time excluded from both clocks")
    print(f"CPU: {cpu}; load average (1 min) at start {load_start:.2f}, at end {load_end:.2f}")
    head = (f"{'':28} {'min to ' + str(args.target):>18} {'evals':>6} {'steps':>6} {'s/step':>7} "
            f"{'acc first -> last':>18} {'eval min (excl.)':>17}  stopped")
    print(head)
    print("-" * len(head))
    for s in sides:
        hit, last = minutes_to(s, args.target)
        first_acc, last_acc = s["points"][0]["accuracy"], s["points"][-1]["accuracy"]
        hit_txt = f"{hit:.2f}" if hit is not None else f"not in {last:.1f}"
        step_txt = f"{s['mean_step_s']:.1f}" if s["mean_step_s"] else "n/a"
        eval_min = sum(p["eval_s"] + p.get("save_s", 0.0) - p.get("warmup_charged_s", 0.0) for p in s["points"]) / 60
        accs = f"{first_acc:.3f} -> {last_acc:.3f}"
        print(f"{s['name']:28} {hit_txt:>18} {len(s['points']):>6} {s['steps_run']:>6} {step_txt:>7} "
              f"{accs:>18} {eval_min:>17.1f}  {s['stopped']}")
    line = verdict(sides, args.target)
    if line:
        print(line)


def plot(sides: list[dict], args, info: dict, load_start: float, load_end: float, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.8), dpi=120)
    for s, style in zip(sides, ("o-", "s-")):
        xs = [p["train_s"] / 60 for p in s["points"]]
        ys = [p["accuracy"] if p["accuracy"] is not None else float("nan") for p in s["points"]]
        err = [p.get("accuracy_stderr") or 0.0 for p in s["points"]]
        hit, last = minutes_to(s, args.target)
        label = s["name"] + (f": {hit:.1f} min to {args.target}" if hit is not None
                             else f": not {args.target} in {last:.1f} min")
        line, = ax.plot(xs, ys, style, label=label)
        ax.fill_between(xs, [y - e for y, e in zip(ys, err)], [y + e for y, e in zip(ys, err)],
                        color=line.get_color(), alpha=0.15)
    ax.axhline(args.target, color="grey", ls="--", lw=1)
    ax.set_xlabel("minutes since launch (held-out evaluation time excluded)")
    ax.set_ylabel("held-out accuracy (± s.e. over prompts)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlim(left=0)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    avx = "AVX-512" if info["avx512f"] else "no AVX-512"
    ax.set_title(f"GRPO time to accuracy, single-digit addition, {Path(args.model).name}\n"
                 f"{info['cpu']}, {info['cores']} cores, {avx}; load avg {load_start:.2f} at start, "
                 f"{load_end:.2f} at end", fontsize=9)
    note = verdict(sides, args.target)
    if note:
        fig.text(0.01, 0.01, note, fontsize=8, color="dimgrey")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png)
    plt.close(fig)


def main() -> None:
    args = parse_args()
    from rlhf.models import resolve_model_path

    model_path = str(resolve_model_path(args.model))
    tmp = Path(tempfile.mkdtemp(prefix="bench_accuracy-"))
    print(f"temporary folder: {tmp}")
    png = args.out or (FIGURE if args.model == REAL_MODEL else tmp / "time_to_accuracy.png")
    keep = args.keep_tmp or png.is_relative_to(tmp)
    ours_overrides = [f"trainer.steps={args.steps}", f"trainer.eval_every={args.eval_every}",
                      f"trainer.seed={args.seed}", "trainer.export_at_end=false"]
    cfg = compose(model_path, [*ours_overrides, f"trainer.output_dir={tmp / 'composed'}"])
    for problem in check_matchable(cfg):
        print(f"warning: {problem}: the two sides are not configured alike")
    print(f"settings of both: {cfg.trainer.prompts_per_step} prompts x {cfg.rollout.n} samples a step, "
          f"<= {cfg.rollout.max_new_tokens} new tokens at temperature {cfg.rollout.temperature}, lr {cfg.learner.lr:g}, "
          f"clip {cfg.algo.clip_low}, {cfg.algo.loss_agg}; held-out: {cfg.trainer.eval_prompts} prompts (at most) x "
          f"{cfg.trainer.eval_samples} samples at temperature {cfg.trainer.eval_temperature}")
    info = machine()
    load_start = load_average()
    print(f"CPU: {info['cpu']}, {info['cores']} cores, avx512f {'yes' if info['avx512f'] else 'no'}; "
          f"load average {load_start:.2f}")
    sides, finished = [], False
    try:
        if not args.skip_ours:
            sides.append(race_ours(args, ours_overrides, model_path, tmp))
        if not args.skip_trl:
            sides.append(race_trl(args, cfg, model_path, tmp))
        load_end = load_average()
        report(sides, args, info, load_start, load_end)
        plot(sides, args, info, load_start, load_end, png)
        summary = {"model": args.model, "target": args.target, "eval_every": args.eval_every,
                   "steps_cap": args.steps, "max_minutes": args.max_minutes, "machine": info,
                   "load_average_start": load_start, "load_average_end": load_end,
                   "clock": "seconds since the child's launch minus held-out evaluation (and TRL's save) time",
                   "verdict": verdict(sides, args.target),
                   "sides": [{**s, "minutes_to_target": minutes_to(s, args.target)[0]} for s in sides]}
        png.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
        print(f"wrote {png} and {png.with_suffix('.json')}")
        finished = True
    finally:
        if keep or not finished:  # a failed run keeps its logs
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
