"""Attach a LoRA-family config to a model with PEFT, after checking targets and rank."""

from __future__ import annotations

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from hf_lowrank_plugins import check_rank, find_target_modules


def attach_lora(model: nn.Module, config: LoraConfig) -> PeftModel:
    """Wrap ``model`` with PEFT LoRA layers for ``config``; fails early on no match or too large a rank.

    Every LoRA-family method (DoRA, PiSSA, LoRA-GA, QLoRA) goes through here, so PEFT's layers,
    dispatch on quantized bases, saving and merging are reused rather than re-implemented.
    """
    targets = find_target_modules(model, config.target_modules, config.exclude_modules)
    check_rank(targets, config.r, what="rank r")
    return get_peft_model(model, config)


def attach_lora_with_factors(
    model: nn.Module, config: LoraConfig, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], adapter: str = "default"
) -> PeftModel:
    """Attach plain LoRA layers for ``config`` to ``model`` and load given (A, B) factors into them.

    Used when a method rebuilds its base (e.g. quantizes a residual or pruned base to NF4) and puts
    the factors it computed at full precision back on top: the config's own initialisation (an SVD)
    must not run again on the new base, so it is switched to PEFT's default for the attach.
    ``factors`` maps LoRA layer names (as in ``named_modules()`` of the result) to (A, B).
    """
    init = config.init_lora_weights
    config.init_lora_weights = True
    try:
        restored = attach_lora(model, config)
    finally:
        config.init_lora_weights = init
    modules = dict(restored.named_modules())
    with torch.no_grad():
        for name, (a, b) in factors.items():
            modules[name].lora_A[adapter].weight.copy_(a)
            modules[name].lora_B[adapter].weight.copy_(b)
    return restored
