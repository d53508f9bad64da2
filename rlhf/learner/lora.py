"""LoRA on the learner (peft): the policy wrapped with adapters, and its weights seen as plain HF weights.

With ``model.lora.rank > 0`` each rank wraps the loaded HF model with ``peft.get_peft_model``
before ``deepspeed.initialize``. Only the adapters (``lora_A``, ``lora_B``) require grad, so the
optimizer (rlhf/learner/optim.py keeps parameters that require grad) and its DeepSpeed partitions
hold adapter state only; the base weights stay frozen and are never written to.

What the engines get (``model.lora.sync``, resolved by ``sync_mode``): with "adapter" (auto's
choice for bf16/fp16) only the PEFT adapter, the export's folder (``write_adapter``), which vLLM
serves with its LoRA support (``rollouts/engine.py`` ``load_adapter``); the base weights on the
engines never change. With "merged" (auto's choice for float32), the merged weights described
below.

Merged: full weights, under the plain HF names the engines were started with.
``merged_entries`` describes every tensor of the base model; a targeted layer's weight is computed
on the fly as ``W + (alpha / rank) * B @ A`` from the gathered ``W``, ``A`` and ``B`` (a new
tensor: merging into ``W`` in place and unmerging afterwards drifts by float rounding at every
sync). ``rlhf/learner/weights.py`` turns these entries into buckets, so the file sync, the
broadcast transport, the HF export and ``full_state`` all see exactly the names and shapes of the
base model. Why auto still merges in float32: merged weights keep one sync path for full
fine-tuning and LoRA alike and keep LoRA kernels out of every generate call, and fp32's 24
significant bits keep the update. In bf16 the merge rounds most of a small update's elements back
to the base weights (``MergeRounding``: 97-99.8% on SmolLM2 at lr 1e-5..1e-4); the adapter, served by
vLLM in bf16, keeps every element, in 1.5% of the merged bytes on SmolLM2 (rank 8). On the probe the
merged and adapter engines tracked an fp32 reference equally well (README, LoRA): the rounding keeps
the delta on average, and bf16's forward noise is as large as a small update.

The export writes the merged HF folder plus a PEFT adapter folder (``ADAPTER_DIR``: safetensors
and ``adapter_config.json``) that ``PeftModel.from_pretrained(base, <export>/adapter)`` loads.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from rlhf.config import ConfigError, LoraConfig
from rlhf.tied_embeddings import LM_HEAD, ties_embeddings
from rlhf.types import WeightEntry

ADAPTER = "default"  # peft's name for the one adapter we train
ADAPTER_DIR = "adapter"  # sub-folder of an export holding the PEFT adapter
_PREFIX = "base_model.model."  # peft's prefix before the HF parameter names
_BASE = ".base_layer"  # peft's wrapped original layer, inside each adapted layer


def check_lora(cfg: LoraConfig) -> None:
    """Raise ConfigError naming the first ``model.lora.*`` value that cannot work (nothing loaded)."""
    if cfg.rank < 0:
        raise ConfigError(f"model.lora.rank={cfg.rank} must be >= 0 (0: LoRA off)")
    if cfg.rank == 0:
        return
    if not cfg.alpha > 0:
        raise ConfigError(f"model.lora.alpha={cfg.alpha} must be > 0")
    if not 0 <= cfg.dropout < 1:
        raise ConfigError(f"model.lora.dropout={cfg.dropout} must be in [0, 1)")
    if not cfg.target_modules:
        raise ConfigError("model.lora.target_modules is empty: name at least one nn.Linear layer (e.g. q_proj)")
    blank = [t for t in cfg.target_modules if not isinstance(t, str) or not t.strip()]
    if blank:
        raise ConfigError(f"model.lora.target_modules={list(cfg.target_modules)} holds an empty name")
    if cfg.sync not in LORA_SYNCS:
        raise ConfigError(f"model.lora.sync={cfg.sync!r} is not one of {list(LORA_SYNCS)}")


# How the engines get the policy (model.lora.sync): merged weights, or the adapter alone.
LORA_SYNCS = ("auto", "merged", "adapter")
# vLLM 0.32's allowed max_lora_rank values (vllm/config/lora.py, MaxLoRARanks).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def sync_mode(cfg: LoraConfig | None, dtype: str) -> str | None:
    """model.lora.sync resolved: "merged" or "adapter"; None without LoRA. auto picks the adapter for
    16-bit dtypes, whose merge rounds most of a small update back to the base weights (bf16 keeps 8
    significant bits: 97-99.8% of the changed elements lost on SmolLM2 at lr 1e-5..1e-4), and the
    merge for float32, which keeps one sync path and no LoRA kernels in the engines."""
    if cfg is None or cfg.rank == 0:
        return None
    if cfg.sync != "auto":
        return cfg.sync
    return "merged" if dtype == "float32" else "adapter"


def serving_rank(cfg: LoraConfig) -> int:
    """The engines' ``max_lora_rank``: the smallest value vLLM accepts that holds model.lora.rank."""
    fits = [r for r in VLLM_LORA_RANKS if r >= cfg.rank]
    if not fits:
        raise ConfigError(
            f"model.lora.rank={cfg.rank} with model.lora.sync=adapter: vLLM serves adapters of rank "
            f"{VLLM_LORA_RANKS[-1]} at most; use a smaller rank or model.lora.sync=merged"
        )
    return fits[0]


