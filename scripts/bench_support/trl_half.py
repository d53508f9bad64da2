"""TRL's half of ``scripts/bench_step.py``: GRPOTrainer on the given prompts, each optimizer step timed.

Run by bench_step.py in a child process with ``PYTHONPATH=<throw-away TRL install>``, never from
the project venv's own packages. Settings mirror the framework's demo step: fp32 on CPU,
transformers ``generate`` (no vLLM), no gradient checkpointing, no KL (beta=0), a constant learning
rate, one optimizer step per 4 prompts x 8 samples in two micro-batches of 16 (the framework's
learner.micro_batch_size), prompts served in file order, and the framework's own ``math_answer``
reward (last-number mode) wrapped as a TRL reward function.

Writes a JSON file: per-step wall seconds (on_step_begin -> on_step_end: generation, scoring,
forward/backward and the optimizer step), completion tokens generated per step, and set-up seconds
(imports, model load and trainer construction).
"""

from __future__ import annotations

import argparse
import json
import time

START = time.perf_counter()

import torch  # noqa: E402  (after START: imports count as set-up)
from datasets import Dataset  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from rewards import load_reward  # noqa: E402

NUM_GENERATIONS = 8
MICRO_BATCH = 16  # sequences per forward/backward, as the framework's learner.micro_batch_size


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-path", required=True, help="HF folder")
    p.add_argument("--prompts", required=True, help="JSONL of {prompt, answer}, prompts_per_step per step in order")
    p.add_argument("--prompts-per-step", type=int, default=4)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work-dir", required=True, help="TRL's output_dir (nothing is saved there)")
    p.add_argument("--out", required=True, help="JSON result file")
    p.add_argument("--lora-rank", type=int, default=0, help="peft LoRA of this rank (0: full fine-tuning)")
    p.add_argument("--lora-alpha", type=float, default=16.0)
    return p.parse_args()


class StepTimer(TrainerCallback):
    """Wall time of each optimizer step and the completion tokens TRL reports generating in it."""

    def __init__(self, samples_per_step: int):
        self.samples_per_step = samples_per_step
        self.step_s: list[float] = []
        self.tokens: list[float] = []
        self._began = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._began = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.step_s.append(time.perf_counter() - self._began)
        print(f"trl step {state.global_step}: {self.step_s[-1]:.1f} s", flush=True)

    def on_log(self, args, state, control, logs=None, **kwargs):
        # logging_steps=1 and one generation per optimizer step: each log line is one step's batch.
        if logs and "completions/mean_length" in logs:
            self.tokens.append(logs["completions/mean_length"] * self.samples_per_step)


def math_answer_reward():
    """The framework's built-in reward as a TRL reward function ``fn(prompts, completions, answer, **kw)``."""
    reward = load_reward("math_answer", {"mode": "last_number"})

    def math_answer(prompts, completions, answer, **kwargs):
        # Conversational data: each completion is [{"role": "assistant", "content": text}].
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        questions = [p[-1]["content"] if isinstance(p, list) else p for p in prompts]
        return reward.batch_fn(questions, texts, answer=answer)

    return math_answer


def prompt_dataset(path: str, steps: int, prompts_per_step: int) -> Dataset:
    """The JSONL prompts as chat messages, so TRL applies the tokenizer's chat template itself, as
    it usually does; exits when there are fewer than the steps need."""
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    if len(rows) < steps * prompts_per_step:
        raise SystemExit(f"{path}: {len(rows)} prompts, need {steps * prompts_per_step}")
    return Dataset.from_list([
        {"prompt": [{"role": "user", "content": r["prompt"]}], "answer": r["answer"]} for r in rows
    ])


def lora_config(args: argparse.Namespace):
    """The very peft LoraConfig the framework trains with for the same model.lora (or None)."""
    if args.lora_rank <= 0:
        return None
    from rlhf.config import LoraConfig
    from rlhf.learner.lora import peft_config

    return peft_config(LoraConfig(rank=args.lora_rank, alpha=args.lora_alpha))


def main() -> None:
    args = parse_args()
    samples_per_step = args.prompts_per_step * NUM_GENERATIONS
    dataset = prompt_dataset(args.prompts, args.steps, args.prompts_per_step)

    model = AutoModelForCausalLM.from_pretrained(args.model_path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.model_path)
    config = GRPOConfig(
        output_dir=args.work_dir,
        use_cpu=True,
        bf16=False,  # GRPOConfig turns bf16 on by default; bf16 is emulated (~4x slower) on this CPU
        fp16=False,
        gradient_checkpointing=False,  # GRPOConfig's default is True; the framework's learner runs without
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        per_device_train_batch_size=MICRO_BATCH,
        gradient_accumulation_steps=samples_per_step // MICRO_BATCH,
        num_generations=NUM_GENERATIONS,
        max_completion_length=args.max_new_tokens,
        temperature=1.0,
        top_p=1.0,
        beta=0.0,
        loss_type="grpo",  # per-sequence token mean, then mean over sequences: the framework's default
        use_vllm=False,
        shuffle_dataset=False,  # serve the prompts in the order the framework draws them
        max_steps=args.steps,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        seed=args.seed,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    timer = StepTimer(samples_per_step)
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=math_answer_reward(),
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[timer],
        peft_config=lora_config(args),
    )
    setup_s = time.perf_counter() - START
    trainer.train()
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump({"step_s": timer.step_s, "tokens": timer.tokens, "setup_s": setup_s,
                   "torch_threads": torch.get_num_threads()}, f)


if __name__ == "__main__":
    main()
