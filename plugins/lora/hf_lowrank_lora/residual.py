"""Residual-initialised LoRA: methods that start from non-zero factors A0, B0 and a base W - s*B0@A0.

PiSSA (SVD of W), LoRA-GA (SVD of the gradient) and similar methods replace each target weight W by
the residual W_res = W - s*B0@A0 so that the output at step 0 equals the base. After training the
model computes W_res + s*B@A, which equals

    W + s*(B@A - B0@A0) = W + s*[B | -B0] @ [A ; A0]

a standard rank-2r LoRA relative to the ORIGINAL weights. This module keeps A0, B0 on the layers
(non-persistent buffers, so they follow ``.to(device)`` but never enter a checkpoint or PEFT's
state dict), guards bases whose weights were rewritten, and writes that rank-2r adapter so plain
PEFT reproduces the trained model on the untouched base. Doubling alpha (sqrt(2) x with rsLoRA,
where s = alpha / sqrt(r)) keeps s unchanged at rank 2r.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, cast

import torch
from peft import LoraConfig, PeftModel
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file
from torch import nn

from hf_lowrank_plugins import (
    ExportResult,
    IncompatibleError,
    LowRankError,
    atomic_directory,
    is_quantized,
    save_merged,
)
from hf_lowrank_plugins.export import split_adapter_config
from hf_lowrank_plugins.targets import find_target_modules

from .config import LoraMethodConfig
from .model import lora_layers

#: Set on a base model whose target weights were replaced by residuals W - s*B0@A0.
RESIDUAL_FLAG = "_hf_lowrank_residual_base"
#: Names of the non-persistent buffers holding A0 and B0 on each LoRA layer (suffixed by adapter name).
INITIAL_A, INITIAL_B = "hf_lowrank_A0_", "hf_lowrank_B0_"


def check_clean_base(
    model: nn.Module,
    method: str,
    rewrite: str = "changes the base weights (W -> W - s*B@A)",
    quantized_reason: str | None = None,
) -> None:
    """Raise :class:`IncompatibleError` unless ``model`` carries no adapter and no earlier residual, and
    (where the method gives ``quantized_reason``, the whole message) is not already 4-bit.

    A method that rewrites the base weights (``rewrite`` says how, for the message): adapters already
    on the model would silently run on changed weights (peft#2184); a base that already holds
    residuals would lose its principal directions twice; a base already in 4-bit has lost what an
    SVD or a magnitude ranking needs.
    """
    if (
        isinstance(model, PeftModel)
        or getattr(model, "_hf_peft_config_loaded", False)
        or any(isinstance(m, BaseTunerLayer) for m in model.modules())
    ):
        raise IncompatibleError(
            f"{method} {rewrite}, so it cannot be attached to a model that "
            "already carries adapters: they would run on different weights. Load the base model again "
            f"and attach {method} to it, or merge the other adapter first (merge_and_unload())."
        )
    if quantized_reason is not None and is_quantized(model):
        raise IncompatibleError(quantized_reason)
    if getattr(model, RESIDUAL_FLAG, False):
        raise IncompatibleError(
            "this model's weights are residuals (W - s*B0@A0) left by an earlier PiSSA/LoRA-GA attach or unload(); "
            "load the original base model again. Only if you merged the adapter back yourself, clear the flag "
            f"with `del model.{RESIDUAL_FLAG}`."
        )


def check_untied_targets(model: nn.Module, config: LoraConfig, method: str) -> None:
    """Raise :class:`IncompatibleError` when a target's weight is shared with another module (a head tied to
    the embeddings): a residual method subtracts its initial product from the weight, so the other module
    would change too and the model would not start as its base (PEFT's PiSSA on GPT-2's tied head: 32%)."""
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor):
            owners.setdefault(id(weight), []).append(name)
    targets = find_target_modules(model, config.target_modules, getattr(config, "exclude_modules", None))
    for name, module in targets.items():
        sharing = [other for other in owners.get(id(module.weight), []) if other != name]
        if sharing:
            raise IncompatibleError(
                f"{method} rewrites the weight of '{name}', which '{sharing[0]}' shares (tied weights), so both "
                f"would change; leave '{name.rsplit('.', 1)[-1]}' out of target_modules, or untie them first "
                "(config.tie_word_embeddings=False with a copy of the weight)"
            )


def mark_residual_base(model: PeftModel) -> None:
    """Flag the base of ``model`` as holding residual weights (see :func:`check_clean_base`)."""
    setattr(model.get_base_model(), RESIDUAL_FLAG, True)


@torch.no_grad()
def sync_reference_copies(model: PeftModel, adapter: str = "default") -> list[str]:
    """Give every adapter that shares ``adapter``'s config object the factors ``adapter`` now holds;
    returns their names.

    TRL's preference trainers (DPO, KTO) add a frozen "ref" copy of the trained adapter when they are
    built (``add_adapter("ref", peft_config["default"])`` and a copy of its weights), which is before a
    data-dependent initialisation runs at train start. The base it shares was then rewritten to
    ``W - s·B0·A0``, so the stale copy would make the reference another model than the initial policy
    (a DPO loss that does not start at log 2). Copied again, the reference is the initial policy.
    """
    config = model.peft_config[adapter]
    copies = [name for name, other in model.peft_config.items() if name != adapter and other is config]
    for layer in lora_layers(model, adapter).values():
        for name in copies:
            for factors in (layer.lora_A, layer.lora_B):
                if name in factors:
                    factors[name].weight.copy_(factors[adapter].weight)
    return copies


def store_initial_factors(model: PeftModel, adapter: str = "default") -> None:
    """Remember the current A, B of every LoRA layer of ``adapter`` as its initial factors A0, B0."""
    for module in model.modules():
        if isinstance(module, LoraLayer) and adapter in module.lora_A:
            module.register_buffer(
                INITIAL_A + adapter,
                module.lora_A[adapter].weight.detach().clone(),  # type: ignore[operator]  # nn.Module.__getattr__ types a transformers/PEFT attribute as Tensor | Module
                persistent=False,
            )
            module.register_buffer(
                INITIAL_B + adapter,
                module.lora_B[adapter].weight.detach().clone(),  # type: ignore[operator]  # nn.Module.__getattr__ types a transformers/PEFT attribute as Tensor | Module
                persistent=False,
            )


def initial_factors(model: nn.Module, adapter: str = "default") -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The initial factors (A0, B0) stored by :func:`store_initial_factors`, by LoRA layer name."""
    out = {}
    for name, module in model.named_modules():
        a0, b0 = getattr(module, INITIAL_A + adapter, None), getattr(module, INITIAL_B + adapter, None)
        if a0 is not None and b0 is not None:
            out[name] = (a0, b0)
    return out