def check_adapter_serving(cfg: LoraConfig, dtype: str, architectures: list[str], model: str) -> None:
    """Adapter sync needs vLLM to serve a LoRA adapter for this model: its vLLM class must support
    LoRA, and the rank must fit vLLM's ranks. Raised before any engine starts. Which layers vLLM
    adapts is checked by vLLM itself when the first adapter loads (named: ``adapter_load_error``)."""
    if sync_mode(cfg, dtype) != "adapter":
        return
    serving_rank(cfg)
    from vllm import ModelRegistry
    from vllm.model_executor.models.interfaces import supports_lora

    known = [a for a in architectures if a in ModelRegistry.get_supported_archs()]
    classes = [ModelRegistry.models[a].load_model_cls() for a in known]
    if classes and not any(supports_lora(c) for c in classes):
        raise ConfigError(
            f"model.lora.sync={cfg.sync} (adapter with model.dtype={dtype}): {model}'s vLLM model class "
            f"{[c.__name__ for c in classes]} does not support LoRA serving; use model.lora.sync=merged"
        )


def adapter_load_error(err: Exception, engine_index: int, path: str) -> ValueError:
    """vLLM's refusal of an adapter, as an error naming the config keys that made it."""
    return ValueError(
        f"engine {engine_index}: vLLM refused the LoRA adapter {path} (model.lora.sync=adapter with "
        f"model.lora.target_modules): {err}. Adapt only layers vLLM serves LoRA on, or use "
        "model.lora.sync=merged"
    )


def _matches(module_name: str, target: str) -> bool:
    # peft's own rule for a list of names: the full path, or its last dotted components.
    return module_name == target or module_name.endswith("." + target)


def check_targets(model: torch.nn.Module, targets: list[str]) -> None:
    """Every target must name some nn.Linear of ``model``; with tied embeddings none may be the
    output head (its adapter would untie it from the embedding). The error lists what there is."""
    linears = [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    for target in targets:
        if not any(_matches(name, target) for name in linears):
            known = sorted({name.rsplit(".", 1)[-1] for name in linears})
            raise ConfigError(
                f"model.lora.target_modules: {target!r} matches no nn.Linear of {type(model).__name__}; "
                f"its Linear layers are named {known}"
            )
    head = LM_HEAD.rsplit(".", 1)[0]
    if ties_embeddings(model.config) and any(_matches(head, t) for t in targets):
        raise ConfigError(
            f"model.lora.target_modules={list(targets)} adapts {head!r}, which this model ties to its input "
            "embedding: leave it out"
        )


def peft_config(cfg: LoraConfig, base_model_path: str | None = None):
    """The peft LoraConfig of our settings (training and the exported adapter_config.json)."""
    import peft

    return peft.LoraConfig(
        task_type=peft.TaskType.CAUSAL_LM,
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),
        bias="none",
        base_model_name_or_path=base_model_path,
    )


