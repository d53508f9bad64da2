"""TRL's half of ``scripts/bench_accuracy.py``: GRPOTrainer on the demo's settings, held-out accuracy
measured by the framework's own evaluator every ``--eval-every`` optimizer steps.

Run by bench_accuracy.py in a child process with ``PYTHONPATH=<throw-away TRL install>:<repo>``,
never from the project venv's own packages. The trainer is the one of ``trl_half.py`` (fp32 on CPU,
transformers ``generate``, no gradient checkpointing, beta=0, constant learning rate, micro-batches
of 16, prompts in file order, the framework's ``math_answer`` reward), sized like the demo step:
``--prompts-per-step`` prompts x 8 samples per optimizer step (gradient accumulation over
micro-batches of 16), ``--max-new-tokens``, temperature 1.0, PPO clip epsilon 0.2, ``loss_type="grpo"``
(per-sequence token mean, then mean over sequences), max grad norm 1.0, AdamW without weight decay.

Evaluation with the training clock stopped. Before the first step (the base model, from its own
folder) and after every ``--eval-every``-th optimizer step (and the last one), a callback saves the
policy (``save_pretrained``: safetensors, with the tokenizer) and runs ``python -m rlhf.eval
+experiment=single_digit model.name_or_path=<that folder>`` in a subprocess: the same held-out
prompts, samples, temperature, max tokens and correctness rule as the framework's in-loop
evaluation, through a fresh vLLM engine. Training waits meanwhile (so the two never share the
cores), and the whole pause (save + evaluation) is left out of the clock: a point's ``train_s`` is
the wall time since ``--launch-time`` (the parent's clock just before it started this process:
imports, model load and trainer set-up count, as the framework's start-up does) minus every pause
before it. Training stops at the first evaluation reaching ``--target``, after ``--steps`` steps, or
at the first evaluation whose ``train_s`` exceeds ``--max-minutes``.

Appends one JSON line per evaluation to ``--out``: step, train_s, wall_s (since launch, pauses
included), accuracy, its standard error, pass@k, eval_s and save_s.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from trl_half import MICRO_BATCH, NUM_GENERATIONS, math_answer_reward, prompt_dataset  # noqa: E402  (imports torch, trl)

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-path", required=True, help="HF folder")
    p.add_argument("--prompts", required=True, help="JSONL of {prompt, answer}, prompts_per_step per step in order")
    p.add_argument("--prompts-per-step", type=int, default=16)
    p.add_argument("--steps", type=int, required=True, help="optimizer steps at most")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--clip", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=1)
    p.add_argument("--eval-overrides", nargs="*", default=[], help="extra hydra overrides for rlhf.eval")
    p.add_argument("--target", type=float, default=0.9)
    p.add_argument("--max-minutes", type=float, default=60.0)
    p.add_argument("--launch-time", type=float, required=True, help="time.time() when the parent launched us")
    p.add_argument("--work-dir", required=True, help="TRL's output_dir, checkpoints and evaluation folders")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep each saved policy after its evaluation")
    p.add_argument("--out", required=True, help="JSONL of evaluation points (appended as they come)")
    return p.parse_args()


class HeldOutEval(TrainerCallback):
    """Saves the policy and evaluates it with ``rlhf.eval`` with the clock stopped; stops at the target."""

    def __init__(self, args: argparse.Namespace, tokenizer):
        self.args = args
        self.tokenizer = tokenizer
        self.work = Path(args.work_dir)
        self.paused_s = 0.0  # save + evaluation time so far, left out of the training clock
        self.last_eval_step = -1
        self.finished = False
        self.points: list[dict] = []

    def evaluate(self, step: int, model) -> dict:
        began = time.time()
        train_s = began - self.args.launch_time - self.paused_s
        if step == 0:
            folder, save_s = Path(self.args.model_path), 0.0  # the base model, as it is on disk
        else:
            folder = self.work / f"policy-step-{step}"
            model.save_pretrained(folder)  # safetensors
            self.tokenizer.save_pretrained(folder)
            save_s = time.time() - began
        out_dir = self.work / f"eval-step-{step}"
        cmd = [sys.executable, "-m", "rlhf.eval", "+experiment=single_digit", f"model.name_or_path={folder}",
               f"trainer.output_dir={out_dir}", *self.args.eval_overrides]
        env = dict(os.environ, PYTHONPATH=str(REPO))  # the project's own packages only, no TRL
        env.pop("RAY_ADDRESS", None)
        eval_began = time.time()
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        eval_s = time.time() - eval_began
        (self.work / f"eval-step-{step}.log").write_text(proc.stdout)
        if proc.returncode != 0:
            tail = "\n".join(proc.stdout.splitlines()[-30:])
            raise SystemExit(f"rlhf.eval of {folder} exited with {proc.returncode}:\n{tail}")
        result = json.loads((out_dir / "eval.json").read_text())
        if step > 0 and not self.args.keep_checkpoints:
            shutil.rmtree(folder, ignore_errors=True)
        point = {"step": step, "train_s": train_s, "wall_s": began - self.args.launch_time,
                 "accuracy": result["accuracy"], "accuracy_stderr": result["accuracy_stderr"],
                 "pass_at_k": result["pass_at_k"], "k": result["k"], "num_prompts": result["num_prompts"],
                 "response_length": result["response_length"], "eval_s": eval_s, "save_s": save_s}
        self.paused_s += time.time() - began
        self.last_eval_step = step
        self.points.append(point)
        with open(self.args.out, "a", encoding="utf-8") as f:
            f.write(json.dumps(point) + "\n")
        print(f"trl eval @ step {step}: accuracy {point['accuracy']:.3f} ± {point['accuracy_stderr']:.3f} "
              f"at {train_s / 60:.2f} min of training (eval {eval_s:.0f} s, save {save_s:.1f} s, not counted)",
              flush=True)
        return point

    def done(self, point: dict) -> bool:
        acc = point["accuracy"]
        return (acc is not None and acc >= self.args.target) or point["train_s"] > self.args.max_minutes * 60

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.finished = self.done(self.evaluate(0, model))
        control.should_training_stop = self.finished

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.finished:  # the base model already met the target: the trainer may still run one step
            control.should_training_stop = True
            return
        step = state.global_step
        print(f"trl step {step}: {(time.time() - self.args.launch_time - self.paused_s) / 60:.2f} min of training",
              flush=True)
        if step % self.args.eval_every == 0 or step >= self.args.steps:
            self.finished = self.done(self.evaluate(step, model))
            control.should_training_stop = self.finished


def main() -> None:
    args = parse_args()
    Path(args.work_dir).mkdir(parents=True, exist_ok=True)
    samples_per_step = args.prompts_per_step * NUM_GENERATIONS
    if samples_per_step % MICRO_BATCH:
        raise SystemExit(f"{samples_per_step} samples a step is not a multiple of the micro-batch {MICRO_BATCH}")
    dataset = prompt_dataset(args.prompts, args.steps, args.prompts_per_step)
    model = AutoModelForCausalLM.from_pretrained(args.model_path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.model_path)
    config = GRPOConfig(
        output_dir=str(Path(args.work_dir) / "trl_output"),
        use_cpu=True,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_epsilon=1e-8,
        max_grad_norm=1.0,
        per_device_train_batch_size=MICRO_BATCH,
        gradient_accumulation_steps=samples_per_step // MICRO_BATCH,  # one generation per optimizer step
        num_generations=NUM_GENERATIONS,
        max_completion_length=args.max_new_tokens,
        temperature=args.temperature,
        top_p=1.0,
        top_k=0,
        num_iterations=1,
        epsilon=args.clip,
        scale_rewards="group",
        beta=0.0,
        loss_type="grpo",
        use_vllm=False,
        shuffle_dataset=False,
        max_steps=args.steps,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        seed=args.seed,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    evaluator = HeldOutEval(args, tokenizer)
    trainer = GRPOTrainer(model=model, reward_funcs=math_answer_reward(), args=config, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[evaluator])
    trainer.train()
    print(f"trl: {len(evaluator.points)} evaluations; torch threads {torch.get_num_threads()}", flush=True)


if __name__ == "__main__":
    main()
