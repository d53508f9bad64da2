"""``reward_model``: scores from a Hugging Face sequence-classification model hosted in a Ray actor.

The model (``AutoModelForSequenceClassification``, safetensors only, no remote code) scores
``prompt + completion`` (or, with ``chat_template: true``, the pair as a user/assistant chat in
the model's template) in batches of ``batch_size``. The reward is the logit at ``label_index``.
The actor is created when the reward is built, so a bad model path fails before training starts,
and is killed by ``close()``. Needs a running Ray (the trainer starts it).
"""

from __future__ import annotations

from typing import Any


class RewardModelActor:
    """Holds the model and tokenizer; one ``score`` call per reward batch."""

    def __init__(self, path: str, dtype: str = "float32", max_length: int = 1024, num_threads: int = 1,
                 device: str = "cpu"):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        torch.set_num_threads(num_threads)  # Ray pins actors to one thread unless told otherwise
        self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForSequenceClassification.from_pretrained(
            path, dtype=getattr(torch, dtype), use_safetensors=True, trust_remote_code=False
        ).to(device).eval()
        # Batched scoring reads the last non-pad token; the model must know which id is padding.
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.max_length = max_length
        self.device = device

    def ready(self) -> int:
        return self.model.config.num_labels

    def texts(self, prompts: list[str], completions: list[str], chat_template: bool) -> list[str]:
        if not chat_template:
            return [p + c for p, c in zip(prompts, completions)]
        return [
            self.tokenizer.apply_chat_template(
                [{"role": "user", "content": p}, {"role": "assistant", "content": c}], tokenize=False
            )
            for p, c in zip(prompts, completions)
        ]

    def score(self, prompts: list[str], completions: list[str], chat_template: bool, batch_size: int,
              label_index: int) -> list[float]:
        import torch

        texts = self.texts(prompts, completions, chat_template)
        scores: list[float] = []
        with torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                enc = self.tokenizer(texts[start : start + batch_size], return_tensors="pt", padding=True,
                                     truncation=True, max_length=self.max_length).to(self.device)
                logits = self.model(**enc).logits  # [batch, num_labels]
                scores.extend(logits[:, label_index].float().tolist())
        return scores


class RewardModel:
    def __init__(self, model: str, batch_size: int = 8, chat_template: bool = False, label_index: int = 0,
                 max_length: int = 1024, dtype: str = "float32", num_cpus: float = 0.5,
                 num_gpus: float = 0.0, num_threads: int = 1):
        import ray

        from rlhf.models import resolve_model_path

        if not ray.is_initialized():
            raise RuntimeError("reward_model runs in a Ray actor: start Ray first (rlhf.cluster.connect.init_ray)")
        if batch_size < 1:
            raise ValueError(f"reward_model: batch_size={batch_size} must be >= 1")
        self.batch_size, self.chat_template, self.label_index = batch_size, chat_template, label_index
        actor_cls = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus)(RewardModelActor)
        self._actor: Any = actor_cls.remote(resolve_model_path(model), dtype, max_length, num_threads,
                                            "cuda" if num_gpus > 0 else "cpu")
        num_labels = ray.get(self._actor.ready.remote())  # load errors surface here, naming the path
        if not 0 <= label_index < num_labels:
            self.close()
            raise ValueError(f"reward_model: label_index={label_index} but {model!r} has {num_labels} labels")

    def __call__(self, prompts: list[str], completions: list[str]) -> list[float]:
        import ray

        return ray.get(self._actor.score.remote(list(prompts), list(completions), self.chat_template,
                                                self.batch_size, self.label_index))

    def close(self) -> None:
        import ray

        if self._actor is not None:
            ray.kill(self._actor)
            self._actor = None
