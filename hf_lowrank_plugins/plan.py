"""Peak training memory predicted before a run, from a config alone (``hf-lowrank plan``).

The model is built on the meta device (accelerate's ``init_empty_weights``: shapes, no storage), so
a 70B config answers in seconds. The adapter a method trains is laid on the meta model by PEFT
itself (the method config's PEFT class, with PEFT's default initialisation), so the trainable
parameters are counted exactly as the run will have them. The core then adds up, in bytes:

* ``weights``: the frozen base at its dtype (4-bit layers at NF4's 4 bits plus the block scales;
  what PEFT's k-bit preparation leaves in fp32 in fp32) and the trainable parameters in fp32;
* ``gradients``: one fp32 gradient per trainable parameter;
* ``optimizer``: AdamW's two fp32 moments per trainable parameter;
* ``activations``: what autograd keeps for the backward pass of a decoder layer (the usual count:
  the layer's inputs and outputs of every matmul, norm and activation, the attention probabilities
  of eager attention), times the layers, plus the logits and their fp32 loss and gradient; with
  gradient checkpointing one input per layer plus one layer's worth;
* the method's own terms, from the ``plan_memory`` hook of its plugin: new terms (DoRA's norms,
  LoRA-GA's gradient accumulators, GaLore's projectors, SALOR's masks) or a replacement of a
  standard one (GaLore's optimizer state is that of the projected gradients).

On a CPU, transformers memory-maps the checkpoint: a weight read and replaced (quantized at load, or
rewritten by a method such as PiSSA's residual) leaves its file pages resident beside the new tensor
(``checkpoint_pages``; reclaimable by the kernel, but counted in the resident size).

Under DeepSpeed ZeRO the optimizer state (stage 1), gradients (2) and parameters (3) are split over
``world_size`` processes; the figure is per process. On a CPU the process also holds the libraries
themselves (``runtime``: measured as this process's resident size, since planning imports the same
ones); on a GPU that is the CUDA context, outside the allocator's figure and left out.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .checkpoints import checkpoint_dtype
from .distributed import check_zero_stage
from .errors import LowRankError
from .memory import status_bytes
from .method import default_init_fields
from .sources import load_model_config
from .targets import check_rank, find_target_modules
from .types import MethodInfo, PlanSettings

if TYPE_CHECKING:
    from .registry import Registry

#: NF4 with double quantization: 4 bits, one 8-bit scale per 64 weights, one fp32 per 256 scales.
NF4_BYTES_PER_WEIGHT = 0.5 + 1 / 64 + 4 / (64 * 256)
STANDARD_TERMS = ("weights", "gradients", "optimizer", "activations", "runtime")


@dataclass
class MemoryPlan:
    """A predicted peak, in bytes per process, split into named terms."""

    method: str
    terms: dict[str, int]
    trainable_params: int
    total_params: int
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        """Bytes of the predicted peak."""
        return sum(self.terms.values())

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: every term and the total in bytes and MiB."""
        return {
            "method": self.method,
            "total_bytes": self.total,
            "total_mib": self.total / 2**20,
            "terms_bytes": dict(self.terms),
            "terms_mib": {k: v / 2**20 for k, v in self.terms.items()},
            "trainable_params": self.trainable_params,
            "total_params": self.total_params,
            "notes": self.notes,
        }


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def planned_model_config(model: str | Path | Any) -> Any:
    """A transformers config from a model folder, a ``config.json`` path, or a config object."""
    from transformers import PretrainedConfig

    if isinstance(model, PretrainedConfig):
        return model
    path = Path(model)
    if path.is_file() and path.name != "config.json":
        return _from_json(path)
    folder = path.parent if path.is_file() else path
    if not (folder / "config.json").is_file():
        raise LowRankError(f"{model}: no config.json there; pass a model folder or its config.json")
    config_file = folder / "config.json"
    _raw_config(config_file)  # its problems named in one line, as for any JSON config
    return load_model_config(folder)


def _from_json(path: Path) -> Any:
    from transformers import AutoConfig

    raw = _raw_config(path)
    return _readable(path, lambda: AutoConfig.for_model(raw.pop("model_type"), **raw))


def _raw_config(path: Path) -> dict[str, Any]:
    """The JSON object of a config file that names its ``model_type``, or one line saying what is wrong."""
    import json

    try:
        raw = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise LowRankError(f"{path} is not valid JSON ({exc}); pass a model's config.json") from None
    if not isinstance(raw, dict) or "model_type" not in raw:
        raise LowRankError(f"{path} names no model_type; pass a transformers config.json (it names its model_type)")
    return raw


def _readable(path: Path, build: Callable[[], Any]) -> Any:
    """``build()``'s transformers config, or one line naming ``path`` where transformers cannot read it."""
    try:
        return build()
    except (ValueError, KeyError) as exc:
        raise LowRankError(f"{path}: transformers cannot read it ({' '.join(str(exc).split())[:200]})") from None


