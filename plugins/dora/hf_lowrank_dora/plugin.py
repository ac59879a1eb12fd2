"""Hook implementations of the ``dora`` method."""

from __future__ import annotations

import torch
from peft import LoraConfig
from torch import nn

from hf_lowrank_lora import LORA_ALIASES
from hf_lowrank_plugins import MethodInfo, hookimpl
from hf_lowrank_plugins.plan import linear_shapes
from hf_lowrank_plugins.types import PlanSettings

from .config import DoraConfig
from .model import attach_dora


@hookimpl
def describe_methods() -> list[MethodInfo]:
    """Declare ``dora``; it trains on a 4-bit base too (QDoRA, via ``load_in_4bit=True``)."""
    return [
        MethodInfo(
            name="dora",
            config_class=DoraConfig,
            summary="DoRA: magnitude m times direction (W + s*B@A)/||.||, norm detached (PEFT use_dora)",
            default_lr=2e-4,
            lr_reason="as LoRA: the DoRA paper keeps LoRA's hyperparameters",
            aliases=LORA_ALIASES,
        )
    ]


@hookimpl
def init_adapter(model: nn.Module, config: LoraConfig) -> nn.Module:
    """Attach PEFT DoRA layers; output equals the base at init (B = 0 and m = ||W|| row-wise)."""
    return attach_dora(model, config)


@hookimpl
def plan_memory(model: nn.Module, config: LoraConfig, settings: PlanSettings, terms: dict[str, int]) -> dict[str, int]:
    """What DoRA's forward keeps beyond LoRA's for the backward pass: per adapted layer, the sum
    ``base + s * lora`` that the magnitude's gradient needs (one tokens x out tensor; PEFT's own
    DoRA keeps two, see ``lowrank_norm.dora_output``). The row norms themselves (out x r per layer,
    no gradient) are transient and negligible."""
    outputs = sum(out for out, _ in linear_shapes(model).values())
    compute = 4 if settings.load_in_4bit else torch.empty((), dtype=settings.dtype or torch.float32).element_size()
    return {"dora_activations": settings.tokens * outputs * compute}