def wrap(model: torch.nn.Module, cfg: LoraConfig, base_model_path: str | None = None) -> torch.nn.Module:
    """``model`` with LoRA adapters (a peft PeftModel); only the adapters require grad.

    The adapters' random init (A; B starts at zero) is drawn from a generator seeded by
    ``model.lora.seed``, so every rank (and a test's reference) starts from the same adapters.
    """
    import peft

    check_targets(model, list(cfg.target_modules))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        wrapped = peft.get_peft_model(model, peft_config(cfg, base_model_path))
    trainable = [n for n, p in wrapped.named_parameters() if p.requires_grad]
    stray = [n for n in trainable if ".lora_" not in n]
    if stray or not trainable:
        raise RuntimeError(f"LoRA wrap: trainable parameters should be the adapters only, got {trainable[:5]}")
    return wrapped


def is_lora(model: torch.nn.Module) -> bool:
    # A model can only be a PeftModel once peft was imported: no import for full fine-tuning.
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


def merged_weight(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """W + scaling * B @ A, computed in fp32 and returned in W's dtype; W itself is not touched.

    Shapes: W [out, in], A [rank, in], B [out, rank] (nn.Linear layout; peft's fan_in_fan_out off).
    """
    delta = b.detach().float() @ a.detach().float()
    return (weight.detach().float() + scaling * delta).to(weight.dtype)


@dataclass(frozen=True)
class MergeRounding:
    """What rounding the merged weights to the base weights' dtype does to the adapters' delta.

    ``changed``: elements whose delta ``scaling * B @ A`` (fp32) is nonzero; ``lost``: those of them
    whose merged value, rounded, equals the base weight: the engines do not get that element's
    update. In bf16 a delta below half an ulp of W is lost (8 significant bits: |delta| < |W| * 2**-9
    or so). Per element, not per output: rounding moves other elements a whole ulp, so a layer's
    output keeps the delta on average (README, LoRA: SmolLM2 log-probs measured both ways).
    """

    changed: int
    lost: int

    @property
    def lost_share(self) -> float | None:
        """lost / changed; None before the adapters move anything (B starts at zero)."""
        return self.lost / self.changed if self.changed else None

    def __add__(self, other: MergeRounding) -> MergeRounding:
        return MergeRounding(self.changed + other.changed, self.lost + other.lost)


# More than half of the adapters' changed elements rounded away: the engines' policy may lag the
# learner's (below bf16's forward noise on SmolLM2 at lr <= 1e-3, README), and nothing else shows it.
LOST_WARNING = 0.5


def rounding_warning(lost_share: float, dtype: str) -> str:
    return (
        f"model.lora with model.dtype={dtype}: the merged weight sync rounds {lost_share:.1%} of the adapters' "
        f"changed elements back to the base weights (sync/lora_delta_lost), so the engines' policy may lag "
        f"the learner's; use model.lora.sync=adapter (or auto) to send the adapter itself, or "
        f"model.dtype=float32"
    )


def merge_rounding(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float) -> MergeRounding:
    """``MergeRounding`` of one layer: its merge (``merged_weight``) against its base weight."""
    delta = scaling * (b.detach().float() @ a.detach().float())
    changed = delta != 0
    same = merged_weight(weight, a, b, scaling) == weight.detach()
    return MergeRounding(int(changed.sum()), int((changed & same).sum()))


def model_merge_rounding(model: torch.nn.Module, rank: int) -> MergeRounding | None:
    """``MergeRounding`` summed over every adapted layer of ``model`` (rank 0; None elsewhere).
    Collective under ZeRO-3: each layer's W, A and B are gathered, one layer at a time."""
    import deepspeed
    from peft.tuners.lora import LoraLayer

    total = MergeRounding(0, 0)
    for layer in (m for m in model.modules() if isinstance(m, LoraLayer)):
        w, a, b = layer.get_base_layer().weight, layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
        zero3 = hasattr(w, "ds_id")
        with deepspeed.zero.GatheredParameters([w, a, b], modifier_rank=None, enabled=zero3):
            if rank == 0:
                total = total + merge_rounding(w.data, a.data, b.data, float(layer.scaling[ADAPTER]))
    return total if rank == 0 else None


def merged_entries(model: torch.nn.Module) -> list[WeightEntry]:
    """The base model's tensors, in registration order, under their HF names: a targeted layer's
    weight merged with its adapter (computed once its three parameters are gathered), every other
    parameter as it is. Adapter parameters themselves are not listed."""
    from peft.tuners.lora import LoraLayer

    layers = {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}
    entries = []
    for name, p in model.named_parameters():  # tied weights appear once
        if not name.startswith(_PREFIX):
            raise RuntimeError(f"LoRA model parameter {name!r} lacks peft's prefix {_PREFIX!r}")
        if is_adapter(name):
            continue
        owner, leaf = name.rsplit(".", 1)
        layer = layers.get(owner[: -len(_BASE)]) if owner.endswith(_BASE) else None
        hf_name = _hf_name(name)
        if layer is None or leaf != "weight":
            entries.append(WeightEntry(hf_name, (p,)))
            continue
        a, b = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
        scaling = float(layer.scaling[ADAPTER])
        entries.append(WeightEntry(hf_name, (p, a, b), _merge(p, a, b, scaling)))
    return entries


def _hf_name(name: str) -> str:
    """A peft parameter name as the plain HF model names it (prefix and ``.base_layer`` dropped)."""
    return name[len(_PREFIX):].replace(_BASE + ".", ".")


def _merge(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float) -> Callable[[], torch.Tensor]:
    # Reads .data when called: under ZeRO-3 the parameters are whole only while gathered.
    return lambda: merged_weight(w.data, a.data, b.data, scaling)


def is_adapter(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def write_adapter(model: torch.nn.Module, adapters: dict[str, torch.Tensor], out_dir: Path) -> int:
    """The PEFT adapter folder (adapter_model.safetensors + adapter_config.json), as
    ``PeftModel.save_pretrained`` writes it, from ``adapters``: {peft name: full tensor} of the
    model's adapter parameters (gathered by the caller under ZeRO-3). Returns the bytes written."""
    from peft import get_peft_model_state_dict

    # Given the gathered state, peft only renames it (drops the adapter name) as its own save does.
    weights = get_peft_model_state_dict(model, state_dict=adapters, adapter_name=ADAPTER, save_embedding_layers=False)
    return save_adapter_folder(weights, model.peft_config[ADAPTER], out_dir)


def save_adapter_folder(weights: dict[str, torch.Tensor], config, out_dir: Path) -> int:
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    weights = {k: v.contiguous() for k, v in weights.items()}
    save_file(weights, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(str(out_dir))
    return sum(t.numel() * t.element_size() for t in weights.values())


def split_checkpoint_state(
    state: dict[str, torch.Tensor], cfg: LoraConfig
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A LoRA run's checkpoint state (peft names, from DeepSpeed's zero_to_fp32) as (merged HF
    state, adapter state under the names of adapter_model.safetensors). Scaling is alpha / rank,
    peft's for a plain LoraConfig."""
    scaling = cfg.alpha / cfg.rank
    merged, adapter = {}, {}
    for name, t in state.items():
        if is_adapter(name):
            adapter[name.replace(f".{ADAPTER}.", ".")] = t
            continue
        if not name.startswith(_PREFIX):
            raise ValueError(f"LoRA checkpoint tensor {name!r} lacks peft's prefix {_PREFIX!r}")
        owner = name[: -len(".weight")]
        if owner.endswith(_BASE) and name.endswith(".weight"):
            layer = owner[: -len(_BASE)]
            t = merged_weight(t, state[f"{layer}.lora_A.{ADAPTER}.weight"], state[f"{layer}.lora_B.{ADAPTER}.weight"],
                              scaling)
        merged[_hf_name(name)] = t
    return merged, adapter


def is_lora_state(state: dict[str, torch.Tensor]) -> bool:
    return any(is_adapter(name) for name in state)