def meta_model(config: Any, dtype: torch.dtype | None = None) -> nn.Module:
    """The causal LM of ``config`` on the meta device (no storage), at ``dtype`` (default: torch's)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    try:
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(config, **({"dtype": dtype} if dtype is not None else {}))
    except ValueError:
        raise LowRankError(
            f"a {config.model_type} config has no causal language model class in transformers: plans cover the "
            "causal LMs the CLI trains; measure other models with the Python API (attach) instead"
        ) from None
    model.tie_weights()  # tied embeddings are one tensor, as after loading
    return model


def _adapted_meta(model: nn.Module, config: Any, info: MethodInfo) -> nn.Module:
    """The adapter of ``config`` laid on ``model`` by PEFT (PEFT's default init: no data, no SVD)."""
    from accelerate import init_empty_weights
    from peft import get_peft_model

    from .export import peft_config_class

    base_class = peft_config_class(config)
    accepted = {f.name for f in dataclasses.fields(base_class)}
    fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name in accepted}
    fields.update(default_init_fields(base_class))  # a data-dependent or decomposing init cannot run on meta
    targets = find_target_modules(model, fields.get("target_modules"), fields.get("exclude_modules"))  # as attach
    if isinstance(fields.get("r"), int):  # attach's own check of the rank against the layers
        check_rank(targets, fields["r"], what="rank r")
    with init_empty_weights():
        return get_peft_model(model, base_class(**fields))


def _adapter_parameter_ids(model: nn.Module) -> set[int]:
    """Ids of the parameters PEFT's tuner layers hold as adapters (``adapter_layer_names``: LoRA's A and
    B, IA3's vectors, ...), as opposed to the base layers they wrap."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    ids: set[int] = set()
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            for attr in module.adapter_layer_names:
                holder = getattr(module, attr, None)
                if isinstance(holder, nn.Module):
                    ids.update(id(p) for p in holder.parameters())
    return ids


def _activation_bytes(config: Any, settings: PlanSettings, compute: int) -> tuple[int, int]:
    """Saved activations of one decoder layer, and of the logits with their loss, in bytes."""
    hidden = config.hidden_size
    inter = getattr(config, "intermediate_size", 4 * hidden)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    kv = getattr(config, "num_key_value_heads", heads) * head_dim
    t = settings.tokens
    # per token: norms (2 x 2h), q/k/v in and out with rotary (h + 2kv, twice), attention output and
    # o_proj input (2h), residuals (2h); MLP: gate, up, act(gate), product (4i)
    per_token = 4 * hidden + 2 * (hidden + 2 * kv) + 4 * hidden + 4 * inter
    attention = 2 * settings.batch_size * heads * settings.seq_len**2  # scores and probabilities (eager)
    layer = (t * per_token + attention) * compute
    vocab = config.vocab_size
    logits = t * vocab * (compute + 4 + 4)  # logits, their fp32 copy for the loss, its gradient
    return layer, logits


def _check_settings(info: MethodInfo, settings: PlanSettings) -> None:
    """Refuse what ``train`` would refuse for these settings, in the same words."""
    if settings.load_in_4bit and not info.supports_quantized_base:
        raise LowRankError(f"method '{info.name}' cannot train on a 4-bit base: {info.no_quantized_base}")
    if settings.zero_stage not in (0, 1, 2, 3) or settings.world_size < 1:
        raise LowRankError("zero_stage must be 0-3 and world_size at least 1")
    check_zero_stage(info, settings.zero_stage or None)  # stage 0 plans also serve runs without DeepSpeed


def _frozen_bytes(
    meta: nn.Module, trainable_ids: set[int], four_bit: bool, base_dtype: torch.dtype, model_config: Any
) -> tuple[float, int]:
    """Bytes of the weights that do not train, and of the checkpoint pages a CPU process keeps mapped
    while quantizing (tied weights counted once)."""
    quantized_ids: set[int] = set()  # the weights the 4-bit service quantizes
    if four_bit:
        from .targets import task_heads

        skipped = set(task_heads(meta)) | {"lm_head"}
        adapter_ids = _adapter_parameter_ids(meta)  # an adapter's own linear layers stay in full precision
        for name, module in meta.named_modules():
            if type(module) is nn.Linear and not any(name.endswith(s) for s in skipped):
                if id(module.weight) not in adapter_ids:
                    quantized_ids.add(id(module.weight))
    frozen_bytes, mapped_bytes = 0.0, 0
    checkpoint_size = _element_size(checkpoint_dtype(model_config))
    seen: set[int] = set()
    for p in meta.parameters():
        if id(p) in trainable_ids or id(p) in seen:
            continue
        seen.add(id(p))
        if id(p) in quantized_ids:
            frozen_bytes += p.numel() * NF4_BYTES_PER_WEIGHT
            mapped_bytes += p.numel() * checkpoint_size
        else:  # PEFT's k-bit preparation keeps the rest in fp32
            frozen_bytes += p.numel() * (4 if four_bit else _element_size(base_dtype))
    return frozen_bytes, mapped_bytes


def _peak_activation_bytes(model_config: Any, settings: PlanSettings, compute: int) -> int:
    """Activations kept for backward at the peak: every layer's (or, with checkpointing, every layer's
    input and one layer's recomputed ones) plus the logits."""
    layer, logits = _activation_bytes(model_config, settings, compute)
    layers = model_config.num_hidden_layers
    if settings.gradient_checkpointing:
        return int(layers * settings.tokens * model_config.hidden_size * compute + layer + logits)
    return int(layers * layer + logits)


