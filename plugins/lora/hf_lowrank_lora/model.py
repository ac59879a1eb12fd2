"""Attach a LoRA-family config to a model with PEFT, after checking targets and rank."""

from __future__ import annotations

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