def converted_lora_config(config: LoraConfig) -> LoraMethodConfig:
    """The config of the rank-2r LoRA equivalent to ``config``'s residual adapter (same scaling s)."""
    factor = math.sqrt(2) if config.use_rslora else 2
    fields = {
        f.name: getattr(config, f.name)
        for f in dataclasses.fields(LoraMethodConfig)
        if f.init and hasattr(config, f.name)
    }

    def scaled(alpha: float) -> float:
        value = alpha * factor
        return int(value) if float(value).is_integer() else value

    fields.update(
        r=2 * config.r,
        lora_alpha=scaled(config.lora_alpha),
        # every layer doubles its rank and scales its alpha alike, so every layer keeps its s
        rank_pattern={k: 2 * v for k, v in (config.rank_pattern or {}).items()},
        alpha_pattern={k: scaled(v) for k, v in (config.alpha_pattern or {}).items()},
        init_lora_weights=True,  # loading must not run an SVD on (and mutate) the original base
        hf_lowrank_method="lora",
    )
    return LoraMethodConfig(**fields)


def converted_lora_state_dict(model: PeftModel, adapter: str = "default") -> dict[str, torch.Tensor]:
    """PEFT's adapter state dict of ``model`` with every A -> [A ; A0] and B -> [B | -B0].

    The converted adapter sits on the *original* base: a converted layer's base weight, which PEFT
    saves for a targeted ``lm_head`` or embedding (``save_embedding_layers``) and which holds W_res
    here, is left out, or plain PEFT would load W_res under the rank-2r adapter. An embedding's
    adapter, which neither PiSSA nor LoRA-GA initialises, is padded with zeros to the rank 2r the
    config declares (the same product).
    """
    state = {k: v.detach() for k, v in get_peft_model_state_dict(model, adapter_name=adapter).items()}
    converted = set()
    for name, (a0, b0) in initial_factors(model, adapter).items():
        key_a, key_b = f"{name}.lora_A.weight", f"{name}.lora_B.weight"
        state[key_a] = torch.cat([state[key_a], a0.to(state[key_a].dtype)], dim=0)
        state[key_b] = torch.cat([state[key_b], -b0.to(state[key_b].dtype)], dim=1)
        converted |= {key_a, key_b}
        state.pop(f"{name}.base_layer.weight", None)
    for key in [k for k in state if k.endswith(("lora_embedding_A", "lora_embedding_B"))]:
        factor = state[key]  # A: r x vocabulary, B: dim x r
        state[key] = torch.cat([factor, torch.zeros_like(factor)], dim=0 if key.endswith("_A") else 1)
        converted.add(key)
    missing = sorted(k for k in state if (".lora_A." in k or ".lora_B." in k) and k not in converted)
    if missing:
        raise LowRankError(
            f"no initial factors for {len(missing)} LoRA weight(s), e.g. {missing[0]}: the residual method's "
            "initialisation has not run on this model (LoRA-GA's runs when training starts: train first), or the "
            "model was not attached with a residual method (pissa, lora_ga) in this process (attach it again to the "
            "original base to export)"
        )
    return _unshared(state)


