"""Attach a LoRA-family config to a model with PEFT, after checking targets and rank."""

from __future__ import annotations

import re
from typing import Any, TypeAlias

from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn

from hf_lowrank_plugins import check_rank, find_target_modules
from hf_lowrank_plugins.targets import ALL_LINEAR, head_layers, is_transposed

from .fused_add import use_fused_add

#: A PEFT LoRA layer (an ``nn.Module`` with PEFT's ``LoraLayer`` mixin); PEFT leaves its attributes
#: (``lora_A``, ``r``, ``scaling``, ``base_layer``) untyped, so code reading them is typed ``Any``.
LoraModule: TypeAlias = Any


def lora_layers(model: nn.Module, adapter: str = "default") -> dict[str, LoraModule]:
    """Every LoRA layer of ``model`` carrying ``adapter``, by qualified name, in module order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer) and adapter in m.lora_A}


def attach_lora(model: nn.Module, config: LoraConfig) -> PeftModel:
    """Wrap ``model`` with PEFT LoRA layers for ``config``; fails early on no match or too large a rank.

    Every LoRA-family method (DoRA, PiSSA, LoRA-GA, QLoRA, SALOR) goes through here, so PEFT's
    layers, dispatch on quantized bases, saving and merging are reused rather than re-implemented.
    Two things are settled before PEFT sees the config, so the saved config says what was trained:
    ``fan_in_fan_out`` is set when the targets store their weights transposed (GPT-2's ``Conv1D``;
    PEFT would flip it with a warning), and with ``all-linear`` a classifier's or QA model's task
    head is excluded (PEFT trains it in full through ``modules_to_save``). Plain LoRA adapters then
    add their update inside their own GEMM (:mod:`hf_lowrank_lora.fused_add`): PEFT's maths, fewer
    passes over each layer's output.
    """
    targets = find_target_modules(model, config.target_modules, config.exclude_modules)
    check_rank(targets, config.r, what="rank r")
    if any(is_transposed(m) for m in targets.values()):
        config.fan_in_fan_out = True
    if config.target_modules == ALL_LINEAR:
        output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None  # type: ignore[operator]  # nn.Module.__getattr__ types a transformers/PEFT attribute as Tensor | Module
        heads = sorted(n for n in head_layers(model) if model.get_submodule(n) is not output)
        if heads and isinstance(config.exclude_modules, str):  # a regular expression: extend it, keep its meaning
            config.exclude_modules = "|".join([f"(?:{config.exclude_modules})", *map(re.escape, heads)])
        elif heads:
            config.exclude_modules = sorted(set(config.exclude_modules or []) | set(heads))
    adapted = get_peft_model(model, config)
    use_fused_add(adapted)
    return adapted