def plan_memory(
    model: str | Path | Any,
    method: str | MethodInfo,
    settings: PlanSettings | None = None,
    registry: Registry | None = None,
    **fields: Any,
) -> MemoryPlan:
    """Predict the peak memory per process of training ``method`` on ``model`` (a folder, a
    ``config.json`` or a config) with ``settings``; ``fields`` are the method's options."""
    from .api import make_config
    from .registry import get_registry

    settings = settings or PlanSettings()
    registry = registry or get_registry()
    info = method if isinstance(method, MethodInfo) else registry.get(method)
    _check_settings(info, settings)
    config = make_config(info, registry=registry, **fields)
    model_config = planned_model_config(model)
    base_dtype = settings.dtype or (checkpoint_dtype(model_config) if info.trains_adapter else torch.float32)
    four_bit = settings.load_in_4bit or info.requires_quantized_base
    with torch.device("meta"):  # buffers too, and no layer's constructor allocates first (a 4 TB embedding did)
        meta = meta_model(model_config)
    total_params = sum(p.numel() for p in meta.parameters())
    if info.trains_adapter:
        meta = _adapted_meta(meta, config, info)
        trainable = [p for p in meta.parameters() if p.requires_grad]
    else:
        trainable = list(meta.parameters())
    trainable_params = sum(p.numel() for p in trainable)
    frozen_bytes, mapped_bytes = _frozen_bytes(meta, {id(p) for p in trainable}, four_bit, base_dtype, model_config)
    shard = settings.world_size
    stage = settings.zero_stage
    compute = 4 if four_bit else _element_size(base_dtype) if info.trains_adapter else 4
    if settings.device == "cuda" and four_bit:
        compute = 2  # bf16 compute on a GPU
    activations = _peak_activation_bytes(model_config, settings, compute)
    # adapters train in fp32 whatever the base's dtype; weights trained themselves train in the dtype asked
    # for (--dtype bfloat16: bf16 weights, gradients and AdamW moments), fp32 master weights by default
    trained = _element_size(settings.dtype) if settings.dtype is not None and not info.trains_adapter else 4
    terms = {
        "weights": int(frozen_bytes / (shard if stage == 3 else 1))
        + trainable_params * trained // (shard if stage == 3 else 1),
        "gradients": trainable_params * trained // (shard if stage >= 2 else 1),
        "optimizer": trainable_params * 2 * trained // (shard if stage >= 1 else 1),
        "activations": int(activations),
        # what the libraries hold (a CPU process counts them; GPU memory does not)
        "runtime": status_bytes("VmRSS") if settings.device == "cpu" else 0,
    }
    plan = MemoryPlan(info.name, terms, trainable_params, total_params)
    extras = registry.call_method_hook(
        info,
        "plan_memory",
        model=meta,
        config=config,
        settings=dataclasses.replace(settings, dtype=base_dtype),
        terms=dict(terms),
        check=_not_byte_counts,
    )
    for name, value in (extras or {}).items():
        if name in terms and stage and name in ("gradients", "optimizer"):
            value = value // shard
        plan.terms[name] = int(value)
    if settings.device == "cpu" and mapped_bytes:
        # transformers memory-maps safetensors on a CPU: the pages of weights read and converted to 4 bits
        # stay mapped (resident, though reclaimable) while any tensor of the file is still in use
        plan.terms["checkpoint_pages"] = mapped_bytes
    if settings.device == "cpu":
        plan.notes.append("runtime: this process's resident size with the same libraries imported")
    plan.notes.append(f"frozen base in {'NF4' if four_bit else str(base_dtype).removeprefix('torch.')}")
    return plan


def _not_byte_counts(terms: dict[Any, Any]) -> str | None:
    """What is wrong with a ``plan_memory`` answer (its terms must be names mapped to byte counts)."""
    junk = {
        name: value
        for name, value in terms.items()
        if not isinstance(name, str)
        or isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not 0 <= value < math.inf
    }
    return f"{junk!r}; it must map term names to byte counts (non-negative numbers)" if junk else None


def linear_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    """``(out, in)`` of every adapted layer's base weight in a meta PEFT model (for ``plan_memory``)."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from transformers.pytorch_utils import Conv1D

    shapes: dict[str, tuple[int, int]] = {}
    for name, module in model.named_modules():
        if isinstance(module, BaseTunerLayer):
            base: Any = module.get_base_layer()
            rows, cols = int(base.weight.shape[0]), math.prod(int(d) for d in base.weight.shape[1:])
            shapes[name] = (cols, rows) if isinstance(base, Conv1D) else (rows, cols)
    return shapes