def _unshared(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with every tensor contiguous and owning its memory: safetensors refuses tensors that share
    it (``bias="all"`` saves a classifier's bias under the base's name and its trained copy's), as PEFT's
    ``save_pretrained`` clones them too."""
    seen: set[int] = set()
    out = {}
    for key, value in state.items():
        pointer = value.untyped_storage().data_ptr()
        out[key] = value.clone() if pointer in seen else value.contiguous()
        seen.add(pointer)
    return out


def save_portable_adapter(model: nn.Module, directory: str | Path, adapter: str = "default") -> Path:
    """Write the converted rank-2r LoRA that plain PEFT loads onto the original base, atomically."""
    if not isinstance(model, PeftModel):
        raise LowRankError(f"expected the PeftModel returned by attach(), got {type(model).__name__}")
    directory = Path(directory)
    trained: Any = model.peft_config[adapter]  # the residual method's LoraConfig subclass
    config = converted_lora_config(trained)
    if config.base_model_name_or_path is None:
        config.base_model_name_or_path = getattr(model.get_base_model(), "name_or_path", None) or None
    config.inference_mode = True
    state = converted_lora_state_dict(model, adapter)
    with atomic_directory(directory) as tmp:
        config.save_pretrained(str(tmp))
        split_adapter_config(tmp, config)
        save_file(state, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
    return directory


def export_portable(
    model: nn.Module,
    output_dir: str | Path,
    method: str,
    merge: bool,
    tokenizer: Any,
    merged_dtype: torch.dtype | None = None,
    adapter: str = "default",
) -> ExportResult:
    """A residual method's deliverables: ``adapter/``, the rank-2r LoRA relative to the original W
    (plain PEFT loads it on the untouched base, with no initialisation re-run), and with ``merge``
    ``merged/``, the trained model as a plain checkpoint. ``method`` names the method in the note."""
    output_dir = Path(output_dir)
    result = ExportResult(adapter_dir=save_portable_adapter(model, output_dir / "adapter", adapter))
    trained: Any = cast(PeftModel, model).peft_config[adapter]  # save_portable_adapter refused anything else
    rank = 2 * int(trained.r)
    result.notes.append(f"adapter/ is {method} converted to a rank-{rank} LoRA relative to the original base weights")
    if merge:
        result.merged_dir = save_merged(model, output_dir / "merged", tokenizer=tokenizer, dtype=merged_dtype)
    return result


def decomposition_bytes(model: nn.Module) -> int:
    """A ``plan_memory`` term of an initialisation that decomposes each target in fp32, one at a time
    (PiSSA's SVD, OLoRA's QR): the largest target's fp32 copy and two factors of its size."""
    from hf_lowrank_plugins.plan import linear_shapes

    largest = max((out * inp for out, inp in linear_shapes(model).values()), default=0)
    return 3 * largest * 4
